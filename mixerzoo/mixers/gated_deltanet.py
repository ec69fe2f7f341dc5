"""Gated DeltaNet as a mixer, parameterised as flash-linear-attention's `GatedDeltaNet` (InfiniteVL's GDN).

q, k, v projections each pass a short causal depthwise conv + SiLU; q and k are
L2-normalised per head; beta = sigmoid(b_proj x) (x2 with negative eigenvalues);
log decay g = -exp(A_log) * softplus(a_proj x + dt_bias); the gated delta rule mixes;
each head's output is RMS-normalised, gated by SiLU(g_proj x), then o_proj.
Parameter names and shapes equal fla's, so its state_dicts load without renaming.
The state is the conv tail plus the recurrent matrix: constant in tokens seen. At run time the six
input projections run as one matmul and the three convs as one (concatenated weights, cached).
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
from mixerzoo.mixers.base import (
    Mixer, MixerConfig, MixerState, cached_cat, fused_linear, recurrent_dtype, step_size_bias,
)
from mixerzoo.ops import ATTENTION_ONLY_BACKENDS, causal_conv1d, gated_delta_rule

_L2_EPS = 1e-6  # as fla's l2norm


class GatedDeltaNetConfig(MixerConfig):
    """Gated DeltaNet: H key heads of head_dim, HV value heads of head_dim * expand_v."""

    type: Literal["gated_deltanet"] = Field("gated_deltanet", description="the mixer type")
    n_heads: int = Field(gt=0, description="query / key heads")
    head_dim: int | None = Field(None, gt=0, description="key head dim; default d_model // n_heads")
    n_v_heads: int | None = Field(None, gt=0, description="value heads (a multiple of n_heads); default n_heads")
    expand_v: float = Field(2.0, gt=0, description="value head dim = head_dim * expand_v")
    conv_size: int = Field(4, ge=1, description="taps of the short causal convs on q, k, v")
    conv_bias: bool = Field(False, description="bias on the short causal convolution")
    allow_neg_eigval: bool = Field(False, description="beta = 2 * sigmoid(b): eigenvalues of the transition in (-1, 1]")
    norm_eps: float = Field(1e-5, gt=0, description="epsilon of the gated output RMSNorm")
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
        """Conv tail (activation dtype) plus the recurrent matrix (at least float32): constant."""
        item = torch.empty((), dtype=dtype).element_size()
        tails = (self.conv_size - 1) * (2 * self.n_heads * self.key_dim + self.value_heads * self.value_dim) * item
        matrix = self.value_heads * self.key_dim * self.value_dim * max(item, 4)
        return batch_size * (tails + matrix)


@dataclasses.dataclass
class GatedDeltaNetState(MixerState):
    """The conv tail of q, k and v side by side (last conv_size - 1 valid inputs) and the recurrent matrix."""

    conv: torch.Tensor  # [B, W - 1, 2 H K + HV V]: q channels, then k, then v
    recurrent: torch.Tensor = dataclasses.field(metadata={"float32": True})  # [B, HV, K, V], float32 (float64 runs: float64)


class GatedDeltaNet(Mixer):
    """Gated DeltaNet mixer with fla-compatible parameters."""

    config_class = GatedDeltaNetConfig
    state_class = GatedDeltaNetState
    dense_valid = True

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
        """Zero conv tail (activation dtype) and a zero recurrent matrix (float32, or float64)."""
        c = self.config
        device, dtype = self.state_placement(device, dtype)

        conv = torch.zeros(batch_size, c.conv_size - 1, self._conv_width, device=device, dtype=dtype)
        matrix = torch.zeros(batch_size, c.value_heads, c.key_dim, c.value_dim, device=device, dtype=recurrent_dtype(dtype))
        return GatedDeltaNetState(conv=conv, recurrent=matrix)

    @property
    def _conv_width(self) -> int:
        """Channels of the q, k and v convs together: 2 H K + HV V."""
        c = self.config
        return 2 * c.n_heads * c.key_dim + c.value_heads * c.value_dim

    def _forward(self, x, state, positions, valid):
        c = self.config
        batch, length, _ = x.shape
        key_width, value_width = c.n_heads * c.key_dim, c.value_heads * c.value_dim
        # the six input projections as one matmul: q | k | v (the conv's channels) | gate | a | b
        projections = (self.q_proj, self.k_proj, self.v_proj, self.g_proj, self.a_proj, self.b_proj)
        qkv, gate, a, b = fused_linear(self, "in", projections, x).split(
            [self._conv_width, value_width, c.value_heads, c.value_heads], dim=-1
        )
        convs = (self.q_conv1d, self.k_conv1d, self.v_conv1d)
        weight = cached_cat(self, "conv.weight", [conv.weight for conv in convs])[:, 0]  # [2HK + HV V, W]
        bias = cached_cat(self, "conv.bias", [conv.bias for conv in convs]) if c.conv_bias else None
        backend = "reference" if c.backend == "reference" else "torch"  # the conv has no CUDA kernel
        qkv, conv = causal_conv1d(qkv, weight, state.conv, valid, bias, backend=backend)
        q, k, v = F.silu(qkv).split([key_width, key_width, value_width], dim=-1)
        q = _l2_normalize(q.unflatten(-1, (c.n_heads, c.key_dim)))
        k = _l2_normalize(k.unflatten(-1, (c.n_heads, c.key_dim)))
        v = v.unflatten(-1, (c.value_heads, c.value_dim))
        g, beta = self._gates(a, b, valid)
        o, recurrent = gated_delta_rule(
            q, k, v, g, beta, initial_state=state.recurrent, backend=c.backend, chunk_size=c.chunk_size
        )
        o = self.o_norm(o) * F.silu(gate.unflatten(-1, (c.value_heads, c.value_dim)))
        y = self.o_proj(o.reshape(batch, length, -1))
        y = y if valid is None else y * valid[..., None]
        return y, GatedDeltaNetState(conv=conv, recurrent=recurrent.to(state.recurrent.dtype))

    def _gates(self, a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Log decay g and write strength beta [B, T, HV] from the a and b projections; both zero
        at pads (valid False), so a pad neither decays nor writes and the state passes through it exactly."""
        beta = torch.sigmoid(b)
        if self.config.allow_neg_eigval:
            beta = 2.0 * beta
        g = -self.A_log.exp() * F.softplus(a + self.dt_bias)
        if valid is None:
            return g, beta
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
