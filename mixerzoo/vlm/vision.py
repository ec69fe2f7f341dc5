"""Qwen2.5-VL vision tower (InfiniteVL's, unchanged): a ViT over 3-D patches with 2-D rotary and
window attention, ending in a 2x2 patch merger that emits one LLM-width token per merged patch.

Input is the processor's flat patch list: for each image or video (one row of grid_thw =
(t, h, w) in patches), t frame groups of h * w patches, each frame's patches in merge-block
order (the merge x merge patches of one merged token are adjacent, merged tokens row-major).
Every block but the full-attention ones attends within windows of window_size pixels
(window_size // (patch_size * merge) merged tokens a side, cut from each frame's top-left,
smaller at the bottom and right edges); full-attention blocks attend within each frame.
Parameter names equal Hugging Face's Qwen2.5-VL vision module, so its state_dict loads as is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from pydantic import Field, model_validator
from torch import nn
from typing_extensions import Self

from mixerzoo.blocks import SwiGLU
from mixerzoo.ops import Backend, apply_rotary, attention, rotary_angles
from mixerzoo.vlm.processor import grid_rows
from mixerzoo.errors import StrictModel


class VisionConfig(StrictModel):
    """Sizes of the vision tower; the defaults are Qwen2.5-VL-3B's (InfiniteVL's tower)."""

    depth: int = Field(32, gt=0, description="transformer blocks")
    hidden_size: int = Field(1280, gt=0, description="ViT width")
    num_heads: int = Field(16, gt=0, description="attention heads per vision block")
    intermediate_size: int = Field(3420, gt=0, description="SwiGLU inner width")
    patch_size: int = Field(14, gt=0, description="patch side in pixels")
    temporal_patch_size: int = Field(2, gt=0, description="frames per patch")
    spatial_merge_size: int = Field(2, gt=0, description="patches per merged token, a side")
    window_size: int = Field(112, gt=0, description="attention window side in pixels")
    fullatt_block_indexes: tuple[int, ...] = Field((7, 15, 23, 31), description="blocks attending to whole frames")
    out_hidden_size: int = Field(2048, gt=0, description="merger output width (the LLM's d_model)")
    in_channels: int = Field(3, gt=0, description="image channels (RGB)")
    rms_norm_eps: float = Field(1e-6, gt=0, description="eps of every RMSNorm (blocks and merger)")
    rope_theta: float = Field(10000.0, gt=0, description="base of the 2-D rotary frequencies")
    backend: Backend = Field("auto", description="backend of mixerzoo.ops.attention")

    @model_validator(mode="after")
    def _shapes_fit(self) -> Self:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size})")
        if self.head_dim % 4:
            raise ValueError(
                f"head_dim = hidden_size // num_heads = {self.head_dim} must be a multiple of 4 "
                "(2-D rotary gives half the head to rows, half to columns, each rotated in pairs)"
            )
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"fullatt_block_indexes {bad} out of range for depth {self.depth} (need 0 <= i < depth)")
        merged_patch = self.patch_size * self.spatial_merge_size
        if self.window_size % merged_patch:
            raise ValueError(
                f"window_size ({self.window_size}) must be a multiple of patch_size * spatial_merge_size "
                f"({self.patch_size} * {self.spatial_merge_size} = {merged_patch}) pixels"
            )
        return self

    @property
    def head_dim(self) -> int:
        """Per-head width."""
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values per input patch: in_channels * temporal_patch_size * patch_size ** 2."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def window_merged(self) -> int:
        """Window side in merged tokens."""
        return self.window_size // (self.patch_size * self.spatial_merge_size)


@dataclasses.dataclass(frozen=True)
class _Segments:
    """A partition of the N patch rows into attention segments, laid out so that segments of
    equal length are adjacent and each run of them is one batched attention call."""

    order: torch.Tensor  # [N] patch rows, segment after segment (ascending length)
    inverse: torch.Tensor  # [N] where each patch row sits in `order`
    groups: tuple[tuple[int, int], ...]  # (number of segments, length) of each run, in `order`


def _segments(segment_id: torch.Tensor, sizes: list[int]) -> _Segments:
    """Segments from a segment id per patch row ([N] long) and each id's row count (`sizes`, known on
    the host from the grid, so nothing is read back from the device); rows keep their order inside a segment."""
    count = torch.tensor(sizes, dtype=torch.long).to(segment_id.device, non_blocking=True)  # [S] rows per id
    length = count[segment_id]  # [N] length of each row's segment
    order = torch.argsort(length * len(sizes) + segment_id, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    runs: dict[int, int] = {}
    for size in sizes:  # equal lengths are adjacent in `order`, shortest first
        runs[size] = runs.get(size, 0) + 1
    groups = tuple((runs[n], n) for n in sorted(runs))
    return _Segments(order=order, inverse=inverse, groups=groups)


def _patch_layout(
    grid: list[tuple[int, int, int]], merge: int, window: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[int], list[int]]:
    """Per patch row, in input order: (row, column) in its frame, and the global ids of its frame and
    of its attention window (four [N] long tensors); then the rows of each frame and of each window."""
    rows, cols, frames, windows = [], [], [], []
    frame_sizes: list[int] = []
    window_sizes: list[int] = []
    frame_base = window_base = 0
    for t, h, w in grid:
        hm, wm = h // merge, w // merge  # merged tokens a side
        n_win_h, n_win_w = -(-hm // window), -(-wm // window)
        frame_sizes += [h * w] * t
        sides_h = [min(window, hm - i * window) for i in range(n_win_h)]
        sides_w = [min(window, wm - j * window) for j in range(n_win_w)]
        window_sizes += [a * b * merge * merge for a in sides_h for b in sides_w] * t
        shape = (t, hm, wm, merge, merge)  # input order: frame, merged row, merged column, inner row, inner column
        f = torch.arange(t, device=device).view(t, 1, 1, 1, 1)
        bh = torch.arange(hm, device=device).view(1, hm, 1, 1, 1)
        bw = torch.arange(wm, device=device).view(1, 1, wm, 1, 1)
        ih = torch.arange(merge, device=device).view(1, 1, 1, merge, 1)
        iw = torch.arange(merge, device=device).view(1, 1, 1, 1, merge)
        rows.append((bh * merge + ih).expand(shape).flatten())
        cols.append((bw * merge + iw).expand(shape).flatten())
        frames.append((frame_base + f).expand(shape).flatten())
        win = window_base + (f * n_win_h + bh // window) * n_win_w + bw // window
        windows.append(win.expand(shape).flatten())
        frame_base += t
        window_base += t * n_win_h * n_win_w
    return torch.cat(rows), torch.cat(cols), torch.cat(frames), torch.cat(windows), frame_sizes, window_sizes


class PatchEmbed(nn.Module):
    """3-D patch embedding: a Conv3d whose kernel is one whole patch (no bias)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        kernel = (config.temporal_patch_size, config.patch_size, config.patch_size)
        self.proj = nn.Conv3d(config.in_channels, config.hidden_size, kernel_size=kernel, stride=kernel, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, C * tp * p * p] -> [N, hidden], in the weight's dtype."""
        weight = self.proj.weight  # [hidden, C, tp, p, p]; one kernel position per patch, so a matmul
        return nn.functional.linear(pixel_values.to(weight.dtype), weight.flatten(1))


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention with 2-D rotary, within given segments of the patch rows."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads, self.head_dim, self.backend = config.num_heads, config.head_dim, config.backend
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, angles: torch.Tensor, segments: _Segments) -> torch.Tensor:
        """x [N, hidden]; angles [1, N, head_dim // 2] -> [N, hidden]; each row attends to its segment."""
        n, heads, dim = x.shape[0], self.num_heads, self.head_dim
        q, k, v = self.qkv(x).view(n, 3, heads, dim).unbind(1)  # each [N, H, D]
        q, k = _rotate(q, angles), _rotate(k, angles)
        qkv = torch.stack((q, k, v))[:, segments.order]  # [3, N, H, D], segments of equal length adjacent
        outputs, start = [], 0
        for count, length in segments.groups:
            stop = start + count * length
            q_b, k_b, v_b = qkv[:, start:stop].reshape(3, count, length, heads, dim)  # each [count, length, H, D]
            o = attention(q_b, k_b, v_b, causal=False, backend=self.backend)
            outputs.append(o.reshape(count * length, heads * dim))
            start = stop
        return self.proj(torch.cat(outputs)[segments.inverse])  # back to input order


