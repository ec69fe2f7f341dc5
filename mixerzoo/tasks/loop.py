"""Training and scoring of a model on a synthetic task's batches: one loop for every task.

A batch is a dict with input_ids and labels [B, T] (labels aligned with the logits, IGNORE where
nothing is asked), optionally valid / documents [B, T] (padded or packed rows) and, for a VLM,
its media (MEDIA_INPUTS).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F

from mixerzoo.optim import weight_decay_groups
from mixerzoo.vlm.model import VLM

IGNORE = -100
MEDIA_INPUTS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
MODEL_INPUTS = ("input_ids", "valid", "documents", *MEDIA_INPUTS)
Batch = dict[str, Any]


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy of logits [B, T, V] over the answer positions (labels != IGNORE) of labels [B, T]."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)


def task_logits(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Logits [B, T, V] of a Decoder or VLM on a batch (its model inputs moved to the model's device)."""
    if not isinstance(model, VLM) and any(k in batch for k in MEDIA_INPUTS):
        raise ValueError("the batch holds images or video but the model is a text-only Decoder")
    device = next(model.parameters()).device
    inputs = {k: batch[k].to(device) for k in MODEL_INPUTS if k in batch}
    logits, _ = model(inputs.pop("input_ids"), **inputs)
    return logits


def fit(model: torch.nn.Module, batches: Callable[[int], Batch], *, steps: int, lr: float, weight_decay: float = 0.1,
        grad_clip: float = 1.0, schedule: str = "cosine", warmup_steps: int = 0) -> dict:
    """Train `model` in place on `batches(step)` for `steps` steps (AdamW with weight decay on the
    matrices only (mixerzoo.optim), linear warmup over `warmup_steps`, then cosine decay to 0 or
    constant lr, gradient clipping); returns {"losses",
    "initial_loss", "final_loss" (mean of the last tenth), "steps", "seconds"}."""
    if steps < 1 or warmup_steps < 0:
        raise ValueError(f"steps must be >= 1 and warmup_steps >= 0, got {steps}, {warmup_steps}")
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    optimizer = torch.optim.AdamW(weight_decay_groups(model, weight_decay), lr=lr)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / (steps - warmup_steps)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    model.train()
    losses, start = [], time.perf_counter()
    for step in range(steps):
        batch = batches(step)
        logits = task_logits(model, batch)
        loss = answer_loss(logits, batch["labels"].to(logits.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    tail = losses[-max(1, steps // 10):]
    return {"losses": losses, "initial_loss": losses[0], "final_loss": sum(tail) / len(tail), "steps": steps,
            "seconds": time.perf_counter() - start}


@torch.no_grad()
def answer_accuracy(model: torch.nn.Module, batches: Iterable[Batch]) -> float:
    """Fraction of answer positions (labels != IGNORE) over `batches` where the model's argmax equals the label."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for batch in batches:
        logits = task_logits(model, batch)
        labels = batch["labels"].to(logits.device)
        answered = labels != IGNORE
        correct += (logits.argmax(-1)[answered] == labels[answered]).sum().item()
        total += answered.sum().item()
    model.train(was_training)
    if total == 0:
        raise ValueError("answer_accuracy: the batches hold no answer positions")
    return correct / total
