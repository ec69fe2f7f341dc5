"""Mamba2 as a mixer: a selective state-space model computed with the SSD scan.

Parameters are named and shaped as in mamba_ssm's Mamba2 (in_proj, conv1d, dt_bias,
A_log, D, norm, out_proj), so its checkpoints load as they are. The state is the
short conv's tail (the last d_conv - 1 valid inputs) and the SSM state [B, H, P, N];
both are constant in the number of tokens seen. A pad neither decays nor writes the
SSM state, does not shift the conv window, and its output is zero. Positions are
ignored (no rotary).
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
from mixerzoo.ops import ATTENTION_ONLY_BACKENDS, causal_conv1d, ssd


class Mamba2Config(MixerConfig):
    """Mamba2 mixer (mamba_ssm defaults): d_inner = expand * d_model split into heads of head_dim."""

    type: Literal["mamba2"] = Field("mamba2", description="the mixer type")
    d_state: int = Field(128, gt=0, description="N: state size per head and channel")
    d_conv: int = Field(4, gt=0, description="W: taps of the depthwise causal conv")
    expand: int = Field(2, gt=0, description="d_inner = expand * d_model")
    head_dim: int = Field(64, gt=0, description="P: channels per SSM head")
    n_groups: int = Field(1, gt=0, description="G: groups of heads sharing B and C")
    chunk_size: int = Field(256, gt=0, description="chunk length of the chunked SSD scan")
    dt_min: float = Field(0.001, gt=0, description="init: smallest step size")
    dt_max: float = Field(0.1, gt=0, description="init: largest step size")
    dt_init_floor: float = Field(1e-4, ge=0, description="init: step sizes are at least this")
    dt_limit: tuple[float, float] = Field((0.0, math.inf), description="clamp of the step size after softplus")
    A_init_range: tuple[float, float] = Field((1.0, 16.0), description="init: -A is uniform in this range")
    conv_bias: bool = Field(True, description="bias on the short causal convolution")
    norm_eps: float = Field(1e-5, gt=0, description="eps of the gated RMSNorm")
    d_ssm: int | None = Field(None, gt=0, description="d_inner when set (Falcon-H1's mamba_d_ssm); default expand * d_model")
    gate_norm: Literal["after_gate", "before_gate", "none"] = Field(
        "after_gate", description="how the output meets its gate z: norm(y * silu(z)) (Mamba2), norm(y) * silu(z) "
                                  "(Falcon-H1's norm_before_gate) or y * silu(z) without a norm")

    omitted_when_default: ClassVar[tuple[str, ...]] = ("d_ssm", "gate_norm")

    @model_validator(mode="after")
    def _shapes_fit(self) -> Self:
        if self.d_inner % self.head_dim:
            raise ValueError(
                f"head_dim ({self.head_dim}) must divide d_inner = {'d_ssm' if self.d_ssm else 'expand * d_model'} = {self.d_inner}"
            )
        if self.n_heads % self.n_groups:
            raise ValueError(
                f"n_groups ({self.n_groups}) must divide the number of heads d_inner // head_dim = {self.n_heads}"
            )
        if self.dt_min > self.dt_max:
            raise ValueError(f"dt_min ({self.dt_min}) must be <= dt_max ({self.dt_max})")
        low, high = self.dt_limit
        if not 0 <= low < high:
            raise ValueError(f"dt_limit must be (low, high) with 0 <= low < high, got {self.dt_limit}")
        low, high = self.A_init_range
        if not 0 < low <= high:
            raise ValueError(f"A_init_range must be (low, high) with 0 < low <= high, got {self.A_init_range}")
        if self.backend in ATTENTION_ONLY_BACKENDS:
            raise ValueError(f"backend {self.backend!r} has no SSD kernel; use 'auto', 'reference', 'torch' or 'fla'")
        if self.backend == "fla" and self.chunk_size & (self.chunk_size - 1):
            raise ValueError(f"backend 'fla' needs a power-of-two chunk_size, got {self.chunk_size}")
        return self

    @property
    def d_inner(self) -> int:
        """Width of the SSM branch: d_ssm, or expand * d_model."""
        return self.d_ssm or self.expand * self.d_model

    @property
    def n_heads(self) -> int:
        """H: number of SSM heads."""
        return self.d_inner // self.head_dim

    @property
    def conv_channels(self) -> int:
        """Channels of the causal conv: x, B and C together."""
        return self.d_inner + 2 * self.n_groups * self.d_state

    def mixing_flops_per_token(self, context: int) -> int:
        """Recurrent form per head: decay (PN), write dt x B^T (2PN), read S C (2PN)."""
        return 5 * self.n_heads * self.head_dim * self.d_state

    def state_nbytes(self, n_tokens: int, batch_size: int = 1, *, dtype: torch.dtype = torch.float32) -> int:
        """The conv tail (activation dtype) and the SSM state (float32, or float64): constant in n_tokens."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        ssm_itemsize = torch.empty((), dtype=recurrent_dtype(dtype)).element_size()
        conv = (self.d_conv - 1) * self.conv_channels * itemsize
        ssm = self.n_heads * self.head_dim * self.d_state * ssm_itemsize
        return batch_size * (conv + ssm)


