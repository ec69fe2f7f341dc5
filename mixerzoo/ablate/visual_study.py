"""The `visual-recall` study: train a recipe's VLM to recall the digits of images seen before filler text.

One run builds the VLM of the run's recipe (window / ratio overrides applied to its decoder
as `build_spec` applies them), trains it on fresh visual-recall batches
(`mixerzoo.tasks.visual.make_visual_recall`) and evaluates answer accuracy on examples from
another seed. Settings (unknown keys are an error):

    (the fields of `VisualRecallSettings`, each with its meaning: `mixerzoo mixers`, docs/CONFIG.md)

Row columns: accuracy (per answer token; chance is 0.1), final_loss, initial_loss, steps,
distance and distance_max (tokens from an image's last visual token to its query's arrow,
smallest and largest over the evaluation set), tokens (sequence length), n_images, filler,
swa_window, state_bytes (bfloat16 decoder state at `tokens`), parameters (vision tower
included), tower, tower_accuracy (the pretrained tower's held-out digit accuracy: the ceiling
the decoder can reach; None from scratch), train_seconds, threads.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from mixerzoo.ablate.mqar_study import swa_window
from mixerzoo.ablate.studies import (
    PeakLR, Row, RunConfig, StudySettings, TrainSteps,
    build_spec, draw_chance, figure_title, register_study, run_device, save_figure,
)
from mixerzoo.blocks import state_nbytes
from mixerzoo.tasks.loop import answer_accuracy, fit
from mixerzoo.tasks.tower import cached_digit_tower
from mixerzoo.tasks.visual import VisualRecallConfig, derive_seed, make_visual_recall, sized_processor
from mixerzoo.vlm.model import VLM, VLMSpec
from mixerzoo.vlm.processor import ProcessorConfig
from mixerzoo.vlm.recipes import with_mrope, vlm_recipe

TRAIN, EVAL = 0, 1  # derive_seed streams: training batches and held-out batches never share a seed
EVAL_BATCH = 64


DIGIT_CHANCE = 0.1  # guessing one of ten digits


class VLMTaskSettings(StudySettings):
    """Training and evaluation settings shared by the VLM recall studies (unknown keys are an error)."""

    digits: int = Field(1, ge=1, le=4, description="digits per image (answer tokens per query)")
    image_size: int = Field(28, gt=0, description="image side in pixels (28: one visual token per image)")
    digit_source: Literal["font", "scans"] = Field("font",
        description="'font' (rendered glyphs) or 'scans' (real handwritten digits, scikit-learn's load_digits; "
                    "held-out examples use scans never trained on)")
    tower: Literal["pretrained", "scratch"] = Field("pretrained",
        description="'pretrained': load a vision tower pretrained to read the task's digits (`mixerzoo.tasks.tower`, "
                    "cached per seed in <out>/.towers, shared by every recipe of that seed) and freeze it, so the "
                    "run measures the decoder's memory; 'scratch': train the tower with the decoder (as before issue "
                    "12)")
    tower_steps: int = Field(300, gt=0, description="pretraining steps of that tower (batch 64, not scaled)")
    steps: TrainSteps = 60
    lr: PeakLR = 2e-3
    warmup_steps: int = Field(30, ge=0,
        description="linear warmup first (without it the tower stalls at the digit prior)")
    batch_size: int = Field(32, gt=0, description="training examples per step")
    eval_examples: int = Field(128, gt=0, description="held-out examples")


class VisualRecallSettings(VLMTaskSettings):
    """The `visual-recall` study's settings (a run's `settings`), validated: a misspelt key is an error."""

    n_images: int = Field(4, ge=1, le=16, description="images per example, each queried once")
    filler: int = Field(32, ge=0, description="filler text tokens between the last image and the first query")

    def tokens_per_example(self, spec) -> int:
        """Images (one visual token at 28 px, plus start / end tokens), filler, and a query of about 4 tokens per image."""
        visual = (self.image_size // 28) ** 2 + 2
        return self.n_images * (visual + 4 + self.digits) + self.filler


def vlm_spec(run: RunConfig) -> VLMSpec:
    """The VLM of `run.recipe` at `run.size` whose decoder is `build_spec(run)` (overrides applied) with M-RoPE."""
    if run.layout is not None:
        raise ValueError(f"{run.recipe}: the visual studies build a registered recipe's VLM (its vision tower "
                         f"fits the recipe's sizes); a composed layout is not supported there yet")
    base = vlm_recipe(run.recipe, run.size)
    return VLMSpec(decoder=with_mrope(build_spec(run)), vision=base.vision, processor=base.processor)


def batch_sizes(total: int, size: int) -> list[int]:
    """Batch sizes covering `total` examples in batches of at most `size`."""
    return [min(size, total - start) for start in range(0, total, size)]


def plot_accuracy_vs_distance(rows: list[Row], path: Path) -> bool:
    """Accuracy against distance (tokens) per recipe (and per other varying run field) to PNG `path`,
    with chance and the SWA window marked; False if the rows lack those columns."""
    if not rows or not all(isinstance(r.get("accuracy"), float) and isinstance(r.get("distance"), int) for r in rows):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_fields = ("recipe", "size", "seed", "window", "ratio")
    fields = [f for f in run_fields if len({r.get(f) for r in rows}) > 1] or ["recipe"]
    series: dict[str, list[Row]] = {}
    for row in rows:
        label = " ".join(f"{row.get(f)}" if f == "recipe" else f"{f}={row.get(f)}" for f in fields)
        series.setdefault(label, []).append(row)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, mine in series.items():
        mine = sorted(mine, key=lambda r: r["distance"])
        ax.plot([r["distance"] for r in mine], [r["accuracy"] for r in mine], marker="o", label=label)
    draw_chance(ax, rows, [r["accuracy"] for r in rows])
    for window in sorted({r["swa_window"] for r in rows if isinstance(r.get("swa_window"), int)}):
        ax.axvline(window, color="grey", linestyle="--", alpha=0.6)
        ax.annotate(f"SWA window {window}", (window, ax.get_ylim()[1]), fontsize=7, ha="left", va="top")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("distance from the queried image to the question (tokens, log scale)")
    ax.set_ylabel("accuracy (fraction of answer tokens)")
    ax.set_title(figure_title(rows, "recall against distance"), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, title="recipe")
    save_figure(fig, path)
    return True


def train_and_score(run: RunConfig, spec: VLMSpec, settings: Any, task: Any, processor: ProcessorConfig,
                    make: Callable[[int, int, str], dict[str, Any]], scratch: Path):
    """Build the run's VLM (its tower pretrained on `task`'s digits and frozen when settings.tower says
    so), train it on make(batch_size, seed, "train") batches for settings.steps x settings.scale
    steps and score it on make(n, seed, "test") batches (other seeds; for scanned digits, other
    scans); returns (model, fit's summary, accuracy, held-out batches, the columns of the tower)."""
    tower = dict(tower=settings.tower, tower_accuracy=None)
    torch.manual_seed(run.seed)
    model = VLM(spec).to(run_device(run))
    if settings.tower == "pretrained":
        weights, tower["tower_accuracy"] = cached_digit_tower(
            scratch.parent / ".towers", spec.vision, task, processor, steps=settings.tower_steps, seed=run.seed)
        model.visual.load_state_dict(weights)
        model.visual.requires_grad_(False)
    steps = max(1, round(settings.steps * settings.scale))
    trained = fit(model, lambda step: make(settings.batch_size, derive_seed(run.seed, TRAIN, step), "train"),
                  steps=steps, lr=settings.lr, warmup_steps=min(settings.warmup_steps, steps - 1))
    held_out = [make(n, derive_seed(run.seed, EVAL, i), "test")
                for i, n in enumerate(batch_sizes(settings.eval_examples, EVAL_BATCH))]
    return model, trained, answer_accuracy(model, held_out), held_out, tower


@register_study("visual-recall", settings=VisualRecallSettings, plot=plot_accuracy_vs_distance, score="accuracy",
                chance=lambda row: DIGIT_CHANCE)
def visual_recall_study(run: RunConfig, scratch: Path) -> list[dict[str, Any]]:
    """Train the run's VLM on visual recall per the run's settings; one row of accuracy, distance and cost."""
    settings = VisualRecallSettings.model_validate(run.settings)
    spec = vlm_spec(run)
    task = VisualRecallConfig(vocab_size=spec.decoder.vocab_size, n_images=settings.n_images, filler=settings.filler,
                              digits=settings.digits, image_size=settings.image_size,
                              digit_source=settings.digit_source)
    processor = sized_processor(spec.processor, settings.image_size)
    model, trained, accuracy, held_out, tower = train_and_score(
        run, spec, settings, task, processor,
        lambda n, seed, split: make_visual_recall(task.model_copy(update={"scan_split": split}), n, seed, processor),
        scratch)
    steps = trained["steps"]
    distances = torch.cat([batch["distance"].flatten() for batch in held_out])
    tokens = held_out[0]["input_ids"].shape[1]
    return [dict(
        accuracy=accuracy, final_loss=trained["final_loss"], initial_loss=trained["initial_loss"], steps=steps,
        distance=int(distances.min()), distance_max=int(distances.max()), tokens=tokens, n_images=task.n_images,
        filler=task.filler, digit_source=task.digit_source, swa_window=swa_window(spec.decoder), state_bytes=state_nbytes(spec.decoder, tokens, dtype=torch.bfloat16),
        parameters=sum(p.numel() for p in model.parameters()), **tower, train_seconds=trained["seconds"],
        threads=torch.get_num_threads(),
    )]
