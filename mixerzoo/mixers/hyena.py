"""Hyena (Poli et al. 2023, arXiv:2302.10866): data-controlled gates around implicit long convolutions.

The input is projected into order + 1 streams (x_0 .. x_{N-1}, v), each through a short causal conv;
then for each gate x_{N-1} .. x_1: v = h_o * (v x_i) + b_o (v x_i), a causal convolution over every
token seen with a filter h_o that a small sine-activated MLP makes from each lag's position features,
times an exponential decay; the output is x_0 v. The filters exist at any length, so the state keeps
every long convolution's inputs, growing by (order - 1) d_model per token like a KV cache, beside the
short conv's tail (a CompositeState of a ShortConvState and a KVCache whose k holds the inputs).

"torch" convolves by FFT; "reference" sums the lags directly.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from typing_extensions import Self

from mixerzoo.mixers.attention import _INDEX_BYTES, Attention, KVCache, StaticKVCache, append_one, store_tokens
from mixerzoo.mixers.base import CompositeState, Mixer, MixerConfig
from mixerzoo.mixers.elementwise_family import ShortConvState
from mixerzoo.ops import causal_conv1d

# The filters' decay exp(-|delta| t / filter_length): deltas spread so that the fastest channel falls to
# 1e-2 by 0.3 of filter_length and the slowest by 1.5 of it (Hyena's ExponentialModulation defaults).
_DECAY_TARGET, _FAST, _SLOW = 1e-2, 0.3, 1.5


class HyenaConfig(MixerConfig):
    """The Hyena operator of order N (N - 1 long convolutions); safari's defaults (order 2, a 64-wide filter
    MLP over 33 position features, short convs of 3)."""

    type: Literal["hyena"] = Field("hyena", description="the mixer type")
    order: int = Field(2, ge=2, description="gates N; N - 1 long convolutions")
    filter_hidden: int = Field(64, gt=0, description="width of the filter MLP (safari's filter_order)")
    filter_features: int = Field(33, ge=3, description="position features of each lag: t and (E - 1) / 2 "
                                 "cosine / sine bands (odd)")
    filter_length: int = Field(2048, gt=0, description="lags are measured in units of this many tokens (safari's "
                               "l_max); filters continue past it")
    short_conv_size: int = Field(3, ge=1, description="taps of the short causal conv on every stream")

    @model_validator(mode="after")
    def _shapes_fit(self) -> Self:
        if self.filter_features % 2 == 0:
            raise ValueError(f"filter_features must be odd (t plus cosine / sine pairs), got {self.filter_features}")
        if self.backend not in ("auto", "torch", "reference"):
            raise ValueError(f"backend {self.backend!r}: hyena runs 'auto', 'torch' (FFT) or 'reference'")
        return self

    def mixing_flops_per_token(self, context: int) -> int:
        """Each long convolution's direct sum over every lag seen: 2 d_model per lag and convolution."""
        return 2 * (self.order - 1) * self.d_model * context

    def state_nbytes(self, n_tokens: int, batch_size: int = 1, *, dtype: torch.dtype = torch.float32) -> int:
        """The short conv's tail, the long convolutions' inputs per token seen, and the token count."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        tail = (self.short_conv_size - 1) * (self.order + 1) * self.d_model
        history = n_tokens * (self.order - 1) * self.d_model
        return batch_size * ((tail + history) * itemsize + _INDEX_BYTES)


class _Sine(nn.Module):
    """sin(frequency * x), a learnable frequency per channel (Hyena's filter activation)."""

    def __init__(self, width: int):
        super().__init__()
        self.frequency = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., width] -> [..., width]."""
        return torch.sin(self.frequency * x)


class Hyena(Mixer):
    """The Hyena operator."""

    config_class = HyenaConfig
    state_class = CompositeState
    residual_projection = "out_proj"
    dense_valid = True

    def __init__(self, config: HyenaConfig):
        super().__init__(config)
        c, d = config, config.d_model
        convs = c.order - 1
        self.in_proj = nn.Linear(d, (c.order + 1) * d)
        self.short_conv = nn.Parameter(torch.randn((c.order + 1) * d, c.short_conv_size) / math.sqrt(c.short_conv_size))
        self.short_bias = nn.Parameter(torch.zeros((c.order + 1) * d))
        width = c.filter_hidden
        self.filter = nn.Sequential(
            nn.Linear(c.filter_features, width), _Sine(width), nn.Linear(width, width), _Sine(width),
            nn.Linear(width, width), _Sine(width), nn.Linear(width, convs * d, bias=False))
        deltas = torch.linspace(math.log(_DECAY_TARGET) / _SLOW, math.log(_DECAY_TARGET) / _FAST, convs * d).abs()
        self.register_buffer("decay_rates", deltas, persistent=False)  # [(N - 1) d]
        self.long_bias = nn.Parameter(torch.randn(convs, d))
        self.out_proj = nn.Linear(d, d)

    def init_state(self, batch_size, *, device=None, dtype=None):
        """A zero short-conv tail and an empty history of long-convolution inputs, in the activation dtype."""
        c = self.config
        device, dtype = self.state_placement(device, dtype)
        tail = torch.zeros(batch_size, c.short_conv_size - 1, (c.order + 1) * c.d_model, device=device, dtype=dtype)
        inputs = torch.zeros(batch_size, c.order - 1, 0, c.d_model, device=device, dtype=dtype)
        unused = torch.zeros(batch_size, 1, 0, 0, device=device, dtype=dtype)  # the KVCache's v: nothing
        seen = torch.zeros(batch_size, dtype=torch.long, device=device)
        return CompositeState([ShortConvState(conv=tail), KVCache(k=inputs, v=unused, seen=seen).counted(0)])

    def state_from_tensors(self, tensors):
        """The state from its named tensors ("0.conv", "1.k", "1.v", "1.seen")."""
        tail, history = CompositeState.split_tensors(tensors, 2)
        return CompositeState([ShortConvState(**tail), KVCache(**history)])

    def filters(self, length: int, device, dtype) -> torch.Tensor:
        """The long convolutions' filters at lags 0 .. length - 1: [N - 1, length, d_model]."""
        c = self.config
        bands = (c.filter_features - 1) // 2
        lag = torch.arange(length, device=device, dtype=torch.float64)[:, None] / c.filter_length  # [L, 1]
        angle = 2 * math.pi * lag * torch.linspace(1e-4, bands - 1, bands, device=device, dtype=torch.float64)
        features = torch.cat([lag, torch.cos(angle), -torch.sin(angle)], dim=-1).to(dtype)  # [L, E]
        decay = torch.exp(-lag.to(dtype) * self.decay_rates.to(dtype))  # [L, (N - 1) d]
        return (self.filter(features) * decay).unflatten(-1, (c.order - 1, c.d_model)).transpose(0, 1)

    def _forward(self, x, state, positions, valid):
        c = self.config
        tail, history = state.parts
        if isinstance(history, StaticKVCache):
            raise ValueError("Hyena: its history cannot be preallocated (with_capacity); decode it eagerly")
        batch, length, d = x.shape
        streams, conv_tail = causal_conv1d(self.in_proj(x), self.short_conv, tail.conv, valid, self.short_bias,
                                           backend="reference" if c.backend == "reference" else "torch")
        *gates, v = streams.split(d, dim=-1)  # x_0 .. x_{N-1}, v: [B, T, d] each
        host_seen = None if torch.compiler.is_compiling() else history.host_seen
        index = Attention._index(history, valid, host_seen, batch, length, x.device)()  # [B, T] token numbers
        span = history.k.shape[2] + length + 1  # the history, the chunk, and a slot for pads' writes
        slots = index if valid is None else torch.where(valid, index, span - 1)
        filters = self.filters(span, x.device, x.dtype)  # [N - 1, S, d]
        inputs = []
        for o, gate in enumerate(reversed(gates[1:])):
            u = v * gate  # [B, T, d]: this convolution's input at the chunk's tokens
            if valid is not None:
                u = u * valid[..., None]
            inputs.append(u)
            sequence = torch.nn.functional.pad(history.k[:, o], (0, 0, 0, length + 1))  # [B, S, d]
            sequence = sequence.scatter(1, slots[..., None].expand(-1, -1, d), u)
            v = self._convolve(sequence, filters[o], slots) + self.long_bias[o] * u
        y = self.out_proj(v * gates[0])
        y = y if valid is None else y * valid[..., None]
        history = self._store(history, torch.stack(inputs, dim=2), valid, index, host_seen)
        return y, CompositeState([ShortConvState(conv=conv_tail), history])

    def _convolve(self, sequence: torch.Tensor, kernel: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Causal convolution of sequence [B, S, d] with kernel [S, d], read at slots [B, T]: [B, T, d]."""
        span, d = kernel.shape
        if self.config.backend == "reference":  # out_j = sum_{i <= j} kernel_{j - i} sequence_i
            lags = slots[..., None] - torch.arange(span, device=slots.device)  # [B, T, S]: lag of slot i
            weights = kernel[lags.clamp(min=0)] * (lags >= 0)[..., None]  # [B, T, S, d]
            return torch.einsum("btsd,bsd->btd", weights, sequence)
        size, dtype = 2 * span, torch.float64 if sequence.dtype == torch.float64 else torch.float32
        spectrum = torch.fft.rfft(sequence.to(dtype), n=size, dim=1) * torch.fft.rfft(kernel.to(dtype), n=size, dim=0)
        out = torch.fft.irfft(spectrum, n=size, dim=1)[:, :span].to(sequence.dtype)
        return out.gather(1, slots[..., None].expand(-1, -1, d))

    @staticmethod
    def _store(history: KVCache, inputs: torch.Tensor, valid, index, host_seen: int | None) -> KVCache:
        """The history with the chunk's valid convolution inputs [B, T, N - 1, d] at their token numbers."""
        batch, length = inputs.shape[:2]
        nothing = inputs.new_zeros(batch, length, 1, 0)
        if valid is None and host_seen is not None:
            return history.append(inputs.transpose(1, 2), nothing.transpose(1, 2), history.seen + length).counted(
                host_seen + length)
        if length == 1:  # a decode step: no host sync
            return append_one(history, inputs, nothing, valid)
        valid = torch.ones(index.shape, dtype=torch.bool, device=index.device) if valid is None else valid
        return store_tokens(history, inputs, nothing, valid, index, window=None)
