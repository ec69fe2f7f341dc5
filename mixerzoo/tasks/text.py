"""Real text for language modelling without downloads: the Python standard library's own source.

Every `.py` file under the running interpreter's stdlib directory (site-packages and test
suites left out), read as UTF-8 bytes: a byte-level corpus for a 256-token vocabulary. Files
are split into training and validation by a hash of their path relative to the stdlib, so the
split is the same on every machine with the same Python version.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from mixerzoo.errors import StrictModel

_EXCLUDED_PARTS = {"site-packages", "test", "tests", "idlelib", "__pycache__"}


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Sorted stdlib source files (paths under `root`, default the interpreter's stdlib)."""
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else Path(root)
    files = sorted(p for p in root.rglob("*.py") if not _EXCLUDED_PARTS & set(p.relative_to(root).parts[:-1]))
    if not files:
        raise FileNotFoundError(f"no .py files under {root}: the stdlib corpus needs the interpreter's source files")
    return files


def stdlib_corpus(split: str, *, validation_fraction: float = 0.05, root: Path | None = None) -> torch.Tensor:
    """The `split` ("train" or "validation") bytes of the stdlib corpus as uint8 [N], files in path order,
    each followed by a NUL byte (0 never occurs in source text)."""
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else Path(root)
    chunks = []
    for path in stdlib_files(root):
        digest = hashlib.sha256(path.relative_to(root).as_posix().encode()).digest()
        if (int.from_bytes(digest[:8], "big") / 2**64 < validation_fraction) == (split == "validation"):
            chunks.append(path.read_bytes() + b"\0")
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)


def text_windows(corpus: torch.Tensor, n_windows: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n_windows` random windows of `length` + 1 bytes of `corpus` -> (input_ids [N, length], labels [N, length]),
    labels the next byte of each input (aligned with the logits); the same seed gives the same windows."""
    if corpus.numel() <= length + 1:
        raise ValueError(f"the corpus has {corpus.numel()} bytes, fewer than a window of {length + 1}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(corpus.numel() - length - 1, (n_windows,), generator=generator)
    windows = corpus[starts[:, None] + torch.arange(length + 1)].long()
    return windows[:, :-1], windows[:, 1:]


class TextWindowsConfig(StrictModel):
    """Random byte windows of the stdlib corpus (the training data source `stdlib-text`)."""

    seq_len: int = Field(gt=0, description="bytes per window (each window's labels are the next bytes)")
    split: Literal["train", "validation"] = Field("train", description="the corpus split the windows come from")


def position_losses(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 32) -> torch.Tensor:
    """Mean next-token cross entropy at each position over the windows inputs, labels [N, T] -> [T]."""
    model.eval()
    total = torch.zeros(inputs.shape[1], dtype=torch.float64)
    for start in range(0, inputs.shape[0], batch_size):
        device = next(model.parameters()).device
        logits, _ = model(inputs[start:start + batch_size].to(device))
        loss = F.cross_entropy(logits.transpose(1, 2).float(), labels[start:start + batch_size].to(device),
                               reduction="none")
        total += loss.sum(0).double().cpu()
    model.train()
    return total / inputs.shape[0]
