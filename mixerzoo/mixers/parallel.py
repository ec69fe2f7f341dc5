"""Several mixers side by side in one layer (Falcon-H1's attention beside Mamba2): each reads the same
input, their outputs are summed, each times its multiplier, and the state is the branches' states."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Sequence

import torch
from pydantic import Field, SerializeAsAny, ValidationError, model_validator
from torch import nn
from typing_extensions import Self

from mixerzoo.errors import describe_validation_error
from mixerzoo.mixers.base import Mixer, MixerConfig, MixerState
from mixerzoo.mixers.registry import build_mixer, mixer_config


class ParallelConfig(MixerConfig):
    """Mixers run side by side on one input; y = sum_i output_scales[i] * mixers[i](x). Each branch takes
    the layer's d_model (a branch may leave it out) and its own backend."""

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


@dataclasses.dataclass
class ParallelState(MixerState):
    """The state of each branch, in the config's order; its tensors are named "{branch}.{field}"."""

    branches: list[MixerState]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every branch's tensors, named "{branch}.{field}"."""
        return {f"{i}.{name}": t for i, b in enumerate(self.branches) for name, t in b.tensors().items()}

    def growing_fields(self) -> list[str]:
        """The branches' fields that grow with the tokens seen, named "{branch}.{field}"."""
        return [f"{i}.{name}" for i, b in enumerate(self.branches) for name in b.growing_fields()]

    def _each(self, method: str, *args) -> Self:
        return ParallelState([getattr(b, method)(*args) for b in self.branches])

    def clone(self) -> Self:
        """An independent copy of every branch."""
        return self._each("clone")

    def contiguous(self) -> Self:
        """Every branch in its canonical contiguous layout."""
        return self._each("contiguous")

    def canonical(self) -> Self:
        """Every branch with the strides of fresh tensors (see MixerState.canonical)."""
        return self._each("canonical")

    def to(self, device=None, dtype=None) -> Self:
        """Every branch moved and cast (see MixerState.to)."""
        return ParallelState([b.to(device=device, dtype=dtype) for b in self.branches])

    def with_capacity(self, capacity: int) -> Self:
        """Every growing branch preallocated for `capacity` tokens per row."""
        return self._each("with_capacity", capacity)

    def select(self, rows: Sequence[int] | torch.Tensor) -> Self:
        """The sub-batch of `rows` in every branch."""
        return self._each("select", rows)

    def poisoned(self, rows: torch.Tensor, before: MixerState) -> Self:
        """The rows `rows` marked non-finite in every branch."""
        return ParallelState([b.poisoned(rows, old) for b, old in zip(self.branches, before.branches)])

    @classmethod
    def concat(cls, states: Sequence[Self]) -> Self:
        """One batch of `states`' rows, branch by branch."""
        if not states:
            raise ValueError("concat needs at least one state")
        return cls([type(group[0]).concat(list(group)) for group in zip(*(s.branches for s in states))])

    def check_compatible(self, expected: MixerState, *, owner: str) -> None:
        """Raise unless every branch is compatible with the branch `expected` holds."""
        if type(self) is not type(expected) or len(self.branches) != len(expected.branches):
            raise TypeError(f"{owner}: expected a ParallelState of {len(getattr(expected, 'branches', []))} "
                            f"branches, got a {type(self).__name__}")
        for i, (got, want) in enumerate(zip(self.branches, expected.branches)):
            got.check_compatible(want, owner=f"{owner} branch {i}")


class Parallel(Mixer):
    """Mixers side by side on the same input, their scaled outputs summed."""

    config_class = ParallelConfig
    state_class = ParallelState
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
        return ParallelState([b.init_state(batch_size, device=device, dtype=dtype) for b in self.branches])

    def state_from_tensors(self, tensors: dict[str, torch.Tensor]) -> ParallelState:
        """The state from its named tensors ("{branch}.{field}"), each branch's by that branch."""
        return ParallelState([
            branch.state_from_tensors({k[len(f"{i}."):]: t for k, t in tensors.items() if k.startswith(f"{i}.")})
            for i, branch in enumerate(self.branches)])

    def _forward(self, x, state, positions, valid):
        y, states = None, []
        for branch, scale, branch_state in zip(self.branches, self.config.scales, state.branches):
            out, branch_state = branch(x, branch_state, positions=positions, valid=valid)
            out = out if scale == 1.0 else out * scale
            y = out if y is None else y + out
            states.append(branch_state)
        return y, ParallelState(states)
