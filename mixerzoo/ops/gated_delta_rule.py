"""Gated delta rule (Gated DeltaNet's token mixer) with "reference", "torch" and "fla" backends."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mixerzoo.ops._chunking import (
    chunk_decays, chunk_length, decayed_scores, from_chunks, per_channel_heads, per_value_head, to_chunks,
)
from mixerzoo.ops._common import (
    check_linear_recurrence, decay_channels, expect_shape, in_spans, recurrent_backend, without_autocast,
)

_OP = "gated_delta_rule"
# The transition form runs while its extra work K^2 (C + V) is at most this multiple of a chunk's
# C K V. Measured on CPU (T = 2048, H = 4, C = 64, forward and forward+backward): the recurrent form
# was faster in 9 of 10 cases from K = 16, V = 32 to K = 128, V = 256 (0.65-0.9x), so only small
# key heads (K <= 16 with V >= 64 at C = 64) keep the transition form.
_TRANSITION_MAX = 0.5

def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    backend: str = "auto",
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the gated delta rule over a chunk of tokens; return the outputs and the final state.

    Per value head, with state S [K, V] and D_t = diag(exp g_t) (a scalar decay: exp(g_t) I):
        S_t = D_t S_{t-1} + beta_t k_t (v_t - (D_t S_{t-1})^T k_t)^T
        o_t = scale * S_t^T q_t
    g None is DeltaNet, [B, T, HV] Gated DeltaNet, [B, T, HV, K] KDA (Kimi Linear's per-channel gate).

    Args:
        q, k: [B, T, H, K] queries and keys (not normalised here).
        v: [B, T, HV, V] values, HV % H == 0; value head j reads q/k head j // (HV // H).
        g: None (no decay), [B, T, HV] (scalar) or [B, T, HV, K] (per key channel) log decay
            (finite, <= 0; not checked).
        beta: [B, T, HV] write strength.
        scale: output scale, default K ** -0.5.
        initial_state: [B, HV, K, V] state before the first token; zeros when None.
        backend: "auto", "reference" (loop over time), "torch" (chunked) or "fla" (CUDA kernels).
        chunk_size: chunk length of the "torch" backend; "fla" accepts 16, 32 or 64.

    Returns:
        o: [B, T, HV, V] in v's dtype.
        state: [B, HV, K, V] in float64 when any input is float64, else float32.
    """
    batch, seq_len, heads, dim_k, value_heads, dim_v = _check_inputs(q, k, v, g, beta, initial_state, chunk_size)
    if scale is None:
        scale = dim_k**-0.5
    chosen, dtype = recurrent_backend(_OP, backend, (q, k, v, g, beta))
    if chosen == "fla":
        return _fla(q, k, v, g, beta, scale, initial_state, chunk_size)

    q_, k_, v_, beta_ = (t if t.dtype == dtype else t.to(dtype) for t in (q, k, v, beta))
    if chosen == "torch" and seq_len == 1:  # the decode step reads g [B, 1, HV(, K)] or None as it is
        g_ = g if g is None or g.dtype == dtype else g.to(dtype)
    else:
        g_ = decay_channels(g, (batch, seq_len, value_heads), dtype, q.device)
    if initial_state is None:
        state = q_.new_zeros(batch, value_heads, dim_k, dim_v)
    else:
        state = initial_state if initial_state.dtype == dtype else initial_state.to(dtype)
    if torch.is_autocast_enabled(q.device.type):
        with without_autocast(q.device):
            return _run(chosen, q_, k_, v_, g_, beta_, scale, state, chunk_size, v.dtype)
    return _run(chosen, q_, k_, v_, g_, beta_, scale, state, chunk_size, v.dtype)


