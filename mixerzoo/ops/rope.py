"""Rotary position embeddings: 1-D RoPE and Qwen2.5-VL's multimodal M-RoPE.

`rotary_tables` gives the cos / sin a rotation needs; inside `shared_rotary()` (a Decoder's forward)
the tables of one positions tensor and rope setting are made once and shared by every layer.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
from typing import Iterator

import torch

# Tables made in the current shared_rotary() block, by (positions object, head_dim, theta, sections, dtype).
_SHARED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("mixerzoo_rotary_tables", default=None)


def rotary_angles(
    positions: torch.Tensor, head_dim: int, *, theta: float, sections: tuple[int, ...] | None = None
) -> torch.Tensor:
    """Rotation angles [B, T, head_dim // 2] (float64) for integer positions.

    positions is [B, T] for 1-D RoPE, or [S, B, T] for M-RoPE with S position streams
    (temporal, height, width); `sections` then says how many of the head_dim // 2
    frequencies each stream drives, in order, and must sum to head_dim // 2.
    """
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
    half = head_dim // 2
    inv_freq = theta ** (-torch.arange(half, dtype=torch.float64, device=positions.device) / half)  # [half]
    if sections is None:
        if positions.dim() != 2:
            raise ValueError(f"1-D RoPE takes positions [B, T], got shape {list(positions.shape)}")
        return positions.to(torch.float64)[..., None] * inv_freq  # [B, T, half]
    if sum(sections) != half:
        raise ValueError(f"M-RoPE sections {list(sections)} must sum to head_dim // 2 = {half}")
    if positions.dim() != 3 or positions.shape[0] != len(sections):
        raise ValueError(
            f"M-RoPE with {len(sections)} sections takes positions [{len(sections)}, B, T], "
            f"got shape {list(positions.shape)}"
        )
    angles = positions.to(torch.float64)[..., None] * inv_freq  # [S, B, T, half]
    frequency = torch.arange(half, device=positions.device)
    stream = torch.zeros_like(frequency)  # [half]: which stream drives each frequency
    for boundary in itertools.accumulate(sections[:-1]):
        stream += frequency >= boundary  # device ops only, no host copy: safe under CUDA graph capture
    return angles.gather(0, stream.expand_as(angles[:1])).squeeze(0)  # [B, T, half]


def apply_rotary(x_BTHD: torch.Tensor, angles_BTF: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, D] by angles [B, T, D // 2] (rotate-half layout, as Llama / Qwen)."""
    return rotate(x_BTHD, *_tables(angles_BTF, x_BTHD.dtype))


def rotate(x_BTHD: torch.Tensor, cos_BT1D: torch.Tensor, sin_BT1D: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D] rotated by the tables of `rotary_tables` (rotate-half layout): x cos + rotate_half(x) sin."""
    x1, x2 = x_BTHD.chunk(2, dim=-1)
    return x_BTHD * cos_BT1D + torch.cat((-x2, x1), dim=-1) * sin_BT1D


def _tables(angles_BTF: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [B, T, 1, D] of angles [B, T, D // 2], each half repeated (rotate-half layout), in dtype."""
    full = torch.cat((angles_BTF, angles_BTF), dim=-1)[:, :, None, :]
    return torch.cos(full).to(dtype), torch.sin(full).to(dtype)


def rotary_tables(
    positions: torch.Tensor, head_dim: int, *, theta: float, sections: tuple[int, ...] | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [B, T, 1, head_dim] (in `dtype`) of `rotary_angles(positions, ...)`, for `rotate`; made once
    per positions tensor and setting inside `shared_rotary()` (a compiled step leaves sharing to the compiler)."""
    memo = None if torch.compiler.is_compiling() else _SHARED.get()
    key = (id(positions), head_dim, theta, sections, dtype)
    if memo is not None and key in memo:
        return memo[key][1]
    tables = _tables(rotary_angles(positions, head_dim, theta=theta, sections=sections), dtype)
    if memo is not None:
        memo[key] = (positions, tables)  # the positions are held, so their id is not reused within the block
    return tables


@contextlib.contextmanager
def shared_rotary() -> Iterator[None]:
    """Within the block, `rotary_tables` of the same positions tensor and setting are computed once."""
    token = _SHARED.set({})
    try:
        yield
    finally:
        _SHARED.reset(token)
