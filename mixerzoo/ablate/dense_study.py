"""The `dense-recall` study: recall of many pairs held at once, inside a sliding window against past it.

InfiniteVL's premise in one two-axis design: window attention fails once what it needs has left the
window, and linear attention fails when more must be held than its fixed state can store; the hybrid
is meant to keep both. One run trains the run's Decoder on a mix of dense-recall examples
(`mixerzoo.tasks.dense_recall`): every density in `densities` (pairs held at once) at two distances,
`inside` (the queries right after the pairs: every distance below the window) and `past` (a filler
gap of `gap` tokens first: every distance at least the window), in equal shares, shuffled; it then
scores held-out examples of each cell. Settings (unknown keys are an error):

    (the fields of `DenseRecallSettings`, each with its meaning: `mixerzoo mixers`, docs/CONFIG.md)

Rows: one per cell, n_pairs, placement (inside / past), gap, distance_min, distance_max (tokens
from a value to its query), accuracy; and per run seq_len, swa_window, state_bytes (bfloat16 at
seq_len), parameters, final_loss, steps, train_seconds, threads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from mixerzoo.ablate.mqar_study import EVAL_SEED_OFFSET, swa_window  # held-out seed: run seed + this + cell
from mixerzoo.ablate.studies import (
    PeakLR, Row, RunConfig, StudySettings, TrainSteps, WarmupSteps, WeightDecay,
    build_spec, draw_chance, figure_title, register_study, run_device, save_figure,
)
from mixerzoo.ablate.summary import over_seeds
from mixerzoo.blocks import Decoder, LayoutSpec, parameter_count, state_nbytes
from mixerzoo.registry import recipe
from mixerzoo.tasks.dense_recall import DenseRecallConfig, make_dense_recall
from mixerzoo.tasks.loop import answer_accuracy, fit
from mixerzoo.tasks.mqar import chance_accuracy

PLACEMENTS = ("inside", "past")
EVAL_BATCH = 256


class DenseRecallSettings(StudySettings):
    """The `dense-recall` study's settings (unknown keys are an error)."""

    vocab_size: int = Field(64, gt=0, description="tokens: 0 filler, [1, V/2) keys, [V/2, V) values")
    densities: list[int] = Field([2, 4, 8, 12], min_length=1, description="pairs held at once, one cell each")
    queries: int | None = Field(None, gt=0, description="keys asked per example (at most the density); None: every key")
    gap: int = Field(36, gt=0, description="filler tokens before the queries of the `past` examples (>= window - 1)")
    placements: list[Literal["inside", "past"]] = Field(
        list(PLACEMENTS), min_length=1, description="the distances trained and scored (a control trains one alone)")
    steps: TrainSteps = 1500
    lr: PeakLR = 3e-3
    warmup_steps: WarmupSteps = 0
    weight_decay: WeightDecay = 0.0
    batch_size: int = Field(32, gt=0, description="training examples per step, cells mixed")
    eval_examples: int = Field(256, gt=0, description="held-out examples per cell")

    @field_validator("densities", "placements")
    @classmethod
    def _distinct(cls, values: list) -> list:
        if len(set(values)) != len(values) or any(isinstance(v, int) and v < 1 for v in values):
            raise ValueError(f"must be distinct (pair counts positive), got {values}")
        return sorted(values)

    def _queries(self, n_pairs: int) -> int:
        return n_pairs if self.queries is None else min(self.queries, n_pairs)

    @property
    def seq_len(self) -> int:
        """Every example's length: the densest cell past the window."""
        densest = max(self.densities)
        return 2 * densest + self._queries(densest) + self.gap

    def cells(self) -> list[DenseRecallConfig]:
        """One task per density and placement (inside: no gap; past: `gap`), densities ascending."""
        return [DenseRecallConfig(vocab_size=self.vocab_size, n_pairs=n, gap=0 if placement == "inside" else self.gap,
                                  seq_len=self.seq_len, n_queries=self._queries(n))
                for n in self.densities for placement in self.placements]

    def check_spec(self, spec: LayoutSpec) -> None:
        """Inside must lie inside the spec's sliding window and past must lie past it."""
        self.cells()  # the vocabulary holds the densest cell
        window = swa_window(spec)
        if window is None:
            return
        densest = max(self.densities)
        reach = 2 * densest + self._queries(densest) - 2
        if reach >= window:
            raise ValueError(f"dense-recall: with window {window} the inside cell of {densest} pairs reaches "
                             f"{reach} tokens back, past the window; use fewer densities or queries, "
                             f"or window >= {reach + 1}")
        if self.gap + 1 < window:
            raise ValueError(f"dense-recall: gap {self.gap} leaves past queries {self.gap + 1} tokens from their pairs, "
                             f"inside window {window}; use gap >= {window - 1}")


