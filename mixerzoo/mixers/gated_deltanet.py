"""Gated DeltaNet as a mixer, parameterised as flash-linear-attention's `GatedDeltaNet` (InfiniteVL's GDN).

q, k, v projections each pass a short causal depthwise conv + SiLU; q and k are
L2-normalised per head; beta = sigmoid(b_proj x) (x2 with negative eigenvalues);
log decay g = -exp(A_log) * softplus(a_proj x + dt_bias); the gated delta rule mixes;
each head's output is RMS-normalised, gated by SiLU(g_proj x), then o_proj.
Parameter names and shapes equal fla's, so its state_dicts load without renaming.
The state is three conv tails plus the recurrent matrix: constant in tokens seen.
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

from mixerzoo.mixers.attention import Attention
from mixerzoo.mixers.base import Mixer, MixerConfig, MixerState, recurrent_dtype, step_size_bias
from mixerzoo.ops import ATTENTION_ONLY_BACKENDS, causal_conv1d, gated_delta_rule

_L2_EPS = 1e-6  # as fla's l2norm


class GatedDeltaNetConfig(MixerConfig):
    """Gated DeltaNet: H key heads of head_dim, HV value heads of head_dim * expand_v."""

    type: Literal["gated_deltanet"] = "gated_deltanet"
    n_heads: int = Field(gt=0, description="query / key heads")
    head_dim: int | None = Field(None, gt=0, description="key head dim; default d_model // n_heads")
    n_v_heads: int | None = Field(None, gt=0, description="value heads (a multiple of n_heads); default n_heads")
    expand_v: float = Field(2.0, gt=0, description="value head dim = head_dim * expand_v")
    conv_size: int = Field(4, ge=1, description="taps of the short causal convs on q, k, v")
    conv_bias: bool = False
    allow_neg_eigval: bool = Field(False, description="beta = 2 * sigmoid(b): eigenvalues of the transition in (-1, 1]")
    norm_eps: float = Field(1e-5, gt=0)
    chunk_size: int = Field(64, gt=0, description="chunk length of the chunked op")

    @model_validator(mode="after")
    def _shapes_fit(self) -> Self:
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"n_heads ({self.n_heads}) does not divide d_model ({self.d_model}); set head_dim")
        if self.value_heads % self.n_heads:
            raise ValueError(f"n_v_heads ({self.value_heads}) must be a multiple of n_heads ({self.n_heads})")
        if self.backend in ATTENTION_ONLY_BACKENDS:
            raise ValueError(f"backend {self.backend!r} has no gated delta rule kernel; use 'auto', 'reference', 'torch' or 'fla'")
        if not float(self.key_dim * self.expand_v).is_integer():
            raise ValueError(f"head_dim ({self.key_dim}) * expand_v ({self.expand_v}) must be an integer")
        return self

    @property
    def key_dim(self) -> int:
        """Per-head key (and query) dimension."""
        return self.head_dim or self.d_model // self.n_heads

    @property
    def value_dim(self) -> int:
        """Per-head value dimension."""
        return int(self.key_dim * self.expand_v)

    @property
    def value_heads(self) -> int:
        """Number of value heads."""
        return self.n_v_heads or self.n_heads

    def mixing_flops_per_token(self, context: int) -> int:
        """Recurrent form per value head: decay (KV), S^T k (2KV), rank-1 write (2KV), S^T q (2KV)."""
        return 7 * self.value_heads * self.key_dim * self.value_dim

    def state_nbytes(self, n_tokens: int, batch_size: int = 1, *, dtype: torch.dtype = torch.float32) -> int:
        """Conv tails (activation dtype) plus the recurrent matrix (at least float32): constant."""
        item = torch.empty((), dtype=dtype).element_size()
        tails = (self.conv_size - 1) * (2 * self.n_heads * self.key_dim + self.value_heads * self.value_dim) * item
        matrix = self.value_heads * self.key_dim * self.value_dim * max(item, 4)
        return batch_size * (tails + matrix)


@dataclasses.dataclass
class GatedDeltaNetState(MixerState):
    """Three conv tails (last conv_size - 1 valid inputs) and the recurrent matrix."""

    q_conv: torch.Tensor  # [B, W - 1, H * K]
    k_conv: torch.Tensor  # [B, W - 1, H * K]
    v_conv: torch.Tensor  # [B, W - 1, HV * V]
    recurrent: torch.Tensor = dataclasses.field(metadata={"float32": True})  # [B, HV, K, V], float32 (float64 runs: float64)


class GatedDeltaNet(Mixer):
    """Gated DeltaNet mixer with fla-compatible parameters."""

    config_class = GatedDeltaNetConfig
    state_class = GatedDeltaNetState

    def __init__(self, config: GatedDeltaNetConfig):
        super().__init__(config)
        c = config
        key_width, value_width = c.n_heads * c.key_dim, c.value_heads * c.value_dim
        self.q_proj = nn.Linear(c.d_model, key_width, bias=False)
        self.k_proj = nn.Linear(c.d_model, key_width, bias=False)
        self.v_proj = nn.Linear(c.d_model, value_width, bias=False)
        self.a_proj = nn.Linear(c.d_model, c.value_heads, bias=False)
        self.b_proj = nn.Linear(c.d_model, c.value_heads, bias=False)
        self.A_log = nn.Parameter(torch.empty(c.value_heads).uniform_(0, 16).log())
        self.dt_bias = nn.Parameter(step_size_bias(c.value_heads))
        self.q_conv1d = nn.Conv1d(key_width, key_width, c.conv_size, groups=key_width, bias=c.conv_bias)
        self.k_conv1d = nn.Conv1d(key_width, key_width, c.conv_size, groups=key_width, bias=c.conv_bias)
        self.v_conv1d = nn.Conv1d(value_width, value_width, c.conv_size, groups=value_width, bias=c.conv_bias)
        self.g_proj = nn.Linear(c.d_model, value_width, bias=False)
        self.o_norm = nn.RMSNorm(c.value_dim, eps=c.norm_eps)
        self.o_proj = nn.Linear(value_width, c.d_model, bias=False)

    def init_state(self, batch_size, *, device=None, dtype=None):
        """Zero conv tails (activation dtype) and a zero recurrent matrix (float32, or float64)."""
        c = self.config
        device = self.o_proj.weight.device if device is None else device
        dtype = self.o_proj.weight.dtype if dtype is None else dtype

        def tail(width: int) -> torch.Tensor:
            return torch.zeros(batch_size, c.conv_size - 1, width, device=device, dtype=dtype)

        matrix = torch.zeros(batch_size, c.value_heads, c.key_dim, c.value_dim, device=device, dtype=recurrent_dtype(dtype))
        return GatedDeltaNetState(
            q_conv=tail(c.n_heads * c.key_dim), k_conv=tail(c.n_heads * c.key_dim),
            v_conv=tail(c.value_heads * c.value_dim), recurrent=matrix,
        )

    def _conv(self, conv: nn.Conv1d, x: torch.Tensor, tail: torch.Tensor, valid: torch.Tensor):
        """Short conv + SiLU over the valid tokens; returns (activations, new tail)."""
        backend = "reference" if self.config.backend == "reference" else "torch"  # the conv has no CUDA kernel
        y, tail = causal_conv1d(x, conv.weight[:, 0, :], tail, valid, conv.bias, backend=backend)
        return F.silu(y), tail

    def _forward(self, x, state, positions, valid):
        c = self.config
        batch, length, _ = x.shape
        q, q_tail = self._conv(self.q_conv1d, self.q_proj(x), state.q_conv, valid)
        k, k_tail = self._conv(self.k_conv1d, self.k_proj(x), state.k_conv, valid)
        v, v_tail = self._conv(self.v_conv1d, self.v_proj(x), state.v_conv, valid)
        q = _l2_normalize(q.view(batch, length, c.n_heads, c.key_dim))
        k = _l2_normalize(k.view(batch, length, c.n_heads, c.key_dim))
        v = v.view(batch, length, c.value_heads, c.value_dim)
        g, beta = self._gates(x, valid)
        o, recurrent = gated_delta_rule(
            q, k, v, g, beta, initial_state=state.recurrent, backend=c.backend, chunk_size=c.chunk_size
        )
        gate = self.g_proj(x).view(batch, length, c.value_heads, c.value_dim)
        o = self.o_norm(o) * F.silu(gate)
        y = self.o_proj(o.reshape(batch, length, -1)) * valid[..., None]
        return y, GatedDeltaNetState(q_conv=q_tail, k_conv=k_tail, v_conv=v_tail, recurrent=recurrent.to(state.recurrent.dtype))

    def _gates(self, x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log decay g and write strength beta [B, T, HV]; both zero at pads, so a pad
        neither decays nor writes and the state passes through it exactly."""
        beta = torch.sigmoid(self.b_proj(x)) * (2.0 if self.config.allow_neg_eigval else 1.0)
        g = -self.A_log.exp() * F.softplus(self.a_proj(x) + self.dt_bias)
        return g * valid[..., None], beta * valid[..., None]

    @torch.no_grad()
    def mimic_init(self) -> None:
        """InfiniteVL's initialisation of a fresh GDN layer: A_log = 0, a_proj = b_proj = 0
        (beta = 0.5), dt_bias so the decay per token is 1e-3, and identity short convs
        (last tap 1). Other parameters are left as they are."""
        self.A_log.zero_()
        self.a_proj.weight.zero_()
        self.b_proj.weight.zero_()
        self.dt_bias.fill_(math.log(math.expm1(1e-3)))  # -exp(0) * softplus(dt_bias) = -1e-3
        for conv in (self.q_conv1d, self.k_conv1d, self.v_conv1d):
            conv.weight.zero_()
            conv.weight[:, 0, -1] = 1.0
            if conv.bias is not None:
                conv.bias.zero_()

    @torch.no_grad()
    def init_from_attention(self, attention: Attention) -> None:
        """Copy q, k, v, o projections from an attention layer (KV heads repeated for GQA).

        Needs matching shapes: n_heads and head_dim as the attention's, and value heads of
        the attention's head dim (HV * V == n_heads * head_dim). Attention biases are dropped
        (GDN has none).
        """
        a, c = attention.config, self.config
        if (a.n_heads, a.dim) != (c.n_heads, c.key_dim) or c.value_heads * c.value_dim != a.n_heads * a.dim:
            raise ValueError(
                f"init_from_attention: attention has {a.n_heads} heads of {a.dim}; this GDN has {c.n_heads} key heads "
                f"of {c.key_dim} and {c.value_heads} value heads of {c.value_dim} (need equal heads and head dims, "
                f"and value heads x value dim = {a.n_heads * a.dim})"
            )
        group = a.n_heads // a.kv_heads

        def repeat_heads(weight: torch.Tensor) -> torch.Tensor:  # [Hkv * D, d] -> [Hq * D, d]
            return weight.view(a.kv_heads, a.dim, -1).repeat_interleave(group, dim=0).reshape(-1, weight.shape[1])

        self.q_proj.weight.copy_(attention.q_proj.weight)
        self.k_proj.weight.copy_(repeat_heads(attention.k_proj.weight))
        self.v_proj.weight.copy_(repeat_heads(attention.v_proj.weight))
        self.o_proj.weight.copy_(attention.o_proj.weight)


def _l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim."""
    return x * torch.rsqrt(x.square().sum(-1, keepdim=True) + _L2_EPS)
