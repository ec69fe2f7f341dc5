"""Rotary position embeddings: 1-D RoPE and Qwen2.5-VL's multimodal M-RoPE."""

from __future__ import annotations

import itertools

import torch


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
    cos = torch.cos(angles_BTF).to(x_BTHD.dtype)[:, :, None, :]  # [B, T, 1, D/2]
    sin = torch.sin(angles_BTF).to(x_BTHD.dtype)[:, :, None, :]
    x1, x2 = x_BTHD.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
