"""An example mixerzoo plugin: a per-channel exponential moving average (EMA) token mixer.

    h_t = a * h_{t-1} + (1 - a) * W_in x_t      (a = sigmoid(decay), one per channel)
    y_t = W_out h_t

The state is h [B, D]: constant in the context, like Gated DeltaNet's or Mamba2's. Installing the
package registers the type `ema` (pyproject's entry point), so a layout YAML can name it, `mixerzoo
mixers` documents it, and `mixerzoo.testing.certify({"type": "ema", "d_model": 8})` checks it.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from mixerzoo.mixers import Mixer, MixerConfig, MixerState


class EMAConfig(MixerConfig):
    """A per-channel exponential moving average of the projected inputs."""

    type: Literal["ema"] = "ema"
    init_decay: float = Field(0.9, gt=0, lt=1, description="every channel's decay a at initialisation")

    def state_nbytes(self, n_tokens: int, batch_size: int = 1, *, dtype: torch.dtype = torch.float32) -> int:
        """h: batch_size x d_model, in float32 whatever the activations (float64 in a float64 run)."""
        return batch_size * self.d_model * torch.promote_types(dtype, torch.float32).itemsize

    def mixing_flops_per_token(self, context: int) -> int:
        """One multiply-add per channel, whatever the context."""
        return 2 * self.d_model


@dataclasses.dataclass
class EMAState(MixerState):
    """The running average of each row."""

    h: torch.Tensor = dataclasses.field(metadata={"float32": True})  # [B, d_model], always float32


class EMAMixer(Mixer):
    """h_t = a h_{t-1} + (1 - a) W_in x_t, y_t = W_out h_t, channel by channel; pads leave h unchanged."""

    config_class = EMAConfig
    state_class = EMAState

    def __init__(self, config: EMAConfig):
        super().__init__(config)
        d = config.d_model
        self.in_proj = nn.Linear(d, d, bias=False)
        self.out_proj = nn.Linear(d, d, bias=False)
        logit = torch.logit(torch.tensor(config.init_decay))
        self.decay = nn.Parameter(torch.full((d,), float(logit)))  # a = sigmoid(decay)

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> EMAState:
        """h = 0 for every row, in float32 (float64 in a float64 run)."""
        device = self.in_proj.weight.device if device is None else device
        dtype = torch.promote_types(self.in_proj.weight.dtype if dtype is None else dtype, torch.float32)
        return EMAState(torch.zeros(batch_size, self.config.d_model, device=device, dtype=dtype))

    def _forward(self, x, state, positions, valid):
        # x [B, T, D]; valid [B, T] bool; the recurrence runs in the state's dtype
        a = torch.sigmoid(self.decay.to(state.h.dtype))  # [D]
        u = (1 - a) * self.in_proj(x).to(state.h.dtype)  # [B, T, D]
        h, outputs = state.h, []
        for t in range(x.shape[1]):  # a plain scan: clear, exact, and one step when decoding
            h = torch.where(valid[:, t, None], a * h + u[:, t], h)  # a pad leaves h as it was
            outputs.append(h)
        y = self.out_proj(torch.stack(outputs, dim=1).to(x.dtype)) * valid[..., None]
        return y, EMAState(h)
