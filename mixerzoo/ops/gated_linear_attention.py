"""Gated linear attention (linear attention, RetNet, lightning, GLA, HGRN2, RWKV-6) with "reference",
"torch" and "fla" backends."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mixerzoo.ops._chunking import (
    chunk_decays, chunk_length, decayed_scores, flushed_exp, from_chunks, per_channel_heads, per_value_head, to_chunks,
)
from mixerzoo.ops._common import (
    check_linear_recurrence, decay_channels, expect_shape, in_spans, recurrent_backend, without_autocast,
)

_OP = "gated_linear_attention"


def gated_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    bonus: torch.Tensor | None = None,
    backend: str = "auto",
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run gated linear attention over a chunk of tokens; return the outputs and the final state.

    Per value head, with state S [K, V] and D_t = diag(exp g_t) (a scalar decay: exp(g_t) I):
        S_t = D_t S_{t-1} + k_t v_t^T
        o_t = scale * S_t^T q_t                                    (bonus None)
        o_t = scale * (S_{t-1} + diag(u) k_t v_t^T)^T q_t          (bonus u: RWKV-6)

    Args:
        q, k: [B, T, H, K] queries and keys (feature maps applied by the caller).
        v: [B, T, HV, V] values, HV % H == 0; value head j reads q/k head j // (HV // H).
        g: None (linear attention), [B, T, HV] (scalar decay: RetNet, lightning) or [B, T, HV, K]
            (per key channel: GLA, HGRN2, RWKV-6) log decay (finite, <= 0; not checked).
        scale: output scale, default K ** -0.5.
        initial_state: [B, HV, K, V] state before the first token; zeros when None.
        bonus: [HV, K] RWKV-6's bonus u on the current token (then the output reads S_{t-1}).
        backend: "auto", "reference" (loop over time), "torch" (chunked) or "fla" (CUDA kernels).
        chunk_size: chunk length of the "torch" backend (at most 8 for per-channel decays; fla picks its own).

    Returns:
        o: [B, T, HV, V] in v's dtype.
        state: [B, HV, K, V] in float64 when any input is float64, else float32.
    """
    batch, seq_len, heads, dim_k, value_heads, dim_v = _check_inputs(q, k, v, g, initial_state, bonus, chunk_size)
    if scale is None:
        scale = dim_k**-0.5
    chosen, dtype = recurrent_backend(_OP, backend, (q, k, v, g, bonus))
    if chosen == "fla":
        return _fla(q, k, v, g, scale, initial_state, bonus)

    q_, k_, v_ = (t if t.dtype == dtype else t.to(dtype) for t in (q, k, v))
    g_ = decay_channels(g, (batch, seq_len, value_heads), dtype, q.device)  # [B, T, HV, 1 or K]
    bonus_ = None if bonus is None else bonus.to(dtype)
    if initial_state is None:
        state = q_.new_zeros(batch, value_heads, dim_k, dim_v)
    else:
        state = initial_state if initial_state.dtype == dtype else initial_state.to(dtype)
    with without_autocast(q.device):
        if chosen == "reference" or seq_len == 1:
            o, state = _recurrent(q_, k_, v_, g_, bonus_, scale, state)
            return o.to(v.dtype), state

        chunk = chunk_length(g_, chunk_size)

        def span(q, k, v, g, state):
            return _chunked(q, k, v, g, bonus_, scale, state, chunk)

        return in_spans(span, (q_, k_, v_, g_), state, chunk, v.dtype)


def _check_inputs(q, k, v, g, initial_state, bonus, chunk_size):
    """Validate shapes, dtypes and devices; return (B, T, H, K, HV, V)."""
    shape = check_linear_recurrence(_OP, q, k, v, g, initial_state, chunk_size, bonus=bonus)
    if bonus is not None:
        expect_shape(_OP, bonus, "bonus", "[HV, K]", (shape[4], shape[3]))
    return shape


def _recurrent(q, k, v, g, bonus, scale, state):
    """Loop over time. q, k [B, T, H, K]; v [B, T, HV, V]; g [B, T, HV, 1 or K]; bonus [HV, K]; state [B, HV, K, V]."""
    group = v.shape[2] // q.shape[2]
    if group > 1:
        q, k = (t.repeat_interleave(group, dim=2) for t in (q, k))
    outputs = []
    for t in range(q.shape[1]):
        write = k[:, t, :, :, None] * v[:, t, :, None, :]  # [B, HV, K, V]
        if bonus is not None:  # reads the state before this token, and the token through the bonus
            outputs.append(scale * torch.einsum("bhkv,bhk->bhv", state + bonus[:, :, None] * write, q[:, t]))
        state = state * g[:, t].exp()[..., None] + write
        if bonus is None:
            outputs.append(scale * torch.einsum("bhkv,bhk->bhv", state, q[:, t]))
    return torch.stack(outputs, dim=1), state