def _rotate(x_NHD: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotary on [N, H, D] in at least float32 (as Qwen2.5-VL for bf16), returned in x's dtype."""
    work = torch.promote_types(x_NHD.dtype, torch.float32)
    return apply_rotary(x_NHD[None].to(work), angles)[0].to(x_NHD.dtype)


class VisionBlock(nn.Module):
    """Pre-norm residual block: x + attn(norm1(x)), then x + SwiGLU(norm2(x)) (MLP with bias)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.norm2 = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attn = VisionAttention(config)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, bias=True)

    def forward(self, x: torch.Tensor, angles: torch.Tensor, segments: _Segments) -> torch.Tensor:
        """x [N, hidden] -> [N, hidden]."""
        x = x + self.attn(self.norm1(x), angles, segments)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """RMSNorm each patch, concatenate the merge x merge patches of a merged token, then a GELU MLP."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        merged = config.hidden_size * config.spatial_merge_size**2
        self.ln_q = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = nn.Sequential(nn.Linear(merged, merged), nn.GELU(), nn.Linear(merged, config.out_hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, hidden] in merge-block order -> [N / merge^2, out_hidden_size]."""
        return self.mlp(self.ln_q(x).reshape(-1, self.mlp[0].in_features))


class VisionTower(nn.Module):
    """The Qwen2.5-VL vision encoder: patches of images and videos in, one LLM-width token per merged patch out."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(config)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
        """pixel_values [N, C * tp * p * p]; grid_thw [n, 3] (t, h, w in patches per image or video,
        sum of t * h * w = N; a long tensor or host ints) -> [N / merge^2, out_hidden_size], merged tokens in input order."""
        c = self.config
        grid = self._check_inputs(pixel_values, grid_thw)
        rows, cols, frames, windows, frame_sizes, window_sizes = _patch_layout(
            grid, c.spatial_merge_size, c.window_merged, pixel_values.device
        )
        # Rows drive the first half of the rotary frequencies, columns the second (each: 1-D RoPE of head_dim // 2).
        angles = torch.cat(
            [rotary_angles(pos[None], c.head_dim // 2, theta=c.rope_theta) for pos in (rows, cols)], dim=-1
        )  # [1, N, head_dim // 2]
        full, windowed = _segments(frames, frame_sizes), _segments(windows, window_sizes)
        x = self.patch_embed(pixel_values)  # [N, hidden]
        for i, block in enumerate(self.blocks):
            x = block(x, angles, full if i in c.fullatt_block_indexes else windowed)
        return self.merger(x)

    def _check_inputs(self, pixel_values: torch.Tensor, grid_thw) -> list[tuple[int, int, int]]:
        """The grid's rows (host ints), once pixel_values and grid_thw are known to fit each other."""
        c = self.config
        if pixel_values.dim() != 2 or pixel_values.shape[1] != c.patch_dim:
            raise ValueError(
                f"pixel_values must be [N, {c.patch_dim}] (in_channels * temporal_patch_size * patch_size^2 = "
                f"{c.in_channels} * {c.temporal_patch_size} * {c.patch_size}^2), got shape {list(pixel_values.shape)}"
            )
        is_tensor = isinstance(grid_thw, torch.Tensor)
        if is_tensor and (grid_thw.dim() != 2 or grid_thw.shape[1] != 3 or grid_thw.is_floating_point()
                          or grid_thw.is_complex()):
            raise ValueError(
                f"grid_thw must be an integer [n, 3] tensor of (t, h, w), got {grid_thw.dtype} {list(grid_thw.shape)}"
            )
        rows = grid_rows(grid_thw, "grid_thw")  # one read of a tensor grid; a list is used as is
        if not rows:
            raise ValueError("grid_thw is empty: need at least one image or video")
        m = c.spatial_merge_size
        if any(h % m or w % m for _, h, w in rows):
            raise ValueError(f"grid_thw heights and widths must be multiples of spatial_merge_size {m}, got {rows}")
        expected = sum(t * h * w for t, h, w in rows)
        if expected != pixel_values.shape[0]:
            raise ValueError(
                f"grid_thw describes {expected} patches (sum of t * h * w) "
                f"but pixel_values has {pixel_values.shape[0]} rows"
            )
        return rows
