"""The `mqar` study: train a recipe's Decoder on MQAR and measure recall accuracy.

One run trains a fresh model (seeded by the run's seed) on fresh MQAR batches and
evaluates it on examples from a different seed. Settings (unknown keys are an error):

    (the fields of `MQARSettings`, each with its meaning: `mixerzoo mixers`, docs/CONFIG.md)

The vocabulary is the spec's (256 at tiny). The run's `n_layers` / `d_model` overrides give
zoology's 2-layer models and width sweeps. Row columns: seq_len, n_pairs, swa_window (the
largest sliding window in the spec, None without one), accuracy, within_window (fraction of
the evaluation queries whose value lies inside that window: what a window alone can reach),
final_loss, initial_loss, steps, state_bytes (bfloat16 model state at seq_len tokens),
parameters, train_seconds, threads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from mixerzoo.ablate.studies import (
    PeakLR, RunConfig, StudySettings, TrainSteps, WarmupSteps, WeightDecay, build_spec, register_study, run_device,
)
from mixerzoo.blocks import Decoder, LayoutSpec, parameter_count, state_nbytes
from mixerzoo.registry import recipe
from mixerzoo.tasks.mqar import MQARConfig, chance_accuracy, evaluate_mqar, make_mqar, train_mqar, value_distances

EVAL_SEED_OFFSET = 2**32  # evaluation data seed = run seed + this: never a training seed of another run


class MQARSettings(StudySettings):
    """The `mqar` study's settings (a run's `settings`), validated: a misspelt key is an error."""

    seq_len: int = Field(gt=0, description="tokens per example (the MQAR shape)")
    n_pairs: int = Field(gt=0, description="key-value pairs per example, each queried once")
    vocab_size: int | None = Field(None, gt=0,
        description="the task's vocabulary (keys [1, V/2), values [V/2, V)), which the model then has too (zoology's "
                    "models are sized to the task); default the spec's")
    steps: TrainSteps = 300
    lr: PeakLR = 3e-3
    warmup_steps: WarmupSteps = 0
    weight_decay: WeightDecay = 0.1
    batch_size: int = Field(32, gt=0, description="training examples per step")
    eval_examples: int = Field(512, gt=0, description="held-out examples")
    power_a: float = Field(0.01, gt=0, le=1, description="query-placement power law")

    def check_spec(self, spec: LayoutSpec) -> None:
        """The MQAR shape must fit the vocabulary the model gets (the setting's, else the spec's)."""
        MQARConfig(vocab_size=self.vocab_size or spec.vocab_size, seq_len=self.seq_len, n_pairs=self.n_pairs,
                   power_a=self.power_a)


def swa_window(spec: LayoutSpec) -> int | None:
    """The largest sliding window among the spec's attention layers; None if it has none."""
    windows = [layer.mixer.window for layer in spec.layers if getattr(layer.mixer, "window", None) is not None]
    return max(windows, default=None)


def within_window(task: MQARConfig, spec: LayoutSpec, seed: int, n_examples: int) -> float | None:
    """Fraction of the evaluation queries whose value token lies inside the spec's sliding window
    (the best a model whose every layer is that window can recall without relaying through
    layers); None without a window."""
    window = swa_window(spec)
    if window is None:
        return None
    inputs, labels = make_mqar(task, n_examples, seed)
    return float((value_distances(inputs, labels) < window).double().mean())


@register_study("mqar", settings=MQARSettings, score="accuracy",
                chance=lambda row: chance_accuracy(row.get("vocab_size") or recipe(row["recipe"], row["size"]).vocab_size))
def mqar_study(run: RunConfig, scratch: Path) -> list[dict[str, Any]]:
    """Train `Decoder(build_spec(run))` on MQAR per the run's settings; one row of accuracy, loss, cost."""
    settings = MQARSettings.model_validate(run.settings)
    spec = build_spec(run)
    if settings.vocab_size is not None:
        spec = LayoutSpec.model_validate({**spec.model_dump(mode="json"), "vocab_size": settings.vocab_size})
    task = MQARConfig(vocab_size=settings.vocab_size or spec.vocab_size, seq_len=settings.seq_len, n_pairs=settings.n_pairs,
                      power_a=settings.power_a)
    torch.manual_seed(run.seed)
    model = Decoder(spec).to(run_device(run))
    steps = max(1, round(settings.steps * settings.scale))
    trained = train_mqar(model, task, steps=steps, batch_size=settings.batch_size, lr=settings.lr, seed=run.seed,
                         weight_decay=settings.weight_decay, warmup_steps=min(settings.warmup_steps, steps - 1))
    accuracy = evaluate_mqar(model, task, settings.eval_examples, run.seed + EVAL_SEED_OFFSET)
    return [dict(
        seq_len=task.seq_len, n_pairs=task.n_pairs, vocab_size=task.vocab_size, swa_window=swa_window(spec), accuracy=accuracy,
        within_window=within_window(task, spec, run.seed + EVAL_SEED_OFFSET, settings.eval_examples),
        final_loss=trained["final_loss"], initial_loss=trained["initial_loss"], steps=steps,
        state_bytes=state_nbytes(spec, task.seq_len, dtype=torch.bfloat16), parameters=parameter_count(spec),
        train_seconds=trained["seconds"], threads=torch.get_num_threads(),
    )]