def dense_plot(rows: list[Row], path: Path) -> None:
    """Accuracy against pairs held at once, one panel per placement (inside / past the window), one line
    per model (mean over seeds, error bars ± std), chance dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fields = [f for f in ("n_layers", "ratio") if len({r.get(f) for r in rows}) > 1]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
    summary = over_seeds(rows)  # under best_of the runner passes rows without the chosen value: seeds fold
    for ax, placement in zip(axes, PLACEMENTS):
        lines: dict[str, list[Row]] = {}
        for row in summary:
            if row["placement"] == placement:
                label = " ".join([row["recipe"]] + [f"{f}={row[f]}" for f in fields if row.get(f) is not None])
                lines.setdefault(label, []).append(row)
        for label, mine in lines.items():
            ax.errorbar([r["n_pairs"] for r in mine], [r["accuracy"] for r in mine], yerr=[r["accuracy_std"] for r in mine],
                        marker="o", capsize=3, label=f"{label} ({mine[0]['seeds']} seeds)")
        draw_chance(ax, [r for r in rows if r["placement"] == placement], [r["accuracy"] for r in rows])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("key-value pairs held at once")
        ax.set_title(f"{placement} the window", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("recall accuracy")
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(figure_title(rows, "dense recall: density against distance"), fontsize=10)
    save_figure(fig, path)


@register_study("dense-recall", settings=DenseRecallSettings, plot=dense_plot, score="accuracy",
                chance=lambda row: chance_accuracy(row.get("vocab_size") or recipe(row["recipe"], row["size"]).vocab_size))
def dense_recall_study(run: RunConfig, scratch: Path) -> list[dict[str, Any]]:
    """Train `Decoder(build_spec(run))` on the mixed cells; one row of held-out accuracy per cell."""
    settings = DenseRecallSettings.model_validate(run.settings)
    spec = build_spec(run)
    spec = LayoutSpec.model_validate({**spec.model_dump(mode="json"), "vocab_size": settings.vocab_size})
    cells = settings.cells()  # the runner checked them against the spec before any run
    steps = max(1, round(settings.steps * settings.scale))
    per_cell = -(-steps * settings.batch_size // len(cells))
    parts = [make_dense_recall(cell, per_cell, run.seed * len(cells) + index) for index, cell in enumerate(cells)]
    order = torch.randperm(per_cell * len(cells), generator=torch.Generator().manual_seed(run.seed))
    inputs, labels = (torch.cat(tensors)[order] for tensors in zip(*parts))  # [per_cell x cells, T], cells mixed

    def batch(step: int) -> dict[str, torch.Tensor]:
        rows = slice(step * settings.batch_size, (step + 1) * settings.batch_size)
        return {"input_ids": inputs[rows], "labels": labels[rows]}

    torch.manual_seed(run.seed)
    model = Decoder(spec).to(run_device(run))
    trained = fit(model, batch, steps=steps, lr=settings.lr, weight_decay=settings.weight_decay,
                  warmup_steps=min(settings.warmup_steps, steps - 1))
    common = dict(seq_len=settings.seq_len, vocab_size=settings.vocab_size, swa_window=swa_window(spec),
                  state_bytes=state_nbytes(spec, settings.seq_len, dtype=torch.bfloat16), parameters=parameter_count(spec),
                  final_loss=trained["final_loss"], steps=steps, train_seconds=trained["seconds"],
                  threads=torch.get_num_threads())
    rows = []
    for index, cell in enumerate(cells):
        held_inputs, held_labels = make_dense_recall(cell, settings.eval_examples, run.seed + EVAL_SEED_OFFSET + index)
        batches = ({"input_ids": held_inputs[i:i + EVAL_BATCH], "labels": held_labels[i:i + EVAL_BATCH]}
                   for i in range(0, settings.eval_examples, EVAL_BATCH))
        accuracy = answer_accuracy(model, batches)
        low, high = cell.distance_range()
        rows.append(dict(n_pairs=cell.n_pairs, placement="inside" if cell.gap == 0 else "past", gap=cell.gap,
                         distance_min=low, distance_max=high, accuracy=accuracy, **common))
    return rows
