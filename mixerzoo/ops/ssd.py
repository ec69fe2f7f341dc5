"""Mamba2's state-space duality (SSD) scan with "reference", "torch" and "fla" backends."""

from __future__ import annotations

import functools

import torch

from mixerzoo.ops._common import (
    check_chunk_size, check_float_tensors, expect_shape, in_spans, recurrent_backend, without_autocast,
)
from mixerzoo.ops._chunking import flushed_exp, segment_decay, to_chunks

_OP = "ssd"
_FLA_MAX_CHUNK = 64  # the chunk fla's kernels are written and tuned for

def ssd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    backend: str = "auto",
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the Mamba2 SSD recurrence over a chunk of tokens; return the outputs and the final state.

    Per head h, with state S [P, N]:
        S_t = exp(dt_t A_h) S_{t-1} + dt_t x_t B_t^T
        y_t = S_t C_t                                   (no D skip connection)

    Args:
        x: [Bt, T, H, P] inputs.
        dt: [Bt, T, H] step sizes (> 0, already through softplus; not checked).
        A: [H] decay rates (finite, < 0; not checked).
        B, C: [Bt, T, G, N] input and output projections, H % G == 0; head h reads group h // (H // G).
        initial_state: [Bt, H, P, N] state before the first token; zeros when None.
        backend: "auto", "reference" (loop over time), "torch" (chunked) or "fla" (CUDA kernels).
        chunk_size: chunk length of the "torch" and "fla" backends ("fla" needs a power of two).

    Returns:
        y: [Bt, T, H, P] in x's dtype.
        state: [Bt, H, P, N] in float64 when any input is float64, else float32.
    """
    batch, seq_len, heads, dim_p, groups, dim_n = _check_inputs(x, dt, A, B, C, initial_state, chunk_size)
    chosen, dtype = recurrent_backend(_OP, backend, (x, dt, A, B, C))
    if chosen == "fla":
        return _fla(x, dt, A, B, C, initial_state, chunk_size)

    x_, dt_, A_, B_, C_ = (t.to(dtype) for t in (x, dt, A, B, C))
    if initial_state is None:
        state = x_.new_zeros(batch, heads, dim_p, dim_n)
    else:
        state = initial_state.to(dtype)
    xdt = x_ * dt_[..., None]  # [Bt, T, H, P]
    log_decay = dt_ * A_  # [Bt, T, H], <= 0
    with without_autocast(x.device):
        if chosen == "reference" or seq_len == 1:
            y, state = _recurrent(xdt, log_decay, B_, C_, state)
            return y.to(x.dtype), state
        return in_spans(functools.partial(_chunked, chunk_size=chunk_size), (xdt, log_decay, B_, C_), state, chunk_size,
                        x.dtype)


def _check_inputs(x, dt, A, B, C, initial_state, chunk_size):
    """Validate shapes, dtypes and devices; return (Bt, T, H, P, G, N)."""
    named = {"x": x, "dt": dt, "A": A, "B": B, "C": C, "initial_state": initial_state}
    check_float_tensors(_OP, named)
    if x.dim() != 4:
        raise ValueError(f"{_OP}: x must be [Bt, T, H, P], got {list(x.shape)}")
    batch, seq_len, heads, dim_p = x.shape
    expect_shape(_OP, dt, "dt", "[Bt, T, H]", (batch, seq_len, heads))
    expect_shape(_OP, A, "A", "[H]", (heads,))
    if B.dim() != 4 or B.shape[:2] != (batch, seq_len):
        raise ValueError(f"{_OP}: B must be [Bt, T, G, N] with [Bt, T] = {[batch, seq_len]}, got {list(B.shape)}")
    groups, dim_n = B.shape[2:]
    if heads % groups:
        raise ValueError(f"{_OP}: x has H = {heads} heads, not a multiple of the G = {groups} groups of B and C")
    expect_shape(_OP, C, "C", "[Bt, T, G, N]", (batch, seq_len, groups, dim_n))
    if initial_state is not None:
        expect_shape(_OP, initial_state, "initial_state", "[Bt, H, P, N]", (batch, heads, dim_p, dim_n))
    if seq_len == 0:
        raise ValueError(f"{_OP}: T must be at least 1, got x of shape {list(x.shape)}")
    check_chunk_size(_OP, chunk_size)
    return batch, seq_len, heads, dim_p, groups, dim_n


def _recurrent(xdt, log_decay, B, C, state):
    """Loop over time. xdt = x dt [Bt, T, H, P]; log_decay [Bt, T, H]; B, C [Bt, T, G, N]; state [Bt, H, P, N]."""
    groups = B.shape[2]
    xdt, log_decay = xdt.unflatten(2, (groups, -1)), log_decay.unflatten(2, (groups, -1))  # head h = (g, r)
    state = state.unflatten(1, (groups, -1))  # [Bt, G, R, P, N]
    outputs = []
    for t in range(xdt.shape[1]):
        write = xdt[:, t, :, :, :, None] * B[:, t, :, None, None, :]  # [Bt, G, R, P, N]
        state = state * log_decay[:, t].exp()[..., None, None] + write
        outputs.append(torch.einsum("bgrpn,bgn->bgrp", state, C[:, t]))
    return torch.stack(outputs, dim=1).flatten(2, 3), state.flatten(1, 2)  # [Bt, T, H, P], [Bt, H, P, N]


def _chunked(xdt, log_decay, B, C, state, chunk_size):
    """Chunked SSD: the quadratic form within chunks, the state carried across them. Shapes as in `_recurrent`.

    The heads that share a group of B and C are laid side by side ([.., R * P]), so B C^T is formed once
    per group and the state is carried transposed, [N, R * P] per group.
    """
    batch, seq_len, heads, dim_p = xdt.shape
    groups, dim_n = B.shape[2:]
    ratio = heads // groups
    size = min(chunk_size, seq_len)
    n_chunks = -(-seq_len // size)

    xdt_c = to_chunks(xdt.reshape(batch, -1, groups, ratio * dim_p), size)  # [n, BG, L, R*P]; padded steps write nothing
    B_c, C_c = to_chunks(B, size), to_chunks(C, size)  # [n, BG, L, N]
    log_decay_c = to_chunks(log_decay.unflatten(2, (groups, ratio)), size).transpose(-1, -2)  # [n, BG, R, L]
    decay_t = segment_decay(log_decay_c[..., None])[..., 0]  # [n, BG, R, L, L]: exp(a_{j+1} + ... + a_i) at (source j, target i)
    cum = log_decay_c.cumsum(-1)  # [n, BG, R, L], from the chunk start
    decay_in = flushed_exp(cum).transpose(-1, -2)[..., None]  # [n, BG, L, R, 1]: from the chunk start to step i
    decay_out = decay_t[..., -1].transpose(-1, -2)[..., None]  # [n, BG, L, R, 1]: from step j to the chunk end
    decay_all = decay_in[:, :, -1:]  # [n, BG, 1, R, 1]: across the chunk

    xdt_heads = xdt_c.unflatten(-1, (ratio, dim_p))  # [n, BG, L, R, P]
    inject = B_c.transpose(-1, -2) @ (decay_out * xdt_heads).flatten(-2)  # [n, BG, N, R*P]
    state = state.unflatten(1, (groups, ratio)).permute(0, 1, 4, 2, 3).reshape(-1, dim_n, ratio, dim_p)
    inject = inject.unflatten(-1, (ratio, dim_p))  # [n, BG, N, R, P]
    starts = []
    for i in range(n_chunks):
        starts.append(state)
        state = torch.addcmul(inject[i], decay_all[i], state)  # [BG, N, R, P]: S_end^T = decay S0^T + inject
    start = torch.stack(starts).flatten(-2)  # [n, BG, N, R*P]

    mix_t = decay_t * (B_c @ C_c.mT)[:, :, None]  # [n, BG, R, L, L]: (C_i . B_j) decay at (j, i)
    y = (mix_t.mT @ xdt_heads.transpose(2, 3)).transpose(2, 3)  # [n, BG, L, R, P], within the chunk
    y = y.addcmul_(decay_in, (C_c @ start).unflatten(-1, (ratio, dim_p)))  # from the chunk's start state
    y = y.reshape(n_chunks, batch, groups, size, ratio, dim_p).permute(1, 0, 3, 2, 4, 5)
    state = state.unflatten(0, (batch, groups)).permute(0, 1, 3, 4, 2)  # [Bt, G, R, P, N]
    return y.reshape(batch, n_chunks * size, heads, dim_p)[:, :seq_len], state.reshape(batch, heads, dim_p, dim_n)


def _fla(x, dt, A, B, C, initial_state, chunk_size):
    """flash-linear-attention's simple-GLA kernel (CUDA): q = C, k = B, v = x dt, g = A dt, scale 1.

    Its state is ours transposed, [Bt, H, N, P]. Its Triton tiles are [chunk, chunk]: chunks longer than
    _FLA_MAX_CHUNK (Mamba2's default 256) run as _FLA_MAX_CHUNK, which changes rounding only.
    """
    from fla.ops.simple_gla import chunk_simple_gla

    if chunk_size & (chunk_size - 1):
        raise ValueError(f"{_OP}: backend 'fla' takes a power-of-two chunk_size, got {chunk_size}")
    chunk_size = min(chunk_size, _FLA_MAX_CHUNK)
    ratio = x.shape[2] // B.shape[2]
    q, k = (t.to(x.dtype).repeat_interleave(ratio, dim=2) for t in (C, B))  # [Bt, T, H, N]
    v = (x * dt[..., None]).to(x.dtype)  # [Bt, T, H, P]
    g = dt.to(torch.float32) * A.to(torch.float32)  # [Bt, T, H]
    if initial_state is not None:
        initial_state = initial_state.to(torch.float32).transpose(-1, -2).contiguous()  # [Bt, H, N, P]
    y, state = chunk_simple_gla(
        q, k, v, g=g, scale=1.0, initial_state=initial_state, output_final_state=True, chunk_size=chunk_size
    )
    return y.to(x.dtype), state.to(torch.float32).transpose(-1, -2)