def _chunked(q, k, v, g, bonus, scale, state, chunk_size):
    """Chunked form; shapes as in `_recurrent`, all tensors of one float dtype.

    Within a chunk, with log decays summed from the chunk start (G):
    o_i = scale (sum_{j <= i} (q_i . k_j)_{exp(G_i - G_j)} v_j + (exp(G_i) q_i)^T S0) and
    S_end = exp(G_C) S0 + sum_j (exp(G_C - G_j) k_j) v_j^T. With a bonus the query reads up to step
    i - 1 (G_{i-1}) and the diagonal of the scores is (q_i u k_i). Only the carry runs per chunk.
    """
    batch, seq_len, heads, dim_k = k.shape
    value_heads, dim_v = v.shape[2:]
    q, k, group = per_channel_heads(q, k, g, value_heads // heads)
    size = min(chunk_size, seq_len)
    n_chunks = -(-seq_len // size)

    q_c, k_c, v_c, g_c = (to_chunks(t, size) for t in (q, k, v, g))  # [N, BH, C, K] x2, [N, BHV, C, V], [.., Kg]
    # exp(G_i - G_j) at (j, i) for j <= i, else 0; G from the chunk start; from step j to the chunk end; across it
    decay_t, cum, decay_in, decay_out, decay_all = chunk_decays(g_c)
    if bonus is None:
        scores_t = decayed_scores(q_c, k_c, decay_t, group)  # [N, BHV, C, C] at (j, i)
    else:  # query i reads the state up to i - 1: the decays shifted by one step
        scores_t = decayed_scores(q_c, k_c, F.pad(decay_t[..., :-1, :], (0, 0, 1, 0)), group)
        u = bonus.repeat(batch, 1)[:, None]  # [B HV, 1, K]
        on_token = per_value_head(u, q_c * k_c, group).sum(-1)  # [N, BHV, C]: q_i u k_i
        scores_t = scores_t + torch.diag_embed(on_token)
        decay_in = flushed_exp(F.pad(cum[..., :-1, :], (0, 0, 1, 0)))
    inject = per_value_head(decay_out, k_c, group).mT @ v_c  # [N, BHV, K, V]

    state = state.reshape(batch * value_heads, dim_k, dim_v)
    starts = []
    for i in range(n_chunks):
        starts.append(state)
        state = torch.addcmul(inject[i], decay_all[i], state)
    start = torch.stack(starts).flatten(0, 1)  # [N * BHV, K, V]
    q_in = per_value_head(decay_in, q_c, group).flatten(0, 1)  # [N * BHV, C, K]
    o = (scores_t.mT @ v_c).flatten(0, 1).baddbmm_(q_in, start, beta=scale, alpha=scale)  # scale (scores v + q S0)
    return from_chunks(o.unflatten(0, (n_chunks, -1)), batch, seq_len), state.unflatten(0, (batch, -1))


def _fla(q, k, v, g, scale, initial_state, bonus):
    """flash-linear-attention's Triton kernels (CUDA): linear_attn, simple_gla, gla or rwkv6 by the decay's form."""
    from fla.ops.gla import chunk_gla
    from fla.ops.linear_attn import chunk_linear_attn
    from fla.ops.rwkv6 import chunk_rwkv6
    from fla.ops.simple_gla import chunk_simple_gla

    group = v.shape[2] // q.shape[2]
    if group > 1:  # fla's kernels take one head count
        q, k = (t.repeat_interleave(group, dim=2) for t in (q, k))
    if initial_state is not None:
        initial_state = initial_state.to(torch.float32)
    common = dict(scale=scale, initial_state=initial_state, output_final_state=True)
    if bonus is not None:
        o, state = chunk_rwkv6(q, k, v, g if g.dim() == 4 else g[..., None].expand_as(k), bonus, **common)
    elif g is None:
        o, state = chunk_linear_attn(q, k, v, normalize=False, **common)
    elif g.dim() == 3:
        o, state = chunk_simple_gla(q, k, v, g=g, **common)
    else:
        o, state = chunk_gla(q, k, v, g, **common)
    return o.to(v.dtype), state.to(torch.float32)
