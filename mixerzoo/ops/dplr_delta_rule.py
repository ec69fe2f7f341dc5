"""The diagonal-plus-low-rank delta rule (RWKV-7's transition) with "reference", "torch" and "fla" backends."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mixerzoo.ops._chunking import chunk_decays, chunk_length, decayed_scores, flushed_exp, from_chunks, to_chunks
from mixerzoo.ops._common import (
    check_linear_recurrence, decay_channels, expect_shape, in_spans, recurrent_backend, without_autocast,
)

_OP = "dplr_delta_rule"


def dplr_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    backend: str = "auto",
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the diagonal-plus-low-rank delta rule over a chunk of tokens; return the outputs and the final state.

    Per value head, with state S [K, V] and D_t = diag(exp g_t) (a scalar decay: exp(g_t) I):
        S_t = (D_t + b_t a_t^T) S_{t-1} + k_t v_t^T
        o_t = scale * S_t^T q_t
    RWKV-7 takes a = -kk and b = kk * a_gate for its normalised key kk; a = -beta k, b = k without a
    decay is the delta rule with the write k v^T unscaled.

    Args:
        q, k, a, b: [B, T, H, K] queries, keys and the transition's low-rank factors.
        v: [B, T, HV, V] values, HV % H == 0; value head j reads head j // (HV // H) of the others.
        g: None (no decay), [B, T, HV] (scalar) or [B, T, HV, K] (per key channel: RWKV-7) log decay
            (finite, <= 0; not checked).
        scale: output scale, default K ** -0.5 (RWKV-7 uses 1).
        initial_state: [B, HV, K, V] state before the first token; zeros when None.
        backend: "auto", "reference" (loop over time), "torch" (chunked) or "fla" (CUDA kernels).
        chunk_size: chunk length of the "torch" backend (at most 8 for per-channel decays; fla picks its own).

    Returns:
        o: [B, T, HV, V] in v's dtype.
        state: [B, HV, K, V] in float64 when any input is float64, else float32.
    """
    shape = check_linear_recurrence(_OP, q, k, v, g, initial_state, chunk_size, a=a, b=b)
    batch, seq_len, heads, dim_k, value_heads, dim_v = shape
    for name, t in (("a", a), ("b", b)):
        expect_shape(_OP, t, name, "[B, T, H, K]", (batch, seq_len, heads, dim_k))
    if scale is None:
        scale = dim_k**-0.5
    chosen, dtype = recurrent_backend(_OP, backend, (q, k, v, a, b, g))
    if chosen == "fla":
        return _fla(q, k, v, a, b, g, scale, initial_state)

    group = value_heads // heads
    keyed = [t if t.dtype == dtype else t.to(dtype) for t in (q, k, a, b)]
    if group > 1:  # every factor is read per value head
        keyed = [t.repeat_interleave(group, dim=2) for t in keyed]
    q_, k_, a_, b_ = keyed
    v_ = v if v.dtype == dtype else v.to(dtype)
    g_ = decay_channels(g, (batch, seq_len, value_heads), dtype, q.device)  # [B, T, HV, 1 or K]
    if initial_state is None:
        state = v_.new_zeros(batch, value_heads, dim_k, dim_v)
    else:
        state = initial_state if initial_state.dtype == dtype else initial_state.to(dtype)
    with without_autocast(q.device):
        if chosen == "reference" or seq_len == 1:
            o, state = _recurrent(q_, k_, v_, a_, b_, g_, scale, state)
            return o.to(v.dtype), state

        chunk = chunk_length(g_, chunk_size)

        def span(q, k, v, a, b, g, state):
            return _chunked(q, k, v, a, b, g, scale, state, chunk)

        return in_spans(span, (q_, k_, v_, a_, b_, g_), state, chunk, v.dtype)


def _recurrent(q, k, v, a, b, g, scale, state):
    """Loop over time. q, k, a, b [B, T, HV, K]; v [B, T, HV, V]; g [B, T, HV, 1 or K]; state [B, HV, K, V]."""
    outputs = []
    for t in range(q.shape[1]):
        read = torch.einsum("bhk,bhkv->bhv", a[:, t], state)  # a_t^T S_{t-1}
        state = (state * g[:, t].exp()[..., None] + b[:, t, :, :, None] * read[:, :, None, :]
                 + k[:, t, :, :, None] * v[:, t, :, None, :])
        outputs.append(scale * torch.einsum("bhkv,bhk->bhv", state, q[:, t]))
    return torch.stack(outputs, dim=1), state