def _run(chosen, q, k, v, g, beta, scale, state, chunk_size, out_dtype):
    """The torch or reference computation on inputs of one float dtype; o in out_dtype."""
    if chosen == "torch" and q.shape[1] == 1:
        o, state = _step(q, k, v, g, beta, scale, state)
    elif chosen == "reference" or q.shape[1] == 1:
        o, state = _recurrent(q, k, v, g, beta, scale, state)
    else:

        chunk_size = chunk_length(g, chunk_size)

        def span(q, k, v, g, beta, state):
            return _chunked(q, k, v, g, beta, scale, state, chunk_size)

        return in_spans(span, (q, k, v, g, beta), state, chunk_size, out_dtype)
    return (o if o.dtype == out_dtype else o.to(out_dtype)), state


def _step(q, k, v, g, beta, scale, state):
    """One token (decode), as `_recurrent` with T = 1 in fewer ops: q, k [B, 1, H, K]; v [B, 1, HV, V];
    g None, [B, 1, HV] or [B, 1, HV, K]."""
    batch, _, heads, dim_k = q.shape
    value_heads, dim_v = v.shape[2:]
    if value_heads != heads:  # value head j reads q / k head j // (HV // H)
        q, k = (t.repeat_interleave(value_heads // heads, dim=2) for t in (q, k))
    rows = batch * value_heads
    q, k = q.reshape(rows, 1, dim_k), k.reshape(rows, 1, dim_k)
    state = state.reshape(rows, dim_k, dim_v)
    if g is not None:  # scalar ([B, 1, HV]) or per-channel ([B, 1, HV, K]) decay
        state = state * g.reshape(rows, -1, 1).exp()
    error = (v.reshape(rows, 1, dim_v) - torch.bmm(k, state)) * beta.reshape(rows, 1, 1)  # [B HV, 1, V]
    state = torch.baddbmm(state, k.mT, error)  # rank-1 write
    o = torch.bmm(q, state) * scale  # [B HV, 1, V]
    return o.view(batch, 1, value_heads, dim_v), state.view(batch, value_heads, dim_k, dim_v)


def _check_inputs(q, k, v, g, beta, initial_state, chunk_size):
    """Validate shapes, dtypes and devices; return (B, T, H, K, HV, V)."""
    shape = check_linear_recurrence(_OP, q, k, v, g, initial_state, chunk_size, beta=beta)
    expect_shape(_OP, beta, "beta", "[B, T, HV]", (shape[0], shape[1], shape[4]))
    return shape


def _recurrent(q, k, v, g, beta, scale, state):
    """Loop over time. q, k [B, T, H, K]; v [B, T, HV, V]; g [B, T, HV, 1 or K]; beta [B, T, HV]; state [B, HV, K, V]."""
    batch, seq_len, heads, _ = q.shape
    group = v.shape[2] // heads
    v, g, beta = (t.unflatten(2, (heads, group)) for t in (v, g, beta))  # value head j = (j // group, j % group)
    state = state.unflatten(1, (heads, group))  # [B, H, R, K, V]
    outputs = []
    for t in range(seq_len):
        state = state * g[:, t].exp()[..., None]
        error = v[:, t] - torch.einsum("bhrkv,bhk->bhrv", state, k[:, t])  # [B, H, R, V]
        state = state + k[:, t, :, None, :, None] * (beta[:, t, ..., None] * error)[..., None, :]
        outputs.append(scale * torch.einsum("bhrkv,bhk->bhrv", state, q[:, t]))
    return torch.stack(outputs, dim=1).flatten(2, 3), state.flatten(1, 2)  # [B, T, HV, V], [B, HV, K, V]


def _transition_form(dim_k: int, dim_v: int, chunk_size: int) -> bool:
    """Whether the chunk-to-chunk carry takes the [K, K] transition form (one product per chunk in
    the sequential loop, K^2 (C + V) extra multiply-adds per chunk and head) rather than the
    per-chunk recurrent form fla uses (two products per chunk, no extra work): where K is small."""
    return dim_k * (chunk_size + dim_v) <= _TRANSITION_MAX * chunk_size * dim_v


def _chunked(q, k, v, g, beta, scale, state, chunk_size, form=None):
    """Chunked WY form; shapes as in `_recurrent`, all tensors of one float dtype. `form`
    ("transition" or "recurrent") overrides the choice by shape (`_transition_form`).

    Within a chunk, with log decays summed from the chunk start (G), the values the chunk writes are
    u = T^-1 (beta v) - T^-1 (beta exp(G) k) S0 with T = I + strictly_lower(beta (k k^T) exp(G_i - G_j)).
    Everything but the [C, K] @ [K, V] products that carry the state from chunk to chunk runs batched
    over all chunks at once. A per-channel decay (g [B, T, HV, K]) makes exp(G) a diagonal matrix;
    the same algebra holds with every decay taken per key channel.
    """
    batch, seq_len, heads, dim_k = k.shape
    value_heads, dim_v = v.shape[2:]
    q, k, group = per_channel_heads(q, k, g, value_heads // heads)
    size = min(chunk_size, seq_len)
    n_chunks = -(-seq_len // size)

    q_c, k_c, v_c = (to_chunks(t, size) for t in (q, k, v))  # [N, BH, C, K], [N, BH, C, K], [N, BHV, C, V]
    g_c, beta_c = to_chunks(g, size), to_chunks(beta, size)[..., None]  # [N, BHV, C, Kg], [N, BHV, C, 1]; pads 0
    # Matrices over a chunk's steps are kept transposed, [.., source j, target i], which the solve and the
    # products below take as they are.
    # exp(G_i - G_j) at (j, i) for j <= i (else 0); from the chunk start to step i; from step j to the chunk end;
    # across the chunk
    decay_t, _, decay_in, decay_out, decay_all = chunk_decays(g_c)

    # [N, BHV, C, C]: beta_i (k_i . k_j) decay at (j, i); a per-channel table ([C, C, K]) is not scaled, the keys are
    if g.shape[-1] > 1:
        gram_t = decayed_scores(beta_c * k_c, k_c, decay_t)
    else:
        gram_t = decayed_scores(k_c, k_c, decay_t * beta_c.mT[..., None], group)
    # X T^T = I gives X = T^-T; the solve reads only the strictly upper part of gram_t
    eye = torch.eye(size, dtype=q.dtype, device=q.device).expand_as(gram_t)
    t_inv = torch.linalg.solve_triangular(gram_t, eye, upper=True, left=False, unitriangular=True).mT
    u_free = t_inv @ (beta_c * v_c)  # [N, BHV, C, V]
    w = t_inv @ per_value_head(beta_c * decay_in, k_c, group)  # [N, BHV, C, K]; the chunk writes u = u_free - w S0
    k_out = per_value_head(decay_out, k_c, group).mT  # [N, BHV, K, C]; S_end = exp(G_C) S0 + k_out u

    state = state.reshape(batch * value_heads, dim_k, dim_v)
    starts = []
    if _transition_form(dim_k, dim_v, size) if form is None else form == "transition":
        # S_end = transition S0 + inject: one [K, K] @ [K, V] product per chunk in the loop
        transition = decay_all * torch.eye(dim_k, dtype=q.dtype, device=q.device) - k_out @ w  # [N, BHV, K, K]
        inject = k_out @ u_free  # [N, BHV, K, V]
        for i in range(n_chunks):
            starts.append(state)
            state = torch.baddbmm(inject[i], transition[i], state)
        start = torch.stack(starts).flatten(0, 1)  # [N * BHV, K, V]
        u = torch.baddbmm(u_free.flatten(0, 1), w.flatten(0, 1), start, alpha=-1)  # [N * BHV, C, V]
    else:
        # per chunk: u = u_free - w S0, then S_end = exp(G_C) S0 + k_out u (no [K, K] matrices)
        values = []
        for i in range(n_chunks):
            starts.append(state)
            values.append(torch.baddbmm(u_free[i], w[i], state, alpha=-1))
            state = torch.baddbmm(state * decay_all[i], k_out[i], values[-1])
        start, u = torch.stack(starts).flatten(0, 1), torch.stack(values).flatten(0, 1)

    scores_t = decayed_scores(q_c, k_c, decay_t, group).flatten(0, 1)  # [N * BHV, C, C]: (q_i . k_j) decay at (j, i)
    q_in = per_value_head(decay_in, q_c, group).flatten(0, 1)  # [N * BHV, C, K]
    o = (scores_t.mT @ u).baddbmm_(q_in, start, beta=scale, alpha=scale)  # scale (scores u + exp(G) q S0)
    return from_chunks(o.unflatten(0, (n_chunks, -1)), batch, seq_len), state.unflatten(0, (batch, -1))


def _fla(q, k, v, g, beta, scale, initial_state, chunk_size):
    """flash-linear-attention's Triton kernels (CUDA): the delta rule (g None), Gated DeltaNet (scalar g)
    or KDA (per-channel g); fla takes grouped value heads and a [B, HV, K, V] state."""
    from fla.ops.delta_rule import chunk_delta_rule, fused_recurrent_delta_rule
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
    from fla.ops.kda import chunk_kda, fused_recurrent_kda

    if initial_state is not None:
        initial_state = initial_state.to(torch.float32)
    inputs = (q, k, v, g, beta, initial_state)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    common = dict(scale=scale, initial_state=initial_state, output_final_state=True, use_qk_l2norm_in_kernel=False)
    decode = q.shape[1] == 1 and not needs_grad
    if not decode and chunk_size not in (16, 32, 64):
        raise ValueError(f"{_OP}: backend 'fla' takes chunk_size 16, 32 or 64, got {chunk_size}")
    if g is None:
        if decode:
            o, state = fused_recurrent_delta_rule(q, k, v, beta=beta, **common)
        else:
            o, state = chunk_delta_rule(q, k, v, beta=beta, **common)
    elif g.dim() == 4:
        kernel = fused_recurrent_kda if decode else chunk_kda
        o, state = kernel(q, k, v, g=g, beta=beta, **common)
    elif decode:
        o, state = fused_recurrent_gated_delta_rule(q, k, v, g=g, beta=beta, **common)
    else:
        o, state = chunk_gated_delta_rule(q, k, v, g=g, beta=beta, chunk_size=chunk_size, **common)
    return o.to(v.dtype), state.to(torch.float32)


def gated_delta_product(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    beta: torch.Tensor,
    *,
    num_householder: int,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    backend: str = "auto",
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated DeltaProduct (Siems et al. 2025): n = num_householder delta-rule steps per token.

    Per token t: S = D_t S_{t-1}, then for j < n: S = S + beta_tj k_tj (v_tj - S^T k_tj)^T; o_t = scale S^T q_t.
    It is gated_delta_rule over the T n sub-steps (the decay on each token's first, the query on its last),
    so every backend of that op runs it.

    Args:
        q: [B, T, H, K]; k: [B, T n, H, K] and v: [B, T n, HV, V], token t's sub-steps at t n .. t n + n - 1.
        g: None, [B, T, HV] or [B, T, HV, K] log decay per token; beta: [B, T n, HV].
        Others as in gated_delta_rule.

    Returns:
        o: [B, T, HV, V]; state: [B, HV, K, V].
    """
    if isinstance(num_householder, bool) or not isinstance(num_householder, int) or num_householder < 1:
        raise ValueError(f"gated_delta_product: num_householder must be a positive int, got {num_householder!r}")
    n = num_householder
    if q.dim() != 4 or k.dim() != 4 or k.shape[1] != q.shape[1] * n:
        raise ValueError(f"gated_delta_product: k must be [B, T * num_householder, H, K] = "
                         f"[.., {q.shape[1] * n if q.dim() == 4 else 'T n'}, ..] for q {list(q.shape)}, got {list(k.shape)}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    queries = F.pad(q.unsqueeze(2), (0, 0, 0, 0, n - 1, 0)).flatten(1, 2)  # [B, T n, H, K]: q_t on sub-step n - 1
    if g is not None:
        g = F.pad(g.unsqueeze(2), (0, 0) * (g.dim() - 2) + (0, n - 1)).flatten(1, 2)  # decay on sub-step 0
    o, state = gated_delta_rule(queries, k, v, g, beta, scale=scale, initial_state=initial_state, backend=backend,
                                chunk_size=chunk_size)
    return o[:, n - 1 :: n], state
