"""The `lm` study: language modelling on real text (the stdlib's source, bytes), loss by token position.

Each run trains the run's Decoder (a 256-token byte vocabulary: tiny recipes) on random
windows of the training files and scores held-out windows of the validation files
(`mixerzoo.tasks.text`): every recipe sees the same tokens. The per-position loss is the
standard long-context curve: a model that uses distant context keeps lowering its loss at
later positions; a sliding window flattens once the position passes its window. Settings
(unknown keys are an error):

    (the fields of `LMSettings`, each with its meaning: `mixerzoo mixers`, docs/CONFIG.md)

Row columns: val_loss (nats per byte over every position), loss_pos_<a>_<b> (mean loss at
positions a..b-1, one column per bucket), train_tokens, final_loss, swa_window, state_bytes,
parameters, train_seconds, threads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from mixerzoo.ablate.mqar_study import swa_window
from mixerzoo.ablate.studies import (
    PeakLR, Row, RunConfig, StudySettings, TrainSteps, WarmupSteps, WeightDecay,
    build_spec, figure_title, register_study, run_device, save_figure,
)
from mixerzoo.ablate.summary import over_seeds
from mixerzoo.blocks import Decoder, parameter_count, state_nbytes
from mixerzoo.tasks.loop import fit
from mixerzoo.tasks.text import position_losses, stdlib_corpus, text_windows

EVAL_SEED = 2**31  # validation windows: the same for every run


class LMSettings(StudySettings):
    """The `lm` study's settings (unknown keys are an error)."""

    seq_len: int = Field(256, gt=1, description="tokens per window")
    steps: TrainSteps = 300
    lr: PeakLR = 3e-3
    warmup_steps: WarmupSteps = 30
    weight_decay: WeightDecay = 0.1
    batch_size: int = Field(16, gt=0, description="windows per step")
    eval_windows: int = Field(256, gt=0, description="held-out windows")
    buckets: int = Field(8, gt=0, description="position buckets of equal width for the per-position columns")


@torch.no_grad()
def lm_plot(rows: list[Row], path: Path) -> None:
    """Validation loss against token position (bucket centres), one line per recipe (mean over seeds,
    shaded ± std), a dotted line at each sliding window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for row in over_seeds(rows):
        columns = [c for c in row if c.startswith("loss_pos_") and not c.endswith("_std")]
        spans = [tuple(int(x) for x in c.removeprefix("loss_pos_").split("_")) for c in columns]
        centres = [(a + b - 1) / 2 for a, b in spans]
        mean = [row[c] for c in columns]
        std = [row[f"{c}_std"] for c in columns]
        label = f"{row['recipe']} ({row['seeds']} seed{'s' if row['seeds'] > 1 else ''})"
        line, = ax.plot(centres, mean, marker="o", label=label)
        ax.fill_between(centres, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=line.get_color(), alpha=0.2)
        if row.get("swa_window"):
            ax.axvline(row["swa_window"], color=line.get_color(), linestyle=":", linewidth=1)
    ax.set_xlabel("token position in the window")
    ax.set_ylabel("validation loss (nats per byte)")
    ax.set_title(figure_title(rows, "stdlib source, loss by position (dotted: sliding windows)"), fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


@register_study("lm", settings=LMSettings, plot=lm_plot)
def lm_study(run: RunConfig, scratch: Path) -> list[dict[str, Any]]:
    """Train `Decoder(build_spec(run))` on stdlib text; one row of validation loss overall and by position."""
    settings = LMSettings.model_validate(run.settings)
    spec = build_spec(run)
    if spec.vocab_size < 256:
        raise ValueError(f"lm: the byte corpus needs vocab_size >= 256, the spec has {spec.vocab_size}")
    steps = max(1, round(settings.steps * settings.scale))
    inputs, labels = text_windows(stdlib_corpus("train"), steps * settings.batch_size, settings.seq_len, run.seed)
    torch.manual_seed(run.seed)
    model = Decoder(spec).to(run_device(run))

    def batch(step: int) -> dict[str, torch.Tensor]:
        rows = slice(step * settings.batch_size, (step + 1) * settings.batch_size)
        return {"input_ids": inputs[rows], "labels": labels[rows]}

    trained = fit(model, batch, steps=steps, lr=settings.lr, weight_decay=settings.weight_decay,
                  warmup_steps=min(settings.warmup_steps, steps - 1))
    val_inputs, val_labels = text_windows(stdlib_corpus("validation"), settings.eval_windows, settings.seq_len, EVAL_SEED)
    per_position = position_losses(model, val_inputs, val_labels)
    edges = torch.linspace(0, settings.seq_len, settings.buckets + 1).round().long().tolist()
    buckets = {f"loss_pos_{a}_{b}": float(per_position[a:b].mean()) for a, b in zip(edges, edges[1:]) if b > a}
    return [dict(
        seq_len=settings.seq_len, val_loss=float(per_position.mean()), **buckets,
        train_tokens=steps * settings.batch_size * settings.seq_len, final_loss=trained["final_loss"],
        swa_window=swa_window(spec), state_bytes=state_nbytes(spec, settings.seq_len, dtype=torch.bfloat16),
        parameters=parameter_count(spec), train_seconds=trained["seconds"], threads=torch.get_num_threads(),
    )]
