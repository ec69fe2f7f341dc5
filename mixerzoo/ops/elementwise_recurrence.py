"""Elementwise linear recurrence (HGRN, RG-LRU, Mamba1's selective scan) with "reference", "torch" and "fla" backends."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mixerzoo.ops._chunking import flushed_exp
from mixerzoo.ops._common import (
    check_chunk_size, check_float_tensors, expect_shape, in_spans, recurrent_backend, without_autocast,
)

_OP = "elementwise_recurrence"


def elementwise_recurrence(
    x: torch.Tensor,
    g: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    chunk_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run h_t = exp(g_t) * h_{t-1} + x_t per channel; return every h_t and the last.

    Args:
        x: [B, T, D] inputs (D may be any flattened channel count, e.g. Mamba1's d_inner * d_state).
        g: [B, T, D] log decay (finite, <= 0; not checked).
        initial_state: [B, D] state before the first token; zeros when None.
        backend: "auto", "reference" (loop over time), "torch" (chunked) or "fla" (HGRN's CUDA kernel).
        chunk_size: chunk length of the "torch" backend.

    Returns:
        h: [B, T, D] in x's dtype.
        state: [B, D] in float64 when any input is float64, else float32.
    """
    check_float_tensors(_OP, {"x": x, "g": g, "initial_state": initial_state})
    if x.dim() != 3 or x.shape[1] == 0:
        raise ValueError(f"{_OP}: x must be [B, T, D] with T >= 1, got {list(x.shape)}")
    batch, seq_len, width = x.shape
    expect_shape(_OP, g, "g", "[B, T, D]", (batch, seq_len, width))
    if initial_state is not None:
        expect_shape(_OP, initial_state, "initial_state", "[B, D]", (batch, width))
    check_chunk_size(_OP, chunk_size)
    chosen, dtype = recurrent_backend(_OP, backend, (x, g))
    if chosen == "fla":
        from fla.ops.hgrn import chunk_hgrn

        state = None if initial_state is None else initial_state.float()
        h, state = chunk_hgrn(x, g, initial_state=state, output_final_state=True)
        return h.to(x.dtype), state.float()
    x_, g_ = (t if t.dtype == dtype else t.to(dtype) for t in (x, g))
    state = x_.new_zeros(batch, width) if initial_state is None else initial_state.to(dtype)
    with without_autocast(x.device):
        if chosen == "reference" or seq_len == 1:
            outputs = []
            for t in range(seq_len):
                state = g_[:, t].exp() * state + x_[:, t]
                outputs.append(state)
            return torch.stack(outputs, dim=1).to(x.dtype), state
        return in_spans(lambda x, g, s: _chunked(x, g, s, chunk_size), (x_, g_), state, chunk_size, x.dtype)


def _chunked(x, g, state, chunk_size):
    """Within each chunk, a log-depth (Hillis-Steele) scan composes the steps pairwise: after the level of
    span s, h_i holds sum_{i-2s < j <= i} exp(G_i - G_j) x_j and a_i the decay sum over that span, so the
    last level leaves a_i = G_i (summed from the chunk's start). Then only the carry of h0 runs per chunk:
    h_i += exp(G_i) h0. x, g [B, T, D]; state [B, D]. Work per token grows with log C, not with C."""
    batch, seq_len, width = x.shape
    size = min(chunk_size, seq_len)
    n_chunks = -(-seq_len // size)
    pad = n_chunks * size - seq_len  # padded steps write 0 and keep the state (g = 0)
    h, a = (F.pad(t, (0, 0, 0, pad)).view(batch, n_chunks, size, width) for t in (x, g))  # [B, N, C, D]
    span = 1
    while span < size:
        h = h + F.pad(flushed_exp(a[:, :, span:]) * h[:, :, :-span], (0, 0, span, 0))
        a = a + F.pad(a[:, :, :-span], (0, 0, span, 0))
        span *= 2
    decay_in = flushed_exp(a)  # [B, N, C, D]: exp(G_i)
    outputs = []
    for i in range(n_chunks):
        outputs.append(torch.addcmul(h[:, i], decay_in[:, i], state[:, None]))
        state = outputs[-1][:, -1]
    return torch.stack(outputs, 1).view(batch, -1, width)[:, :seq_len], state