def _chunked(q, k, v, a, b, g, scale, state, chunk_size):
    """Chunked form; shapes as in `_recurrent`, all tensors of one float dtype.

    Within a chunk, with log decays summed from the chunk start (G) and r_t = a_t^T S_{t-1} the row the
    low-rank term reads, S_t = exp(G_t) S0 + sum_{j <= t} exp(G_t - G_j) (k_j v_j^T + b_j r_j^T), so
    r = T^-1 ((a exp(G_{t-1})) S0 + A_ak v) with T = I - A_ab, where A_xy holds (x_i . y_j) decayed by
    exp(G_{i-1} - G_j) for j < i. Then o = scale (A_qk v + A_qb r + (q exp(G)) S0) with A_qy over j <= i.
    Only the [C, K] @ [K, V] carry runs per chunk.
    """
    batch, seq_len, heads, dim_k = k.shape
    dim_v = v.shape[-1]
    size = min(chunk_size, seq_len)
    n_chunks = -(-seq_len // size)

    q_c, k_c, a_c, b_c, v_c, g_c = (to_chunks(t, size) for t in (q, k, a, b, v, g))  # [N, BH, C, *]; pads 0
    # Matrices over a chunk's steps are kept transposed, [.., source j, target i].
    decay_t, cum, decay_in, decay_out, decay_all = chunk_decays(g_c)
    before_t = F.pad(decay_t[..., :-1, :], (0, 0, 1, 0))  # exp(G_{i-1} - G_j) at (j, i) for j < i, else 0
    decay_before = flushed_exp(F.pad(cum[..., :-1, :], (0, 0, 1, 0)))  # exp(G_{i-1}) [N, BH, C, Kg]

    solve_t = -decayed_scores(a_c, b_c, before_t)  # [N, BH, C, C]: T^T's strictly upper part
    eye = torch.eye(size, dtype=q.dtype, device=q.device).expand_as(solve_t)
    t_inv = torch.linalg.solve_triangular(solve_t, eye, upper=True, left=False, unitriangular=True).mT
    r_free = t_inv @ (decayed_scores(a_c, k_c, before_t).mT @ v_c)  # [N, BH, C, V]; r = r_free + w S0
    w = t_inv @ (a_c * decay_before)  # [N, BH, C, K]
    k_out, b_out = ((decay_out * t).mT for t in (k_c, b_c))  # [N, BH, K, C]: decayed to the chunk end
    inject = k_out @ v_c  # [N, BH, K, V]

    state = state.reshape(batch * heads, dim_k, dim_v)
    starts, reads = [], []
    for i in range(n_chunks):
        starts.append(state)
        reads.append(torch.baddbmm(r_free[i], w[i], state))
        state = torch.baddbmm(torch.addcmul(inject[i], decay_all[i], state), b_out[i], reads[-1])
    start, r = torch.stack(starts).flatten(0, 1), torch.stack(reads)  # [N * BH, K, V], [N, BH, C, V]

    scores = decayed_scores(q_c, k_c, decay_t).mT @ v_c + decayed_scores(q_c, b_c, decay_t).mT @ r
    q_in = (decay_in * q_c).flatten(0, 1)  # [N * BH, C, K]
    o = scores.flatten(0, 1).baddbmm_(q_in, start, beta=scale, alpha=scale)  # scale (scores + q S0)
    return from_chunks(o.unflatten(0, (n_chunks, -1)), batch, seq_len), state.unflatten(0, (batch, -1))


def _fla(q, k, v, a, b, g, scale, initial_state):
    """flash-linear-attention's DPLR Triton kernels (CUDA); they take one head count and a per-channel decay."""
    from fla.ops.generalized_delta_rule import chunk_dplr_delta_rule, fused_recurrent_dplr_delta_rule

    group = v.shape[2] // q.shape[2]
    if group > 1:
        q, k, a, b = (t.repeat_interleave(group, dim=2) for t in (q, k, a, b))
    if g is None:
        g = torch.zeros_like(k)
    elif g.dim() == 3:
        g = g[..., None].expand_as(k)
    if initial_state is not None:
        initial_state = initial_state.to(torch.float32)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, a, b, g))
    kernel = fused_recurrent_dplr_delta_rule if q.shape[1] == 1 and not needs_grad else chunk_dplr_delta_rule
    o, state = kernel(q, k, v, a, b, g, scale=scale, initial_state=initial_state, output_final_state=True)
    return o.to(v.dtype), state.to(torch.float32)
