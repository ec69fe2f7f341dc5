"""Mixers whose state is a vector per channel, not a matrix: LFM2's gated short convolution, Mamba1's
selective scan and Griffin's RG-LRU block, the latter two over `elementwise_recurrence`.

Parameter names and shapes equal transformers' (Lfm2ShortConv, MambaMixer, RecurrentGemmaRecurrentBlock),
so their state_dicts load as they are. Every state is constant in tokens seen; a pad does not move a
conv window, neither decays nor writes a recurrence, and outputs zero.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn
from typing_extensions import Self

from mixerzoo.mixers.base import Mixer, MixerConfig, MixerState, recurrent_dtype, step_size_bias
from mixerzoo.ops import ATTENTION_ONLY_BACKENDS, causal_conv1d, elementwise_recurrence


class _RecurrentBackend(MixerConfig):
    """A backend check shared by the mixers here (attention's backends have no recurrence)."""

    @model_validator(mode="after")
    def _recurrent_backend(self) -> Self:
        if self.backend in ATTENTION_ONLY_BACKENDS:
            raise ValueError(f"backend {self.backend!r} is attention's; use 'auto', 'reference', 'torch' or 'fla'")
        return self


def _conv(module: nn.Conv1d, x, tail, valid, backend):
    """causal_conv1d with an nn.Conv1d's parameters (the conv has no CUDA kernel here)."""
    return causal_conv1d(x, module.weight[:, 0], tail, valid, module.bias,
                         backend="reference" if backend == "reference" else "torch")


# ---- LFM2's gated short convolution ---------------------------------------------------------------------------


class ShortConvConfig(_RecurrentBackend):
    """LFM2's gated short convolution (Liquid AI 2025): B, C, x = in_proj(u); y = out_proj(C * conv(B * x))."""

    type: Literal["short_conv"] = Field("short_conv", description="the mixer type")
    conv_size: int = Field(3, ge=1, description="taps of the depthwise causal conv (LFM2's conv_L_cache)")
    bias: bool = Field(False, description="bias on in_proj, the conv and out_proj (LFM2's conv_bias)")

    def mixing_flops_per_token(self, context: int) -> int:
        """The conv (2 W per channel) and the two gates (1 each)."""
        return (2 * self.conv_size + 2) * self.d_model

    def state_nbytes(self, n_tokens: int, batch_size: int = 1, *, dtype: torch.dtype = torch.float32) -> int:
        """The conv tail: W - 1 inputs of d_model channels in the activation dtype."""
        return batch_size * (self.conv_size - 1) * self.d_model * torch.empty((), dtype=dtype).element_size()


@dataclasses.dataclass
class ShortConvState(MixerState):
    """The last conv_size - 1 valid gated inputs B * x."""

    conv: torch.Tensor  # [B, W - 1, d_model]


class ShortConv(Mixer):
    """LFM2's ShortConv block with transformers' parameter names (in_proj, conv, out_proj)."""

    config_class = ShortConvConfig
    state_class = ShortConvState
    residual_projection = "out_proj"
    dense_valid = True

    def __init__(self, config: ShortConvConfig):
        super().__init__(config)
        d = config.d_model
        self.in_proj = nn.Linear(d, 3 * d, bias=config.bias)
        self.conv = nn.Conv1d(d, d, config.conv_size, groups=d, bias=config.bias)
        self.out_proj = nn.Linear(d, d, bias=config.bias)

    def init_state(self, batch_size, *, device=None, dtype=None):
        """A zero conv tail in the activation dtype."""
        device, dtype = self.state_placement(device, dtype)
        return ShortConvState(conv=torch.zeros(batch_size, self.config.conv_size - 1, self.config.d_model,
                                               device=device, dtype=dtype))

    def _forward(self, x, state, positions, valid):
        b, c, u = self.in_proj(x).chunk(3, dim=-1)  # [B, T, d] each
        mixed, conv = _conv(self.conv, b * u, state.conv, valid, self.config.backend)
        y = self.out_proj(c * mixed)
        return (y if valid is None else y * valid[..., None]), ShortConvState(conv=conv)


# ---- Mamba1 -----------------------------------------------------------------------------------------------------


class MambaConfig(_RecurrentBackend):
    """Mamba (Gu & Dao 2023): a selective SSM, h_t = exp(dt_t A) h_t-1 + dt_t B_t x_t per channel and state
    dim, y_t = C_t h_t + D x_t, gated by SiLU(z)."""

    type: Literal["mamba"] = Field("mamba", description="the mixer type")
    d_state: int = Field(16, gt=0, description="N: state size per channel")
    d_conv: int = Field(4, gt=0, description="taps of the depthwise causal conv")
    expand: int = Field(2, gt=0, description="d_inner = expand * d_model")
    dt_rank: int | None = Field(None, gt=0, description="rank of the step-size projection; default ceil(d_model / 16)")
    conv_bias: bool = Field(True, description="bias on the conv")
    bias: bool = Field(False, description="bias on in_proj and out_proj")
    inner_norm_eps: float | None = Field(None, gt=0, description="RMSNorm the step-size input, B and C with this "
                                         "eps before the scan (Jamba's dt / b / c_layernorm); none when unset")
    chunk_size: int = Field(16, gt=0, description="chunk length of the chunked scan")

    omitted_when_default: ClassVar[tuple[str, ...]] = ("inner_norm_eps",)

    @property
    def d_inner(self) -> int:
        """Channels of the SSM: expand * d_model."""
        return self.expand * self.d_model

    @property
    def rank(self) -> int:
        """The step-size projection's rank."""
        return self.dt_rank or math.ceil(self.d_model / 16)

    def mixing_flops_per_token(self, context: int) -> int:
        """Per channel and state dim: decay exp and product (2), write dt B x (2), read C h (2); the conv (2 W), D skip
        and gate (3) per channel."""
        return self.d_inner * (6 * self.d_state + 2 * self.d_conv + 3)

    def state_nbytes(self, n_tokens: int, batch_size: int = 1, *, dtype: torch.dtype = torch.float32) -> int:
        """Conv tail (activation dtype) plus the SSM state [d_inner, N] (at least float32): constant."""
        item = torch.empty((), dtype=dtype).element_size()
        return batch_size * self.d_inner * ((self.d_conv - 1) * item + self.d_state * max(item, 4))


@dataclasses.dataclass
class MambaState(MixerState):
    """The conv tail and the SSM state."""

    conv: torch.Tensor  # [B, d_conv - 1, d_inner]
    ssm: torch.Tensor = dataclasses.field(metadata={"float32": True})  # [B, d_inner, N]


class Mamba(Mixer):
    """Mamba1 with transformers' MambaMixer parameter names (in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj)."""

    config_class = MambaConfig
    state_class = MambaState
    residual_projection = "out_proj"
    dense_valid = True

    def __init__(self, config: MambaConfig):
        super().__init__(config)
        c = config
        self.in_proj = nn.Linear(c.d_model, 2 * c.d_inner, bias=c.bias)
        self.conv1d = nn.Conv1d(c.d_inner, c.d_inner, c.d_conv, groups=c.d_inner, bias=c.conv_bias)
        self.x_proj = nn.Linear(c.d_inner, c.rank + 2 * c.d_state, bias=False)
        self.dt_proj = nn.Linear(c.rank, c.d_inner, bias=True)
        with torch.no_grad():
            self.dt_proj.bias.copy_(step_size_bias(c.d_inner))
        self.A_log = nn.Parameter(torch.arange(1, c.d_state + 1, dtype=torch.float32).log().repeat(c.d_inner, 1))
        self.D = nn.Parameter(torch.ones(c.d_inner))
        self.out_proj = nn.Linear(c.d_inner, c.d_model, bias=c.bias)
        if c.inner_norm_eps is not None:
            self.dt_layernorm = nn.RMSNorm(c.rank, eps=c.inner_norm_eps)
            self.b_layernorm = nn.RMSNorm(c.d_state, eps=c.inner_norm_eps)
            self.c_layernorm = nn.RMSNorm(c.d_state, eps=c.inner_norm_eps)

    def init_state(self, batch_size, *, device=None, dtype=None):
        """Zero conv tail (activation dtype) and zero SSM state (float32, or float64)."""
        c = self.config
        device, dtype = self.state_placement(device, dtype)
        return MambaState(conv=torch.zeros(batch_size, c.d_conv - 1, c.d_inner, device=device, dtype=dtype),
                          ssm=torch.zeros(batch_size, c.d_inner, c.d_state, device=device, dtype=recurrent_dtype(dtype)))

    def _forward(self, x, state, positions, valid):
        c = self.config
        u, z = self.in_proj(x).chunk(2, dim=-1)  # [B, T, d_inner] each
        u, conv = _conv(self.conv1d, u, state.conv, valid, c.backend)
        u = F.silu(u)
        dt, B, C = self.x_proj(u).split([c.rank, c.d_state, c.d_state], dim=-1)
        if c.inner_norm_eps is not None:
            dt, B, C = self.dt_layernorm(dt), self.b_layernorm(B), self.c_layernorm(C)
        compute = state.ssm.dtype
        dt = F.softplus(self.dt_proj(dt).to(compute))  # [B, T, d_inner]
        if valid is not None:
            dt = dt.masked_fill(~valid[..., None], 0.0)  # a pad neither decays nor writes
        log_decay = dt[..., None] * -self.A_log.to(compute).exp()  # [B, T, d_inner, N]
        write = (dt * u.to(compute))[..., None] * B.to(compute)[:, :, None, :]  # [B, T, d_inner, N]
        h, ssm = elementwise_recurrence(write.flatten(2), log_decay.flatten(2), state.ssm.flatten(1),
                                        backend=c.backend, chunk_size=c.chunk_size)
        y = (h.unflatten(-1, (c.d_inner, c.d_state)) * C.to(compute)[:, :, None, :]).sum(-1)  # [B, T, d_inner]
        y = (y.to(u.dtype) + u * self.D.to(u.dtype)) * F.silu(z)
        y = self.out_proj(y)
        return (y if valid is None else y * valid[..., None]), MambaState(conv=conv, ssm=ssm.view_as(state.ssm))


# ---- Griffin / RecurrentGemma's recurrent block ------------------------------------------------------------------


class RGLRUConfig(_RecurrentBackend):
    """Griffin's recurrent block (De et al. 2024; RecurrentGemma): out(gelu(W_y u) * RG-LRU(conv(W_x u))),
    the RG-LRU a_t = sigmoid(lambda)^(c r_t), h_t = a_t h_t-1 + sqrt(1 - a_t^2) (i_t x_t) (1 at a stream's
    first token), r_t and i_t block-diagonal gates over n_heads blocks."""

    type: Literal["rglru"] = Field("rglru", description="the mixer type")
    lru_width: int | None = Field(None, gt=0, description="channels of the recurrence; default d_model")
    n_heads: int = Field(4, gt=0, description="blocks of the block-diagonal gates (RecurrentGemma: its attention heads)")
    conv_size: int = Field(4, ge=1, description="taps of the depthwise causal conv (conv1d_width)")
    gate_exponent: float = Field(8.0, gt=0, description="c in a_t = sigmoid(lambda)^(c r_t)")
    chunk_size: int = Field(16, gt=0, description="chunk length of the chunked scan")

    @model_validator(mode="after")
    def _blocks_fit(self) -> Self:
        if self.width % self.n_heads:
            raise ValueError(f"n_heads ({self.n_heads}) does not divide lru_width ({self.width})")
        return self

    @property
    def width(self) -> int:
        """Channels of the recurrence."""
        return self.lru_width or self.d_model

    def mixing_flops_per_token(self, context: int) -> int:
        """The conv (2 W), the two block-diagonal gates (4 * block width), the recurrence (6) and the branch product, per channel."""
        return self.width * (2 * self.conv_size + 4 * (self.width // self.n_heads) + 7)

    def state_nbytes(self, n_tokens: int, batch_size: int = 1, *, dtype: torch.dtype = torch.float32) -> int:
        """Conv tail (activation dtype), the recurrence (at least float32) and one started flag per row: constant."""
        item = torch.empty((), dtype=dtype).element_size()
        return batch_size * (self.width * ((self.conv_size - 1) * item + max(item, 4)) + 1)


@dataclasses.dataclass
class RGLRUState(MixerState):
    """The conv tail, the recurrence, and whether the row has seen a token (the RG-LRU's first-token rule)."""

    conv: torch.Tensor  # [B, W - 1, lru_width]
    recurrent: torch.Tensor = dataclasses.field(metadata={"float32": True})  # [B, lru_width]
    started: torch.Tensor  # [B] bool


class RGLRU(Mixer):
    """Griffin's recurrent block with transformers' RecurrentGemmaRecurrentBlock parameter names."""

    config_class = RGLRUConfig
    state_class = RGLRUState
    residual_projection = "linear_out"
    dense_valid = True

    def __init__(self, config: RGLRUConfig):
        super().__init__(config)
        c = config
        width, block = c.width, c.width // c.n_heads
        self.linear_y = nn.Linear(c.d_model, width)
        self.linear_x = nn.Linear(c.d_model, width)
        self.linear_out = nn.Linear(width, c.d_model)
        self.conv_1d = nn.Conv1d(width, width, c.conv_size, groups=width)
        self.rg_lru = _RGLRUGates(c.n_heads, block, c.gate_exponent)

    def init_state(self, batch_size, *, device=None, dtype=None):
        """Zero conv tail and recurrence; no row started."""
        c = self.config
        device, dtype = self.state_placement(device, dtype)
        return RGLRUState(conv=torch.zeros(batch_size, c.conv_size - 1, c.width, device=device, dtype=dtype),
                          recurrent=torch.zeros(batch_size, c.width, device=device, dtype=recurrent_dtype(dtype)),
                          started=torch.zeros(batch_size, dtype=torch.bool, device=device))

    def _forward(self, x, state, positions, valid):
        c = self.config
        y_branch = F.gelu(self.linear_y(x), approximate="tanh")
        u, conv = _conv(self.conv_1d, self.linear_x(x), state.conv, valid, c.backend)
        steps = torch.ones_like(u[..., 0], dtype=torch.bool) if valid is None else valid  # [B, T]
        before = (steps.cumsum(1) - steps.long()) > 0  # a valid token earlier in this chunk
        seen = state.started[:, None] | before  # [B, T]: not the row's first token
        log_a, scaled = self.rg_lru(u.to(state.recurrent.dtype), seen)
        if valid is not None:
            log_a = log_a.masked_fill(~valid[..., None], 0.0)
            scaled = scaled.masked_fill(~valid[..., None], 0.0)
        h, recurrent = elementwise_recurrence(scaled, log_a, state.recurrent, backend=c.backend,
                                              chunk_size=c.chunk_size)
        y = self.linear_out(h.to(x.dtype) * y_branch)
        y = y if valid is None else y * valid[..., None]
        return y, RGLRUState(conv=conv, recurrent=recurrent, started=state.started | steps.any(1))


class _RGLRUGates(nn.Module):
    """The RG-LRU's parameters (RecurrentGemmaRglru's names): the recurrence's log decay and scaled input."""

    def __init__(self, n_heads: int, block: int, exponent: float):
        super().__init__()
        self.exponent = exponent
        width = n_heads * block
        # Griffin's init: the base decay a = exp(-softplus(recurrent_param)) with a^2 uniform in [0.9^2, 0.999^2]
        base = torch.empty(width).uniform_(0.9**2, 0.999**2).sqrt()
        self.recurrent_param = nn.Parameter(torch.log(1 / base - 1))  # softplus of it is -log a
        self.input_gate_weight = nn.Parameter(torch.randn(n_heads, block, block) * block**-0.5)
        self.input_gate_bias = nn.Parameter(torch.zeros(n_heads, block))
        self.recurrent_gate_weight = nn.Parameter(torch.randn(n_heads, block, block) * block**-0.5)
        self.recurrent_gate_bias = nn.Parameter(torch.zeros(n_heads, block))

    def forward(self, u: torch.Tensor, seen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u [B, T, width]; seen [B, T] bool -> log a [B, T, width], the scaled input [B, T, width]."""
        blocks = u.unflatten(-1, (self.input_gate_bias.shape[0], -1))  # [B, T, H, block]
        dtype = u.dtype

        def gate(weight, bias):
            return torch.sigmoid(torch.einsum("bthi,hij->bthj", blocks, weight.to(dtype)) + bias.to(dtype)).flatten(-2)

        input_gate = gate(self.input_gate_weight, self.input_gate_bias)
        recurrent_gate = gate(self.recurrent_gate_weight, self.recurrent_gate_bias)
        log_a = -self.exponent * recurrent_gate * F.softplus(self.recurrent_param.to(dtype))
        multiplier = torch.where(seen[..., None], torch.sqrt(-torch.expm1(2 * log_a)), 1.0)
        return log_a, u * input_gate * multiplier


PRESETS: tuple[type[Mixer], ...] = (ShortConv, Mamba, RGLRU)
