"""RWKV time mixing, two generations, each a mixer over one general op.

RWKV-6 ("Finch", Peng et al. 2024, arXiv:2404.05892) over gated_linear_attention with its bonus:
data-dependent token shift (ddlerp), a per-channel decay w = -exp(w0 + LoRA(x)), the bonus u on the
current token, a per-head LayerNorm (RWKV's GroupNorm) and a SiLU gate.

RWKV-7 ("Goose", Peng et al. 2025, arXiv:2503.14456) over dplr_delta_rule: the transition
diag(w_t) - kk_t (a_t kk_t)^T with a per-channel decay w = exp(-e^-0.5 sigmoid(w0 + LoRA(x))), an
in-context learning rate a_t, a normalised removal key kk, the r k v bonus term and a LoRA output gate.
RWKV-7's value residual (every layer mixing in layer 0's values) crosses layers, which a mixer's
(chunk, state) call does not see: it is left out.

Both token shifts read the previous valid token through causal_conv1d (taps [1, 0]), so pads neither
enter nor move it; the state is that one token plus the [H, K, V] matrix: constant in tokens seen.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn
from typing_extensions import Self

from mixerzoo.mixers.base import Mixer, MixerConfig, MixerState, recurrent_dtype
from mixerzoo.ops import ATTENTION_ONLY_BACKENDS, causal_conv1d, dplr_delta_rule, gated_linear_attention

_MIXES = 5  # RWKV-6: r, w, k, v, g each take their own interpolation of x and the previous token
_MIXES7 = 6  # RWKV-7: r, w, k, v, a, g
_DECAY7_MAX = math.exp(-0.5)  # RWKV-7's log decay lies in (-e^-0.5, 0): w in (0.545, 1)


class _RWKVConfig(MixerConfig):
    """Fields and checks both RWKV generations share: H heads of head_dim = d_model // H over a
    chunked op with its own backends."""

    n_heads: int = Field(4, gt=0, description="heads; head_dim = d_model // n_heads")
    norm_eps: float = Field(1e-5, gt=0, description="epsilon of the per-head normalisation")
    chunk_size: int = Field(64, gt=0, description="chunk length of the chunked op (per-channel decays cap it at 8)")

    @model_validator(mode="after")
    def _shapes_fit(self) -> Self:
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads ({self.n_heads}) does not divide d_model ({self.d_model})")
        if self.backend in ATTENTION_ONLY_BACKENDS:
            raise ValueError(f"backend {self.backend!r} is attention's; use 'auto', 'reference', 'torch' or 'fla'")
        return self

    @property
    def head_dim(self) -> int:
        """Key and value dim per head."""
        return self.d_model // self.n_heads

    def state_nbytes(self, n_tokens: int, batch_size: int = 1, *, dtype: torch.dtype = torch.float32) -> int:
        """The previous token (activation dtype) plus the matrix (at least float32): constant."""
        item = torch.empty((), dtype=dtype).element_size()
        return batch_size * (self.d_model * item + self.n_heads * self.head_dim**2 * max(item, 4))


@dataclasses.dataclass
class RWKVState(MixerState):
    """The last valid input token (the token shift's) and the recurrent matrix."""

    shift: torch.Tensor  # [B, 1, d_model]
    recurrent: torch.Tensor = dataclasses.field(metadata={"float32": True})  # [B, H, K, V]


class _RWKV(Mixer):
    """What both RWKV generations share: the state and the token shift."""

    state_class = RWKVState
    dense_valid = True

    def __init__(self, config: _RWKVConfig):
        super().__init__(config)
        self.register_buffer("shift_taps", torch.tensor([1.0, 0.0]).repeat(config.d_model, 1), persistent=False)

    def init_state(self, batch_size, *, device=None, dtype=None):
        """A zero previous token (activation dtype) and a zero matrix (float32, or float64)."""
        c = self.config
        device, dtype = self.state_placement(device, dtype)
        return RWKVState(
            shift=torch.zeros(batch_size, 1, c.d_model, device=device, dtype=dtype),
            recurrent=torch.zeros(batch_size, c.n_heads, c.head_dim, c.head_dim, device=device,
                                  dtype=recurrent_dtype(dtype)))

    def _token_shift(self, x: torch.Tensor, state: RWKVState, valid: torch.Tensor | None):
        """(previous valid token minus x [B, T, d], the new shift state [B, 1, d])."""
        backend = "reference" if self.config.backend == "reference" else "torch"
        previous, shift = causal_conv1d(x, self.shift_taps.to(x.dtype), state.shift, valid, backend=backend)
        return previous - x, shift


class RWKV6Config(_RWKVConfig):
    """RWKV-6 time mixing: H heads of head_dim (RWKV-6: 64), low-rank data-dependent shift and decay."""

    type: Literal["rwkv6"] = Field("rwkv6", description="the mixer type")
    mix_low_rank: int = Field(32, gt=0, description="rank of the ddlerp LoRA (RWKV-6: 32)")
    decay_low_rank: int = Field(64, gt=0, description="rank of the decay LoRA (RWKV-6: 64)")

    def mixing_flops_per_token(self, context: int) -> int:
        """Per head: decay (KV), write (2KV), read of the state and the bonus term (2KV + 3K)."""
        return self.n_heads * (5 * self.head_dim**2 + 3 * self.head_dim)


class RWKV6(_RWKV):
    """RWKV-6 time mixing."""

    config_class = RWKV6Config

    def __init__(self, config: RWKV6Config):
        super().__init__(config)
        c, d = config, config.d_model
        self.x_maa = nn.Parameter(torch.rand(d) * 0.5)  # the first interpolation, before the LoRA
        self.maa = nn.Parameter(torch.rand(_MIXES, d) * 0.5)  # [5, d]: static part of each interpolation
        self.maa_a = nn.Parameter(torch.randn(d, _MIXES * c.mix_low_rank) * 0.01)
        self.maa_b = nn.Parameter(torch.zeros(_MIXES, c.mix_low_rank, d))
        self.w0 = nn.Parameter(torch.linspace(-6, -1, d))  # log of -log decay: decays exp(-exp(w0)) in (0.08, 1)
        self.w_a = nn.Parameter(torch.randn(d, c.decay_low_rank) * 0.01)
        self.w_b = nn.Parameter(torch.zeros(c.decay_low_rank, d))
        self.bonus = nn.Parameter(torch.randn(c.n_heads, c.head_dim) * 0.1)  # u
        self.r_proj, self.k_proj, self.v_proj, self.g_proj = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.o_norm = nn.LayerNorm(c.head_dim, eps=c.norm_eps)
        self.o_proj = nn.Linear(d, d, bias=False)

    def _forward(self, x, state, positions, valid):
        c = self.config
        batch, length, d = x.shape
        delta, shift = self._token_shift(x, state, valid)  # [B, T, d]
        lora = torch.tanh((x + delta * self.x_maa) @ self.maa_a).unflatten(-1, (_MIXES, -1))  # [B, T, 5, r]
        mixes = torch.einsum("btmr,mrd->btmd", lora, self.maa_b) + self.maa  # [B, T, 5, d]
        xr, xw, xk, xv, xg = (x[..., None, :] + delta[..., None, :] * mixes).unbind(-2)
        heads = (c.n_heads, c.head_dim)
        r, k, v = (proj(t).unflatten(-1, heads) for proj, t in ((self.r_proj, xr), (self.k_proj, xk), (self.v_proj, xv)))
        log_decay = -torch.exp(self.w0 + torch.tanh(xw @ self.w_a) @ self.w_b).unflatten(-1, heads)  # [B, T, H, K]
        if valid is not None:  # a pad neither decays nor writes
            log_decay = log_decay.masked_fill(~valid[..., None, None], 0.0)
            v = v.masked_fill(~valid[..., None, None], 0.0)
        o, recurrent = gated_linear_attention(r, k, v, log_decay, scale=1.0, initial_state=state.recurrent,
                                              bonus=self.bonus, backend=c.backend, chunk_size=c.chunk_size)
        o = self.o_norm(o).reshape(batch, length, d) * F.silu(self.g_proj(xg))
        y = self.o_proj(o)
        y = y if valid is None else y * valid[..., None]
        return y, RWKVState(shift=shift, recurrent=recurrent.to(state.recurrent.dtype))


class RWKV7Config(_RWKVConfig):
    """RWKV-7 time mixing: H heads of head_dim (RWKV-7: 64) over the diagonal-plus-low-rank delta rule;
    LoRA ranks as RWKV-7's 0.1B model (decay 64, learning rate 64, gate 128)."""

    type: Literal["rwkv7"] = Field("rwkv7", description="the mixer type")
    decay_low_rank: int = Field(64, gt=0, description="rank of the decay LoRA (RWKV-7 0.1B: 64)")
    rate_low_rank: int = Field(64, gt=0, description="rank of the in-context learning rate a's LoRA (0.1B: 64)")
    gate_low_rank: int = Field(128, gt=0, description="rank of the output gate's LoRA (0.1B: 128)")

    def mixing_flops_per_token(self, context: int) -> int:
        """Per head: decay (KV), the low-rank read a^T S and write (4KV), the write (2KV), the read of the
        state (2KV) and the bonus term (3K + 2V)."""
        return self.n_heads * (9 * self.head_dim**2 + 5 * self.head_dim)


class RWKV7(_RWKV):
    """RWKV-7 time mixing (without the cross-layer value residual)."""

    config_class = RWKV7Config

    def __init__(self, config: RWKV7Config):
        super().__init__(config)
        c, d = config, config.d_model
        depth = torch.arange(d) / d
        self.mix = nn.Parameter(1 - depth ** torch.tensor([0.2, 0.9, 0.7, 0.7, 0.9, 0.2])[:, None])  # [6, d]
        self.w0 = nn.Parameter(torch.linspace(-6.0, 0.0, d) + 0.5)  # sigmoid(w0) sets the log decay's size
        self.w_a = nn.Parameter(torch.randn(d, c.decay_low_rank) * 0.01)
        self.w_b = nn.Parameter(torch.zeros(c.decay_low_rank, d))
        self.a0 = nn.Parameter(torch.full((d,), -0.19))
        self.a_a = nn.Parameter(torch.randn(d, c.rate_low_rank) * 0.01)
        self.a_b = nn.Parameter(torch.zeros(c.rate_low_rank, d))
        self.g_a = nn.Parameter(torch.randn(d, c.gate_low_rank) * 0.01)
        self.g_b = nn.Parameter(torch.randn(c.gate_low_rank, d) * 0.01)
        self.k_k = nn.Parameter(torch.full((d,), 0.71))  # scales k into the removal key kk
        self.k_a = nn.Parameter(torch.full((d,), 1.02))  # how far a scales the written key
        self.r_k = nn.Parameter(torch.full((c.n_heads, c.head_dim), -0.04))  # the bonus term's weights
        self.r_proj, self.k_proj, self.v_proj = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.o_norm = nn.GroupNorm(c.n_heads, d, eps=c.head_dim * c.norm_eps)
        self.o_proj = nn.Linear(d, d, bias=False)

    def _forward(self, x, state, positions, valid):
        c = self.config
        batch, length, d = x.shape
        delta, shift = self._token_shift(x, state, valid)  # [B, T, d]
        xr, xw, xk, xv, xa, xg = (x[..., None, :] + delta[..., None, :] * self.mix).unbind(-2)
        heads = (c.n_heads, c.head_dim)
        r, k, v = self.r_proj(xr), self.k_proj(xk), self.v_proj(xv)  # [B, T, d]
        log_decay = -_DECAY7_MAX * torch.sigmoid(self.w0 + torch.tanh(xw @ self.w_a) @ self.w_b)
        rate = torch.sigmoid(self.a0 + (xa @ self.a_a) @ self.a_b)  # a_t in (0, 1)
        gate = torch.sigmoid(xg @ self.g_a) @ self.g_b
        removal = F.normalize((k * self.k_k).unflatten(-1, heads), dim=-1)  # kk [B, T, H, K]
        k = k * (1 + (rate - 1) * self.k_a)
        if valid is not None:  # a pad neither decays, removes nor writes
            pads = ~valid[..., None]
            log_decay, rate, v = (t.masked_fill(pads, 0.0) for t in (log_decay, rate, v))
        r, k, v, log_decay, rate = (t.unflatten(-1, heads) for t in (r, k, v, log_decay, rate))
        o, recurrent = dplr_delta_rule(r, k, v, -removal, removal * rate, log_decay, scale=1.0,
                                       initial_state=state.recurrent, backend=c.backend, chunk_size=c.chunk_size)
        o = self.o_norm(o.reshape(-1, d)).view(batch, length, d)
        bonus = (r * k * self.r_k).sum(-1, keepdim=True) * v  # [B, T, H, V]: the current token's own term
        y = self.o_proj((o + bonus.flatten(2)) * gate)
        y = y if valid is None else y * valid[..., None]
        return y, RWKVState(shift=shift, recurrent=recurrent.to(state.recurrent.dtype))
