"""RWKV-6 ("Finch", Peng et al. 2024, arXiv:2404.05892) time mixing as a mixer over gated_linear_attention
with its bonus: data-dependent token shift (ddlerp), a per-channel decay w = -exp(w0 + LoRA(x)), the bonus
u on the current token, a per-head LayerNorm (RWKV's GroupNorm) and a SiLU gate.

The token shift reads the previous valid token through causal_conv1d (taps [1, 0]), so pads neither enter
nor move it; the state is that one token plus the [H, K, V] matrix: constant in tokens seen.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn
from typing_extensions import Self

from mixerzoo.mixers.base import Mixer, MixerConfig, MixerState, recurrent_dtype
from mixerzoo.ops import ATTENTION_ONLY_BACKENDS, causal_conv1d, gated_linear_attention

_MIXES = 5  # r, w, k, v, g each take their own interpolation of x and the previous token


class RWKV6Config(MixerConfig):
    """RWKV-6 time mixing: H heads of head_dim (RWKV-6: 64), low-rank data-dependent shift and decay."""

    type: Literal["rwkv6"] = Field("rwkv6", description="the mixer type")
    n_heads: int = Field(4, gt=0, description="heads; head_dim = d_model // n_heads")
    mix_low_rank: int = Field(32, gt=0, description="rank of the ddlerp LoRA (RWKV-6: 32)")
    decay_low_rank: int = Field(64, gt=0, description="rank of the decay LoRA (RWKV-6: 64)")
    norm_eps: float = Field(1e-5, gt=0, description="epsilon of the per-head LayerNorm")
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

    def mixing_flops_per_token(self, context: int) -> int:
        """Per head: decay (KV), write (2KV), read of the state and the bonus term (2KV + 3K)."""
        return self.n_heads * (5 * self.head_dim**2 + 3 * self.head_dim)

    def state_nbytes(self, n_tokens: int, batch_size: int = 1, *, dtype: torch.dtype = torch.float32) -> int:
        """The previous token (activation dtype) plus the matrix (at least float32): constant."""
        item = torch.empty((), dtype=dtype).element_size()
        return batch_size * (self.d_model * item + self.n_heads * self.head_dim**2 * max(item, 4))


@dataclasses.dataclass
class RWKV6State(MixerState):
    """The last valid input token (the token shift's) and the recurrent matrix."""

    shift: torch.Tensor  # [B, 1, d_model]
    recurrent: torch.Tensor = dataclasses.field(metadata={"float32": True})  # [B, H, K, V]


class RWKV6(Mixer):
    """RWKV-6 time mixing."""

    config_class = RWKV6Config
    state_class = RWKV6State
    dense_valid = True

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
        self.register_buffer("shift_taps", torch.tensor([1.0, 0.0]).repeat(d, 1), persistent=False)  # [d, 2]

    def init_state(self, batch_size, *, device=None, dtype=None):
        """A zero previous token (activation dtype) and a zero matrix (float32, or float64)."""
        c = self.config
        device, dtype = self.state_placement(device, dtype)
        return RWKV6State(
            shift=torch.zeros(batch_size, 1, c.d_model, device=device, dtype=dtype),
            recurrent=torch.zeros(batch_size, c.n_heads, c.head_dim, c.head_dim, device=device,
                                  dtype=recurrent_dtype(dtype)))

    def _forward(self, x, state, positions, valid):
        c = self.config
        batch, length, d = x.shape
        backend = "reference" if c.backend == "reference" else "torch"
        previous, shift = causal_conv1d(x, self.shift_taps.to(x.dtype), state.shift, valid, backend=backend)
        delta = previous - x  # [B, T, d]
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
        return y, RWKV6State(shift=shift, recurrent=recurrent.to(state.recurrent.dtype))
