"""Gated delta rule (Gated DeltaNet's token mixer) with "reference", "torch" and "fla" backends."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mixerzoo.ops._backend import choose_backend

_OP = "gated_delta_rule"


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    backend: str = "auto",
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the gated delta rule over a chunk of tokens; return the outputs and the final state.

    Per value head, with state S [K, V]:
        S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T
        o_t = scale * S_t^T q_t

    Args:
        q, k: [B, T, H, K] queries and keys (not normalised here).
        v: [B, T, HV, V] values, HV % H == 0; value head j reads q/k head j // (HV // H).
        g: [B, T, HV] log decay (<= 0; not checked).
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
    dtype = torch.float64 if torch.float64 in {t.dtype for t in (q, k, v, g, beta)} else torch.float32
    chosen = choose_backend(_OP, backend, q, supported=("fla", "torch", "reference"))
    if chosen == "fla" and dtype == torch.float64:
        if backend != "auto":
            raise ValueError(f"{_OP}: backend 'fla' does not take float64 inputs; use 'torch' or 'reference'")
        chosen = "torch"
    if chosen == "fla":
        return _fla(q, k, v, g, beta, scale, initial_state, chunk_size)

    group = value_heads // heads
    q_, k_ = (t.to(dtype).repeat_interleave(group, dim=2) for t in (q, k))  # [B, T, HV, K]
    v_, g_, beta_ = (t.to(dtype) for t in (v, g, beta))
    if initial_state is None:
        state = q_.new_zeros(batch, value_heads, dim_k, dim_v)
    else:
        state = initial_state.to(dtype)
    if chosen == "reference" or seq_len == 1:
        o, state = _recurrent(q_, k_, v_, g_, beta_, scale, state)
    else:
        o, state = _chunked(q_, k_, v_, g_, beta_, scale, state, chunk_size)
    return o.to(v.dtype), state


def _check_inputs(q, k, v, g, beta, initial_state, chunk_size):
    """Validate shapes, dtypes and devices; return (B, T, H, K, HV, V)."""
    named = {"q": q, "k": k, "v": v, "g": g, "beta": beta, "initial_state": initial_state}
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{_OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{_OP}: {name} must be a floating-point tensor, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{_OP}: {name} is on {t.device} but q is on {q.device}")
    if q.dim() != 4:
        raise ValueError(f"{_OP}: q must be [B, T, H, K], got {list(q.shape)}")
    batch, seq_len, heads, dim_k = q.shape
    _expect(k, "k", "[B, T, H, K]", (batch, seq_len, heads, dim_k))
    if v.dim() != 4 or v.shape[:2] != (batch, seq_len):
        raise ValueError(f"{_OP}: v must be [B, T, HV, V] with [B, T] = {[batch, seq_len]}, got {list(v.shape)}")
    value_heads, dim_v = v.shape[2:]
    if value_heads % heads:
        raise ValueError(f"{_OP}: v has HV = {value_heads} heads, not a multiple of the H = {heads} heads of q and k")
    _expect(g, "g", "[B, T, HV]", (batch, seq_len, value_heads))
    _expect(beta, "beta", "[B, T, HV]", (batch, seq_len, value_heads))
    if initial_state is not None:
        _expect(initial_state, "initial_state", "[B, HV, K, V]", (batch, value_heads, dim_k, dim_v))
    if seq_len == 0:
        raise ValueError(f"{_OP}: T must be at least 1, got q of shape {list(q.shape)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{_OP}: chunk_size must be a positive int, got {chunk_size!r}")
    return batch, seq_len, heads, dim_k, value_heads, dim_v


def _expect(t: torch.Tensor, name: str, layout: str, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{_OP}: {name} must be {layout} = {list(shape)}, got {list(t.shape)}")


def _recurrent(q, k, v, g, beta, scale, state):
    """Loop over time. q, k [B, T, HV, K]; v [B, T, HV, V]; g, beta [B, T, HV]; state [B, HV, K, V]."""
    outputs = []
    for t in range(q.shape[1]):
        state = state * g[:, t].exp()[..., None, None]  # [B, HV, K, V]
        error = v[:, t] - torch.einsum("bhkv,bhk->bhv", state, k[:, t])  # [B, HV, V]
        state = state + k[:, t, :, :, None] * (beta[:, t, :, None] * error)[:, :, None, :]
        outputs.append(scale * torch.einsum("bhkv,bhk->bhv", state, q[:, t]))
    return torch.stack(outputs, dim=1), state  # [B, T, HV, V], [B, HV, K, V]


def _chunked(q, k, v, g, beta, scale, state, chunk_size):
    """Chunked WY form. Shapes as in `_recurrent`; all tensors share one float dtype.

    Within a chunk with decay cumsum G (from the chunk start), the written values are
    u = T^-1 (beta v) - T^-1 (beta exp(G) k) S0 with T = I + tril_strict(beta (k k^T) exp(G_i - G_j)),
    so the state only needs one [K, K] @ [K, V] product per chunk in the sequential loop.
    """
    batch, seq_len, heads, dim_k = k.shape
    dim_v = v.shape[-1]
    size = min(chunk_size, seq_len)
    n_chunks = -(-seq_len // size)
    pad = n_chunks * size - seq_len

    def chunks(x: torch.Tensor) -> torch.Tensor:  # [B, T, HV, *D] -> [B*HV, N, C, *D]; pads are zeros
        x = x.movedim(2, 1)
        if pad:
            x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, pad))
        return x.reshape(batch * heads, n_chunks, size, *x.shape[3:])

    q_c, k_c, v_c = chunks(q), chunks(k), chunks(v)  # [BH, N, C, K|V]
    beta_c = chunks(beta)[..., None]  # [BH, N, C, 1]; padded steps write nothing
    g_c = chunks(g)  # [BH, N, C]; padded steps have g = 0, so they do not decay
    decay = _segment_decay(g_c)  # [BH, N, C, C]
    cum = g_c.cumsum(-1)  # [BH, N, C], from the chunk start
    decay_in = cum.exp()[..., None]  # [BH, N, C, 1]: from the chunk start to step i
    decay_out = decay[..., -1, :, None]  # [BH, N, C, 1]: from step i to the chunk end
    decay_all = cum[..., -1].exp()[..., None, None]  # [BH, N, 1, 1]: across the chunk

    lower = torch.tril(beta_c * (k_c @ k_c.transpose(-1, -2)) * decay, diagonal=-1)  # [BH, N, C, C]
    eye = torch.eye(size, dtype=q.dtype, device=q.device)
    rhs = torch.cat((beta_c * v_c, beta_c * decay_in * k_c), dim=-1)  # [BH, N, C, V + K]
    solved = torch.linalg.solve_triangular(eye + lower, rhs, upper=False, unitriangular=True)
    u_free, w = solved[..., :dim_v], solved[..., dim_v:]  # [BH, N, C, V], [BH, N, C, K]; u = u_free - w S0

    k_out = decay_out * k_c  # [BH, N, C, K]
    transition = decay_all * torch.eye(dim_k, dtype=q.dtype, device=q.device) - k_out.transpose(-1, -2) @ w
    inject = k_out.transpose(-1, -2) @ u_free  # [BH, N, K, V]; S_end = transition @ S0 + inject

    state = state.reshape(batch * heads, dim_k, dim_v)
    starts = []
    for i in range(n_chunks):
        starts.append(state)
        state = torch.baddbmm(inject[:, i], transition[:, i], state)
    start = torch.stack(starts, dim=1)  # [BH, N, K, V]

    u = u_free - w @ start  # [BH, N, C, V]
    scores = scale * (q_c @ k_c.transpose(-1, -2)) * decay  # [BH, N, C, C], zero above the diagonal
    o = (scale * decay_in * q_c) @ start + scores @ u  # [BH, N, C, V]
    o = o.reshape(batch, heads, n_chunks * size, dim_v)[:, :, :seq_len].movedim(1, 2)
    return o, state.reshape(batch, heads, dim_k, dim_v)


def _segment_decay(g: torch.Tensor) -> torch.Tensor:
    """[..., C] log decays -> [..., C, C] with exp(g_{j+1} + ... + g_i) at (i, j) for j <= i and 0 above.

    Each entry sums only its own segment (never a difference of two long prefix sums, which
    would lose the small decays' precision) and exponentiates only non-positive numbers.
    """
    size = g.shape[-1]
    causal = torch.ones(size, size, dtype=torch.bool, device=g.device).tril()
    # cumsum over i of g_i kept where i > j: entry (i, j) sums g_k for j < k <= i
    segments = g[..., :, None].expand(*g.shape, size).masked_fill(~causal.tril(-1), 0).cumsum(-2)
    return segments.masked_fill(~causal, float("-inf")).exp()


def _fla(q, k, v, g, beta, scale, initial_state, chunk_size):
    """flash-linear-attention's Triton kernels (CUDA); fla takes grouped value heads and a [B, HV, K, V] state."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

    if initial_state is not None:
        initial_state = initial_state.to(torch.float32)
    inputs = (q, k, v, g, beta, initial_state)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    common = dict(scale=scale, initial_state=initial_state, output_final_state=True, use_qk_l2norm_in_kernel=False)
    if q.shape[1] == 1 and not needs_grad:
        o, state = fused_recurrent_gated_delta_rule(q, k, v, g=g, beta=beta, **common)
    else:
        if chunk_size not in (16, 32, 64):
            raise ValueError(f"{_OP}: backend 'fla' takes chunk_size 16, 32 or 64, got {chunk_size}")
        o, state = chunk_gated_delta_rule(q, k, v, g=g, beta=beta, chunk_size=chunk_size, **common)
    return o.to(v.dtype), state.to(torch.float32)
