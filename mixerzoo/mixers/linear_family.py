"""The matrix-state linear mixers as presets over two ops: gated_linear_attention (linear attention,
Based, RetNet, lightning, GLA, HGRN2) and gated_delta_rule (DeltaNet, KDA).

Every preset is the same layer: q, k, v projections (optionally through short causal convs + SiLU),
a feature map on q and k, per-token decays / write strengths from the input, the op, a per-head
RMSNorm of the output times an optional gate, and o_proj. The presets differ only in their defaults
and in how they compute the decay (`_decay`) and the write strength (`_beta`). The state is the conv
tail plus the [HV, K, V] matrix: constant in tokens seen. A pad neither decays nor writes the
matrix (its decay and its value are zeroed), does not move the conv window, and outputs zero.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn
from typing_extensions import Self

from mixerzoo.mixers.base import Mixer, MixerConfig, MixerState, cached_cat, fused_linear, recurrent_dtype, step_size_bias
from mixerzoo.ops import ATTENTION_ONLY_BACKENDS, causal_conv1d, gated_delta_product, gated_delta_rule, gated_linear_attention

_L2_EPS = 1e-6  # as fla's l2norm


class LinearMixerConfig(MixerConfig):
    """Fields every matrix-state linear mixer shares: H heads of key dim K and value dim K * expand_v."""

    n_heads: int = Field(4, gt=0, description="heads (query, key and value)")
    head_dim: int | None = Field(None, gt=0, description="key head dim before the feature map; default d_model // n_heads")
    expand_v: float = Field(1.0, gt=0, description="value head dim = head_dim * expand_v")
    conv_size: int = Field(0, ge=0, description="taps of the short causal convs on q, k, v (0: no convs)")
    output_gate: Literal["none", "silu", "sigmoid"] = Field("silu", description="gate on the normalised output")
    norm_eps: float = Field(1e-5, gt=0, description="epsilon of the per-head output RMSNorm")
    chunk_size: int = Field(64, gt=0, description="chunk length of the chunked op")

    @model_validator(mode="after")
    def _shapes_fit(self) -> Self:
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"n_heads ({self.n_heads}) does not divide d_model ({self.d_model}); set head_dim")
        if self.expand_v is not None and not float(self.key_dim * self.expand_v).is_integer():
            raise ValueError(f"head_dim ({self.key_dim}) * expand_v ({self.expand_v}) must be an integer")
        if self.backend in ATTENTION_ONLY_BACKENDS:
            raise ValueError(f"backend {self.backend!r} is attention's; use 'auto', 'reference', 'torch' or 'fla'")
        return self

    @property
    def key_dim(self) -> int:
        """Per-head key (and query) dimension before the feature map."""
        return self.head_dim or self.d_model // self.n_heads

    @property
    def feature_dim(self) -> int:
        """Per-head key dimension the state holds (after the feature map)."""
        return self.key_dim

    @property
    def value_dim(self) -> int:
        """Per-head value dimension."""
        return int(self.key_dim * self.expand_v)

    def mixing_flops_per_token(self, context: int) -> int:
        """Recurrent form per head: decay (KV, when decaying), read (2KV), and per write 2KV (the delta rule's error 2KV more)."""
        per_entry = 2 + self.decays + self.householder * (4 if self.delta else 2)
        return per_entry * self.n_heads * self.feature_dim * self.value_dim

    @property
    def decays(self) -> bool:
        """Whether the state decays per token."""
        return True

    @property
    def householder(self) -> int:
        """Writes per token (keys, values and write strengths per token): 1 but for Gated DeltaProduct."""
        return 1

    @property
    def conv_width(self) -> int:
        """Channels of q, k and v side by side: H K + n H (K + V) for n writes per token."""
        return self.n_heads * (self.key_dim + self.householder * (self.key_dim + self.value_dim))

    @property
    def delta(self) -> bool:
        """Whether writes follow the delta rule (gated_delta_rule) rather than add (gated_linear_attention)."""
        return False

    def state_nbytes(self, n_tokens: int, batch_size: int = 1, *, dtype: torch.dtype = torch.float32) -> int:
        """Conv tail (activation dtype) plus the recurrent matrix (at least float32): constant."""
        item = torch.empty((), dtype=dtype).element_size()
        tails = max(self.conv_size - 1, 0) * self.conv_width * item
        return batch_size * (tails + self.n_heads * self.feature_dim * self.value_dim * max(item, 4))


@dataclasses.dataclass
class LinearMixerState(MixerState):
    """The conv tail of q, k and v (last conv_size - 1 valid inputs; width 0 without convs) and the matrix."""

    conv: torch.Tensor  # [B, max(W - 1, 0), conv_width]
    recurrent: torch.Tensor = dataclasses.field(metadata={"float32": True})  # [B, H, K', V], float32 (float64 runs)


class LinearMixer(Mixer):
    """Base of the matrix-state linear mixers; a preset sets `config_class` and overrides `_decay` / `_beta`."""

    state_class = LinearMixerState
    dense_valid = True
    feature_map_on: ClassVar[str] = "qk"  # which of q, k take `_features`
    norm_over_heads: ClassVar[bool] = False  # one RMSNorm over all heads' outputs (MiniMax) instead of one per head
    scaled: ClassVar[bool] = True  # the op's scale feature_dim ** -0.5 (False: 1, as lightning attention)

    def __init__(self, config: LinearMixerConfig):
        super().__init__(config)
        c = config
        key_width, value_width, n = c.n_heads * c.key_dim, c.n_heads * c.value_dim, c.householder
        self.q_proj = nn.Linear(c.d_model, key_width, bias=False)
        self.k_proj = nn.Linear(c.d_model, n * key_width, bias=False)
        self.v_proj = nn.Linear(c.d_model, n * value_width, bias=False)
        if c.conv_size:
            self.q_conv1d = nn.Conv1d(key_width, key_width, c.conv_size, groups=key_width, bias=False)
            self.k_conv1d = nn.Conv1d(n * key_width, n * key_width, c.conv_size, groups=n * key_width, bias=False)
            self.v_conv1d = nn.Conv1d(n * value_width, n * value_width, c.conv_size, groups=n * value_width, bias=False)
        if c.output_gate != "none":
            self.g_proj = nn.Linear(c.d_model, value_width, bias=False)
        self.o_norm = nn.RMSNorm(value_width if self.norm_over_heads else c.value_dim, eps=c.norm_eps)
        self.o_proj = nn.Linear(value_width, c.d_model, bias=False)

    def init_state(self, batch_size, *, device=None, dtype=None):
        """Zero conv tail (activation dtype) and a zero matrix (float32, or float64)."""
        c = self.config
        device, dtype = self.state_placement(device, dtype)
        conv = torch.zeros(batch_size, max(c.conv_size - 1, 0), c.conv_width, device=device, dtype=dtype)
        matrix = torch.zeros(batch_size, c.n_heads, c.feature_dim, c.value_dim, device=device, dtype=recurrent_dtype(dtype))
        return LinearMixerState(conv=conv, recurrent=matrix)

    def _forward(self, x, state, positions, valid):
        c = self.config
        batch, length, _ = x.shape
        key_width, value_width, n = c.n_heads * c.key_dim, c.n_heads * c.value_dim, c.householder
        qkv = fused_linear(self, "qkv", (self.q_proj, self.k_proj, self.v_proj), x)
        conv = state.conv
        if c.conv_size:
            weight = cached_cat(self, "conv.weight", [m.weight for m in (self.q_conv1d, self.k_conv1d, self.v_conv1d)])
            qkv, conv = causal_conv1d(qkv, weight[:, 0], state.conv, valid, backend=self._conv_backend)
            qkv = F.silu(qkv)
        q, k, v = qkv.split([key_width, n * key_width, n * value_width], dim=-1)
        q, k = (t.unflatten(-1, (-1, c.key_dim)) for t in (q, k))  # [B, T, H, K], [B, T, n H, K]
        q, k = (self._features(t) if name in self.feature_map_on else t for name, t in (("q", q), ("k", k)))
        v = self._values(v.unflatten(-1, (-1, c.value_dim)))  # [B, T, n H, V]
        g, beta = self._decay(x, k), self._beta(x)
        if valid is not None:  # a pad neither decays nor writes
            pad = ~valid[..., None]
            g = None if g is None else g.masked_fill(pad if g.dim() == 3 else pad[..., None], 0.0)
            if beta is not None:
                beta = beta.masked_fill(pad, 0.0)
            v = v.masked_fill(pad[..., None], 0.0)
        o, recurrent = self._mix(q, k, v, g, beta, state.recurrent)
        o = self.o_norm(o.flatten(-2)).unflatten(-1, o.shape[-2:]) if self.norm_over_heads else self.o_norm(o)
        if c.output_gate != "none":
            gate = self.g_proj(x).unflatten(-1, (c.n_heads, c.value_dim))
            o = o * (F.silu(gate) if c.output_gate == "silu" else torch.sigmoid(gate))
        y = self.o_proj(o.reshape(batch, length, value_width))
        y = y if valid is None else y * valid[..., None]
        return y, LinearMixerState(conv=conv, recurrent=recurrent.to(state.recurrent.dtype))

    @property
    def _conv_backend(self) -> str:
        return "reference" if self.config.backend == "reference" else "torch"  # the conv has no CUDA kernel

    def _mix(self, q, k, v, g, beta, recurrent):
        """The op: q, k [B, T, H, K']; v [B, T, H, V]; g None / [B, T, H] / [B, T, H, K']; beta [B, T, H]."""
        c = self.config
        scale = c.feature_dim**-0.5 if self.scaled else 1.0
        if c.delta:
            return gated_delta_rule(q, k, v, g, beta, scale=scale, initial_state=recurrent, backend=c.backend,
                                    chunk_size=c.chunk_size)
        return gated_linear_attention(q, k, v, g, scale=scale, initial_state=recurrent, backend=c.backend,
                                      chunk_size=c.chunk_size)

    def _features(self, t: torch.Tensor) -> torch.Tensor:
        """The feature map on q or k [B, T, H, K] -> [B, T, H, K']; identity by default."""
        return t

    def _values(self, v: torch.Tensor) -> torch.Tensor:
        """The activation on v [B, T, H, V]; identity by default."""
        return v

    def _decay(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
        """Log decay None / [B, T, H] / [B, T, H, K'] from the input x [B, T, d] (and the mapped keys)."""
        return None

    def _beta(self, x: torch.Tensor) -> torch.Tensor | None:
        """The delta rule's write strength [B, T, H] (None for additive writes)."""
        return None


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim."""
    return x * torch.rsqrt(x.square().sum(-1, keepdim=True) + _L2_EPS)


def taylor_features(x: torch.Tensor) -> torch.Tensor:
    """Based's second-order Taylor map of exp(q . k): [.., K] -> [.., 1 + K + K^2] with
    phi(q) . phi(k) = 1 + q.k + (q.k)^2 / 2 (inputs scaled by K ** -0.25, as Based does)."""
    x = x * x.shape[-1] ** -0.25
    outer = (x[..., :, None] * x[..., None, :]).flatten(-2) * 0.5**0.5
    return torch.cat([torch.ones_like(x[..., :1]), x, outer], dim=-1)


# ---- presets over gated_linear_attention ----------------------------------------------------------------------


class LinearAttentionConfig(LinearMixerConfig):
    """Linear attention (Katharopoulos et al. 2020): S_t = S_{t-1} + phi(k_t) v_t^T, no decay."""

    type: Literal["linear_attention"] = Field("linear_attention", description="the mixer type")
    feature_map: Literal["identity", "elu_plus_one", "taylor"] = Field(
        "elu_plus_one", description="phi on q and k: identity, elu(x) + 1 (Katharopoulos), Based's 2nd-order Taylor")
    output_gate: Literal["none", "silu", "sigmoid"] = Field("none", description="gate on the normalised output")

    @property
    def feature_dim(self) -> int:
        """Per-head key dimension after the feature map (1 + K + K^2 for Taylor)."""
        return 1 + self.key_dim + self.key_dim**2 if self.feature_map == "taylor" else self.key_dim

    @property
    def decays(self) -> bool:
        """Linear attention never decays."""
        return False


class LinearAttention(LinearMixer):
    """Linear attention with a chosen feature map."""

    config_class = LinearAttentionConfig

    def _features(self, t):
        if self.config.feature_map == "elu_plus_one":
            return F.elu(t) + 1.0
        if self.config.feature_map == "taylor":
            return taylor_features(t)
        return t


class BasedConfig(LinearAttentionConfig):
    """Based (Arora et al. 2024): linear attention with the Taylor map on small (16-dim) keys, values full width."""

    type: Literal["based"] = Field("based", description="the mixer type")
    head_dim: int | None = Field(16, gt=0, description="key feature dim before the Taylor map (Based: 16)")
    feature_map: Literal["identity", "elu_plus_one", "taylor"] = Field("taylor", description="phi on q and k")
    expand_v: float | None = Field(None, gt=0, description="value head dim = head_dim * expand_v; default d_model // n_heads")

    @property
    def value_dim(self) -> int:
        """Per-head value dimension: d_model // n_heads unless expand_v is set."""
        return int(self.key_dim * self.expand_v) if self.expand_v else self.d_model // self.n_heads

    @model_validator(mode="after")
    def _values_fit(self) -> Self:
        if self.expand_v is None and self.d_model % self.n_heads:
            raise ValueError(f"n_heads ({self.n_heads}) does not divide d_model ({self.d_model}); set expand_v")
        return self


class Based(LinearAttention):
    """Based's linear attention (the sliding-window half is an `attention` layer with a window)."""

    config_class = BasedConfig


class RetNetConfig(LinearMixerConfig):
    """RetNet's retention (Sun et al. 2023): a fixed decay per head, gamma_h = 1 - 2^(-5 - h)."""

    type: Literal["retnet"] = Field("retnet", description="the mixer type")


class _FixedDecay(LinearMixer):
    """A preset whose decay is a constant per head (`head_log_decay`), held as a buffer."""

    def __init__(self, config):
        super().__init__(config)
        self.register_buffer("log_decay", self.head_log_decay(config).float(), persistent=False)

    @staticmethod
    def head_log_decay(config) -> torch.Tensor:
        """The log decay of each head [H], computed in float64."""
        raise NotImplementedError

    def _decay(self, x, k):
        return self.log_decay.to(torch.float64 if x.dtype == torch.float64 else torch.float32).expand(*x.shape[:2], -1)


class RetNet(_FixedDecay):
    """Multi-scale retention: a head-wise fixed decay, swish-gated normalised output."""

    config_class = RetNetConfig

    @staticmethod
    def head_log_decay(config):
        heads = torch.arange(config.n_heads, dtype=torch.float64)
        return torch.log1p(-(2.0 ** (-5.0 - heads)))


class LightningConfig(LinearMixerConfig):
    """MiniMax-01's lightning attention: SiLU on q, k, v, unscaled, a fixed per-head decay exp(-s_h) with
    s_h = (2^(-8 / H))^(h + 1) * decay_scale, one RMSNorm over all heads and a sigmoid output gate."""

    type: Literal["lightning"] = Field("lightning", description="the mixer type")
    output_gate: Literal["none", "silu", "sigmoid"] = Field("sigmoid", description="gate on the normalised output")
    decay_scale: float = Field(1.0, gt=0, description="MiniMax's per-layer factor on the slopes (1 - l / (L - 1) + 1e-5 at layer l)")


class Lightning(_FixedDecay):
    """Lightning attention with MiniMax's fixed slopes."""

    config_class = LightningConfig
    norm_over_heads = True
    scaled = False

    @staticmethod
    def head_log_decay(config):
        base = 2.0 ** (-8.0 / config.n_heads)
        return -(base ** torch.arange(1, config.n_heads + 1, dtype=torch.float64)) * config.decay_scale

    def _features(self, t):
        return F.silu(t)

    def _values(self, v):
        return F.silu(v)


class GLAConfig(LinearMixerConfig):
    """Gated linear attention (Yang et al. 2024): a per-channel decay logsigmoid(W2 W1 x) / normalizer."""

    type: Literal["gla"] = Field("gla", description="the mixer type")
    expand_v: float = Field(2.0, gt=0, description="value head dim = head_dim * expand_v (GLA: 2)")
    gate_low_rank: int = Field(16, gt=0, description="rank of the decay projection W2 W1")
    gate_logit_normalizer: float = Field(16.0, gt=0, description="the log decay is logsigmoid(.) / this")


class GLA(LinearMixer):
    """GLA with fla's parameter names (q/k/v/g/o_proj, gk_proj as two linears)."""

    config_class = GLAConfig

    def __init__(self, config):
        super().__init__(config)
        c = config
        self.gk_proj = nn.Sequential(nn.Linear(c.d_model, c.gate_low_rank, bias=False),
                                     nn.Linear(c.gate_low_rank, c.n_heads * c.key_dim, bias=True))

    def _decay(self, x, k):
        c = self.config
        return (F.logsigmoid(self.gk_proj(x)) / c.gate_logit_normalizer).unflatten(-1, (c.n_heads, c.key_dim))


class HGRN2Config(LinearMixerConfig):
    """HGRN2 (Qin et al. 2024): the forget gate f = sigmoid(k_proj x) decays the state per channel and
    the key is 1 - f (the input gate tied to it); the query passes SiLU."""

    type: Literal["hgrn2"] = Field("hgrn2", description="the mixer type")


class HGRN2(LinearMixer):
    """HGRN2's outer-product recurrence: k_proj gives the forget gate, v_proj the input."""

    config_class = HGRN2Config
    feature_map_on = "q"

    def _features(self, t):
        return F.silu(t)

    def _decay(self, x, k):
        return F.logsigmoid(k)  # log f

    def _mix(self, q, k, v, g, beta, recurrent):
        return super()._mix(q, -torch.expm1(g), v, g, beta, recurrent)  # key 1 - f


# ---- presets over gated_delta_rule ------------------------------------------------------------------------------


class DeltaNetConfig(LinearMixerConfig):
    """DeltaNet (Schlag et al. 2021; Yang et al. 2024): S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T,
    L2-normalised q and k after short convs, beta = sigmoid(b_proj x)."""

    type: Literal["deltanet"] = Field("deltanet", description="the mixer type")
    conv_size: int = Field(4, ge=0, description="taps of the short causal convs on q, k, v (0: no convs)")
    output_gate: Literal["none", "silu", "sigmoid"] = Field("none", description="gate on the normalised output")
    allow_neg_eigval: bool = Field(False, description="beta = 2 * sigmoid(b): eigenvalues of the transition in (-1, 1]")

    @property
    def delta(self) -> bool:
        """DeltaNet writes by the delta rule."""
        return True

    @property
    def decays(self) -> bool:
        """DeltaNet does not decay."""
        return False


class DeltaNet(LinearMixer):
    """DeltaNet with fla's parameter names."""

    config_class = DeltaNetConfig

    def __init__(self, config):
        super().__init__(config)
        self.b_proj = nn.Linear(config.d_model, config.householder * config.n_heads, bias=False)  # a beta per write

    def _features(self, t):
        return l2_normalize(t)

    def _beta(self, x):
        beta = torch.sigmoid(self.b_proj(x))
        return 2.0 * beta if self.config.allow_neg_eigval else beta


class KDAConfig(DeltaNetConfig):
    """Kimi Delta Attention (Kimi Linear, 2025): the gated delta rule with a per-channel decay
    g = -exp(A_log_h) * softplus(f_b f_a x + dt_bias) and a sigmoid output gate."""

    type: Literal["kda"] = Field("kda", description="the mixer type")
    output_gate: Literal["none", "silu", "sigmoid"] = Field("sigmoid", description="gate on the normalised output")
    gate_low_rank: int | None = Field(None, gt=0, description="rank of the decay projection f_b f_a; default head_dim")

    @property
    def decays(self) -> bool:
        """KDA decays per channel."""
        return True


class KDA(DeltaNet):
    """KDA with Kimi Linear's decay parameters (f_a_proj, f_b_proj, A_log, dt_bias)."""

    config_class = KDAConfig

    def __init__(self, config):
        super().__init__(config)
        c = config
        rank = c.gate_low_rank or c.key_dim
        self.f_a_proj = nn.Linear(c.d_model, rank, bias=False)
        self.f_b_proj = nn.Linear(rank, c.n_heads * c.key_dim, bias=False)
        self.A_log = nn.Parameter(torch.empty(c.n_heads).uniform_(1, 16).log())
        self.dt_bias = nn.Parameter(step_size_bias(c.n_heads * c.key_dim))

    def _decay(self, x, k):
        c = self.config
        logits = (self.f_b_proj(self.f_a_proj(x)) + self.dt_bias).unflatten(-1, (c.n_heads, c.key_dim))
        return -self.A_log.exp()[:, None] * F.softplus(logits)  # [B, T, H, K]


class GatedDeltaProductConfig(DeltaNetConfig):
    """Gated DeltaProduct (Siems et al. 2025, arXiv:2502.10297): num_householder delta-rule writes per token
    (each its own key, value and beta) after Gated DeltaNet's scalar decay -exp(A_log) softplus(a_proj x + dt_bias)."""

    type: Literal["gated_deltaproduct"] = Field("gated_deltaproduct", description="the mixer type")
    num_householder: int = Field(2, ge=1, description="delta-rule writes (Householder steps) per token")
    output_gate: Literal["none", "silu", "sigmoid"] = Field("silu", description="gate on the normalised output")

    @property
    def householder(self) -> int:
        """Writes per token."""
        return self.num_householder

    @property
    def decays(self) -> bool:
        """Gated DeltaProduct decays per token."""
        return True


class GatedDeltaProduct(DeltaNet):
    """Gated DeltaProduct over gated_delta_product."""

    config_class = GatedDeltaProductConfig

    def __init__(self, config):
        super().__init__(config)
        c = config
        self.a_proj = nn.Linear(c.d_model, c.n_heads, bias=False)
        self.A_log = nn.Parameter(torch.empty(c.n_heads).uniform_(0, 16).log())
        self.dt_bias = nn.Parameter(step_size_bias(c.n_heads))

    def _decay(self, x, k):
        return -self.A_log.exp() * F.softplus(self.a_proj(x) + self.dt_bias)  # [B, T, H]

    def _mix(self, q, k, v, g, beta, recurrent):
        c = self.config
        steps = [t.unflatten(2, (c.num_householder, c.n_heads)).flatten(1, 2) for t in (k, v, beta)]  # [B, T n, H, ..]
        return gated_delta_product(q, *steps[:2], g, steps[2], num_householder=c.num_householder,
                                   initial_state=recurrent, backend=c.backend, chunk_size=c.chunk_size)


PRESETS: tuple[type[LinearMixer], ...] = (
    LinearAttention, Based, RetNet, Lightning, GLA, HGRN2, DeltaNet, KDA, GatedDeltaProduct,
)