@dataclasses.dataclass
class Mamba2State(MixerState):
    """Mamba2 state: the conv window's last valid inputs and the SSM state."""

    conv: torch.Tensor  # [B, d_conv - 1, conv_channels] in the activation dtype; zeros at the stream start
    ssm: torch.Tensor = dataclasses.field(metadata={"float32": True})  # [B, H, P, N]: float32, float64 in float64 runs


class GatedRMSNorm(nn.Module):
    """RMSNorm per group of `group_size` channels, times a learned scale, of y * silu(z) (after_gate) or of y
    before it meets silu(z) (before_gate)."""

    def __init__(self, dim: int, group_size: int, eps: float, form: str = "after_gate"):
        super().__init__()
        self.group_size, self.eps, self.after_gate = group_size, eps, form == "after_gate"
        self.weight = nn.Parameter(torch.ones(dim))

    def extra_repr(self) -> str:
        """Width, group size, eps and form, for print(module)."""
        form = "after_gate" if self.after_gate else "before_gate"
        return f"{self.weight.shape[0]}, group_size={self.group_size}, eps={self.eps}, {form}"

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """y, z [..., dim] -> [..., dim] in y's dtype, computed in at least float32."""
        compute = recurrent_dtype(y.dtype)
        gate = F.silu(z.to(compute))
        x = (y.to(compute) * gate if self.after_gate else y.to(compute)).unflatten(-1, (-1, self.group_size))  # [..., G, dim / G]
        normed = (x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps)).flatten(-2) * self.weight.to(compute)
        return (normed if self.after_gate else normed * gate).to(y.dtype)


class Mamba2(Mixer):
    """Mamba2 mixer: in_proj, causal conv + SiLU, SSD scan with a D skip, gated RMSNorm, out_proj."""

    config_class = Mamba2Config
    state_class = Mamba2State
    residual_projection = "out_proj"
    dense_valid = True

    def __init__(self, config: Mamba2Config):
        super().__init__(config)
        c = config
        self.in_proj = nn.Linear(c.d_model, c.d_inner + c.conv_channels + c.n_heads, bias=False)  # z, x, B, C, dt
        self.conv1d = nn.Conv1d(
            c.conv_channels, c.conv_channels, c.d_conv, groups=c.conv_channels, bias=c.conv_bias
        )  # weight [C, 1, W]; only its parameters are used, through causal_conv1d
        self.dt_bias = nn.Parameter(step_size_bias(c.n_heads, dt_min=c.dt_min, dt_max=c.dt_max, floor=c.dt_init_floor))
        self.A_log = nn.Parameter(torch.empty(c.n_heads).uniform_(*c.A_init_range).log())  # [H]
        self.D = nn.Parameter(torch.ones(c.n_heads))  # [H]
        if c.gate_norm != "none":
            self.norm = GatedRMSNorm(c.d_inner, c.d_inner // c.n_groups, c.norm_eps, c.gate_norm)
        self.out_proj = nn.Linear(c.d_inner, c.d_model, bias=False)

    def init_state(self, batch_size, *, device=None, dtype=None):
        """Zero conv tail in the activation dtype and zero SSM state in float32 (float64 for float64)."""
        c = self.config
        device, dtype = self.state_placement(device, dtype)
        conv = torch.zeros(batch_size, c.d_conv - 1, c.conv_channels, device=device, dtype=dtype)
        ssm = torch.zeros(
            batch_size, c.n_heads, c.head_dim, c.d_state, device=device, dtype=recurrent_dtype(dtype)
        )
        return Mamba2State(conv=conv, ssm=ssm)

    def _forward(self, x, state, positions, valid):
        c = self.config
        batch, length, _ = x.shape
        z, xBC, dt = self.in_proj(x).split([c.d_inner, c.conv_channels, c.n_heads], dim=-1)
        xBC, conv = causal_conv1d(
            xBC, self.conv1d.weight[:, 0], state.conv.to(xBC.dtype), valid, self.conv1d.bias,
            backend="reference" if c.backend == "reference" else "torch",
        )  # [B, T, C]: zero at pads, which do not enter the window
        xs, B, C = F.silu(xBC).split([c.d_inner, c.n_groups * c.d_state, c.n_groups * c.d_state], dim=-1)
        xs = xs.unflatten(-1, (c.n_heads, c.head_dim))  # [B, T, H, P]
        B, C = (t.unflatten(-1, (c.n_groups, c.d_state)) for t in (B, C))  # [B, T, G, N]

        compute = state.ssm.dtype
        dt = F.softplus(dt.to(compute) + self.dt_bias.to(compute)).clamp(*c.dt_limit)  # [B, T, H]
        if valid is not None:
            dt = dt.masked_fill(~valid[..., None], 0.0)  # a pad neither decays nor writes the state
        A = -self.A_log.to(compute).exp()  # [H]
        y, ssm = ssd(xs, dt, A, B, C, state.ssm, backend=c.backend, chunk_size=c.chunk_size)  # [B, T, H, P]
        y = y + xs * self.D[:, None].to(y.dtype)
        y = y.reshape(batch, length, c.d_inner)
        y = self.norm(y, z) if c.gate_norm != "none" else (y.to(z.dtype) * F.silu(z))
        y = self.out_proj(y)
        return (y if valid is None else y * valid[..., None]), Mamba2State(conv=conv, ssm=ssm)
