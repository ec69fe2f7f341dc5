"""Several mixers side by side in one layer (Falcon-H1's attention beside Mamba2): each reads the same
input, their outputs are summed, each times its multiplier, and the state is the branches' states
(a CompositeState)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, SerializeAsAny, ValidationError, model_validator
from torch import nn
from typing_extensions import Self

from mixerzoo.errors import describe_validation_error
from mixerzoo.mixers.base import CompositeState, Mixer, MixerConfig
from mixerzoo.mixers.registry import build_mixer, mixer_config


class ParallelConfig(MixerConfig):
    """Mixers run side by side on one input; y is the sum over branches of each branch's output times its
    entry of output_scales. Each branch takes the layer's d_model (a branch may leave it out) and its own
    backend."""

    type: Literal["parallel"] = Field("parallel", description="the mixer type")
    mixers: list[SerializeAsAny[MixerConfig]] = Field(
        min_length=2, description="the branches: two or more mixer specs (any registered type but parallel)")
    output_scales: list[float] | None = Field(
        None, description="a multiplier per branch output (Falcon-H1's attention_out / ssm_out multipliers); "
        "default 1 each")

    @model_validator(mode="before")
    @classmethod
    def _branches_take_the_width(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("mixers"), list):
            return data
        branches = []
        for i, branch in enumerate(data["mixers"]):
            if isinstance(branch, dict):
                try:
                    branch = mixer_config({"d_model": data.get("d_model"), **branch})
                except ValidationError as error:
                    raise ValueError(f"mixers[{i}] ({branch.get('type')}): {describe_validation_error(error)}") from None
                except (KeyError, ValueError) as error:
                    raise ValueError(f"mixers[{i}]: {error}") from None
            branches.append(branch)
        return {**data, "mixers": branches}

    @model_validator(mode="after")
    def _branches_fit(self) -> Self:
        for i, branch in enumerate(self.mixers):
            if branch.type == "parallel":
                raise ValueError(f"mixers[{i}]: a parallel branch cannot itself be parallel; list its mixers here")
            if branch.d_model != self.d_model:
                raise ValueError(f"mixers[{i}] ({branch.type}) has d_model {branch.d_model}, the layer {self.d_model}")
        if self.output_scales is not None and len(self.output_scales) != len(self.mixers):
            raise ValueError(f"output_scales has {len(self.output_scales)} entries for {len(self.mixers)} mixers")
        if self.backend != "auto":
            raise ValueError(f"backend {self.backend!r}: a parallel layer's branches set their own backends")
        return self

    def branches(self) -> list[MixerConfig]:
        """The branch mixers."""
        return list(self.mixers)

    @property
    def scales(self) -> list[float]:
        """The multiplier of each branch's output."""
        return list(self.output_scales) if self.output_scales is not None else [1.0] * len(self.mixers)

    def identity(self) -> dict:
        """The fields a saved state must agree on: the branches' identities (their backends left out)."""
        return {"type": self.type, "d_model": self.d_model, "mixers": [m.identity() for m in self.mixers],
                "output_scales": self.output_scales}

    def state_nbytes(self, n_tokens: int, batch_size: int = 1, *, dtype: torch.dtype = torch.float32) -> int:
        """The branches' states together."""
        return sum(m.state_nbytes(n_tokens, batch_size, dtype=dtype) for m in self.mixers)

    def mixing_flops_per_token(self, context: int) -> int:
        """The branches' mixing together."""
        return sum(m.mixing_flops_per_token(context) for m in self.mixers)


class Parallel(Mixer):
    """Mixers side by side on the same input, their scaled outputs summed."""

    config_class = ParallelConfig
    state_class = CompositeState
    dense_valid = True

    def __init__(self, config: ParallelConfig):
        super().__init__(config)
        self.branches = nn.ModuleList(build_mixer(m) for m in config.mixers)

    def residual_outputs(self) -> list[nn.Module]:
        """Every branch's projections into the residual stream."""
        return [projection for b in self.branches for projection in b.residual_outputs()]

    def state_placement(self, device, dtype):
        """The first branch's placement."""
        return self.branches[0].state_placement(device, dtype)

    def init_state(self, batch_size, *, device=None, dtype=None):
        """Each branch's fresh state."""
        return CompositeState([b.init_state(batch_size, device=device, dtype=dtype) for b in self.branches])

    def state_from_tensors(self, tensors: dict[str, torch.Tensor]) -> CompositeState:
        """The state from its named tensors ("{branch}.{field}"), each branch's by that branch."""
        parts = CompositeState.split_tensors(tensors, len(self.branches))
        return CompositeState([branch.state_from_tensors(part) for branch, part in zip(self.branches, parts)])

    def _forward(self, x, state, positions, valid):
        y, states = None, []
        for branch, scale, branch_state in zip(self.branches, self.config.scales, state.parts):
            out, branch_state = branch(x, branch_state, positions=positions, valid=valid)
            out = out if scale == 1.0 else out * scale
            y = out if y is None else y + out
            states.append(branch_state)
        return y, CompositeState(states)
