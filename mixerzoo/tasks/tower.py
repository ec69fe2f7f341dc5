"""A vision tower pretrained to read digits, shared and frozen by the VLM recall studies.

A recall study asks whether a decoder keeps what it saw; learning to read glyphs from scratch
in the same run confounds that with the tower's own learning speed (every recipe then sits at
the digit prior). As InfiniteVL's students inherit the teacher's tower, each recall run can
instead load a tower pretrained here, on the task's own images (single digit images, the
training split of the scans or rendered glyphs), and freeze it: every recipe of one seed
reads the same features, and only the decoder's memory differs.

Pretraining fits the tower (patch embedding, blocks, merger) plus a linear head per digit on
the mean of each image's merged tokens; a temporal patch of a video key frame is the same two
identical frames as an image's, so the same tower serves the stream study. Towers are cached
as safetensors under a key of everything that determines them (written atomically, built once
per key under a file lock, so parallel runs share one).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from mixerzoo.mixers.base import atomic_save_safetensors
from mixerzoo.tasks.loop import answer_loss
from mixerzoo.tasks.visual import _VisualTaskConfig, derive_seed, render_digits
from mixerzoo.vlm.processor import ProcessorConfig, process_images
from mixerzoo.vlm.vision import VisionConfig, VisionTower

TRAIN, EVAL = 2, 3  # derive_seed streams, apart from the recall studies' own (0 and 1)


class DigitReader(nn.Module):
    """A vision tower plus one linear head per digit over the mean of each image's merged tokens."""

    def __init__(self, vision: VisionConfig, digits: int):
        super().__init__()
        self.tower = VisionTower(vision)
        self.head = nn.Linear(vision.out_hidden_size, 10 * digits)
        self.digits = digits

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Images -> digit logits [N_images, digits, 10]."""
        tokens = self.tower(pixel_values, grid_thw)  # [N_tokens, out_hidden]
        per_image = (grid_thw.prod(-1) // self.tower.config.spatial_merge_size**2).tolist()
        pooled = torch.stack([t.mean(0) for t in tokens.split(per_image)])  # [N_images, out_hidden]
        return self.head(pooled).unflatten(-1, (self.digits, 10))


def digit_batch(task: _VisualTaskConfig, processor: ProcessorConfig, n: int, seed: int, split: str):
    """`n` single digit images of `task`'s source from `split`: (pixel_values, grid_thw, digits [n, D])."""
    rng = np.random.default_rng(seed)
    task = task.model_copy(update={"scan_split": split})
    digits = rng.integers(0, 10, size=(n, task.digits))
    pixels, grid = process_images([render_digits(d, task, rng) for d in digits], processor)
    return pixels, grid, torch.from_numpy(digits)


def pretrain_digit_tower(vision: VisionConfig, task: _VisualTaskConfig, processor: ProcessorConfig, *, steps: int,
                         seed: int, batch_size: int = 64, lr: float = 2e-3, eval_images: int = 512) -> tuple[dict, float]:
    """Train a DigitReader on `task`'s digit images; returns (the tower's state_dict, held-out digit
    accuracy on the test split)."""
    if steps < 1:
        raise ValueError(f"pretrain_digit_tower: steps must be >= 1, got {steps}")
    torch.manual_seed(seed)
    reader = DigitReader(vision, task.digits)
    optimizer = torch.optim.AdamW(reader.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * s / steps)))
    reader.train()
    for step in range(steps):
        pixels, grid, digits = digit_batch(task, processor, batch_size, derive_seed(seed, TRAIN, step), "train")
        loss = answer_loss(reader(pixels, grid), digits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reader.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
    reader.eval()
    with torch.no_grad():
        pixels, grid, digits = digit_batch(task, processor, eval_images, derive_seed(seed, EVAL), "test")
        accuracy = (reader(pixels, grid).argmax(-1) == digits).float().mean().item()
    return reader.tower.state_dict(), accuracy


def cached_digit_tower(cache_dir: Path, vision: VisionConfig, task: _VisualTaskConfig, processor: ProcessorConfig, *,
                       steps: int, seed: int) -> tuple[dict, float]:
    """`pretrain_digit_tower`'s result, from `cache_dir` when a tower with the same key was built before."""
    fields = ("digits", "image_size", "font_size", "noise", "digit_source")
    key = json.dumps(dict(vision=vision.model_dump(mode="json"), task={f: getattr(task, f) for f in fields},
                          processor=processor.model_dump(mode="json"), steps=steps, seed=seed), sort_keys=True)
    name = "tower-" + hashlib.sha256(key.encode()).hexdigest()[:16]
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{name}.safetensors"
    with open(cache_dir / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a parallel run with the same key waits, then reads the file
        if not path.exists():
            state, accuracy = pretrain_digit_tower(vision, task, processor, steps=steps, seed=seed)
            atomic_save_safetensors({k: v.contiguous() for k, v in state.items()}, path,
                                    {"accuracy": repr(accuracy), "key": key})
    with safe_open(str(path), "pt") as handle:  # one read: the weights and the accuracy beside them
        return {k: handle.get_tensor(k) for k in handle.keys()}, float(handle.metadata()["accuracy"])


__all__ = ["DigitReader", "cached_digit_tower", "digit_batch", "pretrain_digit_tower"]
