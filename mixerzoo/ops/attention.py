"""Softmax attention with grouped KV heads: causal with a key offset and an optional sliding
window, or bidirectional.

Causal: queries are the LAST Tq positions of the Tk keys: query i sits at position
Tk - Tq + i and sees keys j <= Tk - Tq + i, and with window=W only keys
j > Tk - Tq + i - W (itself and the W - 1 before it). Bidirectional (causal=False):
every query sees every key.
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from mixerzoo.ops._backend import choose_backend

# Query rows per block in the windowed torch path; a block's mask is
# [block, block + window - 1], so no mask ever grows with T.
_MIN_BLOCK, _MAX_BLOCK = 128, 2048


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | None = None,
    scale: float | None = None,
    backend: str = "auto",
    *,
    causal: bool = True,
) -> torch.Tensor:
    """Causal (optionally sliding-window) or bidirectional attention; returns o [B, Tq, Hq, Dv] in q's dtype.

    q [B, Tq, Hq, D]; k [B, Tk, Hkv, D]; v [B, Tk, Hkv, Dv]; Hq % Hkv == 0 (query head h
    reads KV head h // (Hq // Hkv)); Tk >= Tq >= 1. scale defaults to D ** -0.5.
    """
    _check_inputs(q, k, v, window)
    if not causal and window is not None:
        raise ValueError("attention: a window needs causal=True")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    name = choose_backend("attention", backend, q, supported=("flash", "torch", "flex", "fla", "reference"))
    if name == "flash" and q.dtype not in (torch.float16, torch.bfloat16):
        if backend != "auto":
            raise ValueError(f"attention: backend 'flash' takes float16 or bfloat16, got {q.dtype}; use 'torch'")
        name = "torch"
    if not causal:
        return _BIDIRECTIONAL[name](q, k, v, scale)
    return _BACKENDS[name](q, k, v, window, scale)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be [B, T, H, D], got shape {list(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    (b, tq, hq, d), (bk, tk, hkv, dk) = q.shape, k.shape
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"attention: v {list(v.shape)} must match k {list(k.shape)} in [B, Tk, Hkv]")
    if bk != b:
        raise ValueError(f"attention: batch of q ({b}) and k ({bk}) differ")
    if dk != d:
        raise ValueError(f"attention: head dim of q ({d}) and k ({dk}) differ")
    if hq % hkv:
        raise ValueError(f"attention: query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if not 1 <= tq <= tk:
        raise ValueError(f"attention: need 1 <= Tq <= Tk, got Tq={tq}, Tk={tk}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"attention: window must be a positive int or None, got {window!r}")


def _allowed(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean mask [Tq, Tk]: key j is visible from query position p."""
    allowed = key_pos[None, :] <= query_pos[:, None]
    if window is not None:
        allowed &= key_pos[None, :] > query_pos[:, None] - window
    return allowed


def _reference(q, k, v, window, scale, causal=True):
    """Masked softmax over an explicit [Tq, Tk] mask, in the inputs' dtype."""
    tq, tk = q.shape[1], k.shape[1]
    group = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(group, dim=2)  # [B, Tk, Hq, D]
    v = v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale  # [B, Hq, Tq, Tk]
    if causal:
        query_pos = torch.arange(tk - tq, tk, device=q.device)
        allowed = _allowed(query_pos, torch.arange(tk, device=q.device), window)
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v)


def _sdpa(q, k, v, scale, attn_mask=None, is_causal=False):
    """torch SDPA on [B, T, H, D] tensors."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


def _torch(q, k, v, window, scale):
    """SDPA; a sliding window runs block by block over query rows."""
    tq, tk = q.shape[1], k.shape[1]
    if window is None or window >= tk:
        if tq == 1:
            return _sdpa(q, k, v, scale)
        if tq == tk:
            return _sdpa(q, k, v, scale, is_causal=True)
        return _sdpa(q, k, v, scale, attn_mask=causal_lower_right(tq, tk))
    offset = tk - tq
    block = min(max(window, _MIN_BLOCK), _MAX_BLOCK)
    outputs = []
    for q0 in range(0, tq, block):
        q1 = min(q0 + block, tq)
        k0, k1 = max(0, offset + q0 - window + 1), offset + q1  # keys any query in the block can see
        mask = _allowed(
            torch.arange(offset + q0, offset + q1, device=q.device), torch.arange(k0, k1, device=q.device), window
        )
        outputs.append(_sdpa(q[:, q0:q1], k[:, k0:k1], v[:, k0:k1], scale, attn_mask=mask))
    return torch.cat(outputs, dim=1)


def _flash(q, k, v, window, scale):
    """flash-attn (CUDA); its causal mask is aligned to the last key, as ours."""
    from flash_attn import flash_attn_func

    window_size = (-1, -1) if window is None else (window - 1, 0)
    return flash_attn_func(q, k, v, softmax_scale=scale, causal=True, window_size=window_size)


def _fla(q, k, v, window, scale):
    """flash-linear-attention's parallel_attn (CUDA); it has no key offset, so Tq must equal Tk."""
    from fla.ops.attn import parallel_attn

    if q.shape[1] != k.shape[1]:
        raise ValueError(f"attention: backend 'fla' needs Tq == Tk, got Tq={q.shape[1]}, Tk={k.shape[1]}")
    return parallel_attn(q, k, v, scale=scale, window_size=window)


@cache
def _compiled_flex_attention():
    """flex_attention compiled once per process (its fused CUDA kernels exist only under torch.compile)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


@cache
def _flex_mask(offset: int, window: int | None):
    """The mask_mod of query i seeing keys offset + i - window < j <= offset + i, one function object per
    (offset, window): compiled FlexAttention reuses its kernel for a mask_mod it has seen."""

    def visible(batch, head, q_index, kv_index):
        position = q_index + offset
        allowed = kv_index <= position
        return allowed if window is None else allowed & (kv_index > position - window)

    return visible


def _flex(q, k, v, window, scale, causal=True):
    """PyTorch FlexAttention with a block mask of the causal key offset and window: compiled on CUDA,
    eager (an unfused reference implementation, forward only) elsewhere."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    tq, tk = q.shape[1], k.shape[1]
    block_mask = None
    if causal:
        block_mask = create_block_mask(_flex_mask(tk - tq, window), None, None, tq, tk, device=q.device)
    run = _compiled_flex_attention() if q.is_cuda else flex_attention
    out = run(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        block_mask=block_mask, scale=scale, enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


def _flash_bidirectional(q, k, v, scale):
    from flash_attn import flash_attn_func

    return flash_attn_func(q, k, v, softmax_scale=scale, causal=False)


def _fla_bidirectional(q, k, v, scale):
    raise ValueError("attention: backend 'fla' is causal only; use 'flash' or 'torch' for causal=False")


_BACKENDS = {"reference": _reference, "torch": _torch, "flash": _flash, "fla": _fla, "flex": _flex}
_BIDIRECTIONAL = {
    "reference": lambda q, k, v, scale: _reference(q, k, v, None, scale, causal=False),
    "torch": _sdpa,
    "flex": lambda q, k, v, scale: _flex(q, k, v, None, scale, causal=False),
    "flash": _flash_bidirectional,
    "fla": _fla_bidirectional,
}
