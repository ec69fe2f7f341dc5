"""Elementwise linear recurrence (HGRN, RG-LRU, Mamba1's selective scan) with "reference", "torch" and "fla" backends."""

from __future__ import annotations

import torch

from mixerzoo.ops._chunking import flushed_exp, segment_decay, to_chunks
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
    """h_i = exp(G_i) h0 + sum_{j <= i} exp(G_i - G_j) x_j within each chunk (G summed from its start);
    only the carry of h0 across chunks runs per chunk. x, g [B, T, D]; state [B, D]."""
    batch, seq_len, width = x.shape
    size = min(chunk_size, seq_len)
    x_c, g_c = (to_chunks(t[..., None], size)[..., 0] for t in (x, g))  # [N, B*D, C]
    decay_t = segment_decay(g_c[..., None])[..., 0]  # [N, BD, C(j), C(i)]
    free = (x_c[..., None, :] @ decay_t)[..., 0, :]  # [N, BD, C]: sum_j x_j exp(G_i - G_j)
    decay_in = flushed_exp(g_c.cumsum(-1))  # [N, BD, C]
    state = state.reshape(-1)
    outputs = []
    for i in range(free.shape[0]):
        outputs.append(torch.addcmul(free[i], decay_in[i], state[:, None]))
        state = outputs[-1][:, -1]
    h = torch.stack(outputs).reshape(-1, batch, width, size).permute(1, 0, 3, 2).reshape(batch, -1, width)
    return h[:, :seq_len], state.view(batch, width)
