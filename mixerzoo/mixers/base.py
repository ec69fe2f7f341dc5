"""The recurrent-state protocol every mixer follows: `y, state = mixer(x, state)`.

A mixer is a module of (chunk, state): its forward takes a chunk of tokens x
[B, T, d_model] with the state left by the previous chunk and returns the outputs
and the new state. Prefill, decode (T = 1), chunked prefill and streaming are the
same call. `valid` [B, T] marks real tokens; an invalid token is a no-op.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import operator
import os
import tempfile
from pathlib import Path
from typing import ClassVar, Iterator, Sequence

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from safetensors.torch import save_file
from torch import nn
from typing_extensions import Self

from mixerzoo.errors import StrictModel, finite_tensors, open_safetensors
from mixerzoo.mixers.packing import PackedLayout
from mixerzoo.ops import Backend

_STATE_FORMAT = "mixerzoo.state/1"


class MixerConfig(StrictModel):
    """Base of every mixer's config: a frozen pydantic model that rejects unknown keys.

    Subclasses set `type` to a Literal naming the mixer; that name is how specs and
    the registry find it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")

    type: str
    d_model: int = Field(gt=0, description="width of the residual stream")
    backend: Backend = Field("auto", description="op backend; never changes parameters or state layout")


    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if "state_nbytes" in cls.__dict__:
            cls.state_nbytes = _checking_counts(cls.__dict__["state_nbytes"])

    def state_nbytes(self, n_tokens: int, batch_size: int = 1, *, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of the state after `n_tokens` tokens per row, for activations in `dtype`."""
        raise NotImplementedError

    def mixing_flops_per_token(self, context: int) -> int:
        """FLOPs one token spends mixing with the past (beyond its projections) after `context` tokens."""
        raise NotImplementedError

    def branches(self) -> list["MixerConfig"]:
        """The mixers this config runs side by side: itself (a parallel layer: its branches)."""
        return [self]

    def identity(self) -> dict:
        """The fields a saved state must agree on (everything but the backend)."""
        return self.model_dump(mode="json", exclude={"backend"})


def check_count(name: str, value: int, *, minimum: int, owner: str) -> None:
    """Raise a ValueError naming `owner` and `name` unless `value` is an integer >= `minimum`."""
    try:
        ok = not isinstance(value, bool) and operator.index(value) >= minimum
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"{owner}: {name} must be an integer >= {minimum}, got {value!r}")


def _checking_counts(method):
    """Wrap state_nbytes(n_tokens, batch_size, ...) / init_state(batch_size, ...) so that a
    negative token count or a batch below 1 is an error, in every subclass."""
    takes_tokens = method.__name__ == "state_nbytes"

    @functools.wraps(method)
    def checked(self, *args, **kwargs):
        names = ("n_tokens", "batch_size") if takes_tokens else ("batch_size",)
        given = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
        owner = f"{type(self).__name__}.{method.__name__}"
        if "n_tokens" in given:
            check_count("n_tokens", given["n_tokens"], minimum=0, owner=owner)
        if "batch_size" in given:
            check_count("batch_size", given["batch_size"], minimum=1, owner=owner)
        return method(self, *args, **kwargs)

    return checked


def recurrent_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a recurrent state for activations in `dtype`: float32, or float64 for float64 runs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def step_size_bias(n: int, *, dt_min: float = 1e-3, dt_max: float = 1e-1, floor: float = 1e-4) -> torch.Tensor:
    """Biases [n] whose softplus is a step size drawn log-uniformly in [dt_min, dt_max] (at least `floor`),
    as Mamba2 and Gated DeltaNet initialise dt_bias."""
    dt = torch.empty(n).uniform_(math.log(dt_min), math.log(dt_max)).exp().clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))  # inverse softplus


def _batch_first_fields(state: "MixerState") -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(state) if not f.metadata.get("not_batched")]


@dataclasses.dataclass
class MixerState:
    """Base of every mixer's state: a dataclass whose fields are tensors with batch first.

    Field metadata: `float32=True` keeps a tensor in float32 under `to(dtype=...)`
    (recurrent state); `variable_dims=(d, ...)` names dims whose size depends on the
    tokens seen (a full-attention cache), excluded from compatibility checks.
    """

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every field by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @property
    def batch_size(self) -> int:
        """Number of rows (independent streams) in the state."""
        return next(iter(self.tensors().values())).shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held by the state's tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def device(self) -> torch.device:
        """Device of the state's tensors."""
        return next(iter(self.tensors().values())).device

    def clone(self) -> Self:
        """An independent copy (a fork): advancing one never changes the other."""
        return dataclasses.replace(self, **{k: t.clone() for k, t in self.tensors().items()})

    def contiguous(self) -> Self:
        """The state with every tensor contiguous (the canonical layout that save / load reproduces)."""
        if all(t.is_contiguous() for t in self.tensors().values()):
            return self
        return dataclasses.replace(self, **{k: t.contiguous() for k, t in self.tensors().items()})

    def canonical(self) -> Self:
        """The state contiguous with the strides of fresh tensors, size-1 dimensions' included (a view
        where only those differ): what a compiled step takes, so its stride guards hold at every step."""
        def fresh(t: torch.Tensor) -> torch.Tensor:
            strides = _fresh_strides(t.shape)
            if t.stride() == strides:
                return t
            if t.is_contiguous():  # only size-1 dimensions differ: the same elements, restrided
                return t.as_strided(t.shape, strides)
            return t.clone(memory_format=torch.contiguous_format)

        made = {k: fresh(t) for k, t in self.tensors().items()}
        if all(made[k] is t for k, t in self.tensors().items()):
            return self
        return dataclasses.replace(self, **made)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Self:
        """The state on `device`, with floating tensors (except float32-pinned ones) in `dtype`."""
        fields = {f.name: f for f in dataclasses.fields(self)}

        def move(name: str, t: torch.Tensor) -> torch.Tensor:
            keep = not t.is_floating_point() or fields[name].metadata.get("float32") or dtype is None
            return t.to(device=device) if keep else t.to(device=device, dtype=dtype)

        return dataclasses.replace(self, **{k: move(k, t) for k, t in self.tensors().items()})

    def poisoned(self, rows: torch.Tensor, before: "MixerState") -> Self:
        """This state (made from `before` by a chunk) with the rows `rows` [B] bool, which took a
        non-finite token, marked non-finite: NaN in every floating tensor of those rows. Never
        modifies `before`."""
        def mark(t: torch.Tensor) -> torch.Tensor:
            if not t.is_floating_point():
                return t
            return torch.where(rows.view(-1, *([1] * (t.dim() - 1))), torch.nan, t)

        return dataclasses.replace(self, **{k: mark(t) for k, t in self.tensors().items()})

    def growing_fields(self) -> list[str]:
        """The fields whose size depends on the tokens seen (a full-attention cache)."""
        return [f.name for f in dataclasses.fields(self) if f.metadata.get("variable_dims")]

    def with_capacity(self, capacity: int) -> "MixerState":
        """This state with every tensor that grows with the tokens preallocated for `capacity` tokens
        per row, so that no shape changes from step to step (CUDA graphs, torch.compile). A state of
        constant size is returned as it is."""
        return self

    def select(self, rows: Sequence[int] | torch.Tensor) -> Self:
        """The sub-batch of the given rows (in that order): a fork of some streams."""
        index = torch.as_tensor(rows, dtype=torch.long, device=self.device).reshape(-1)
        return dataclasses.replace(self, **{k: t.index_select(0, index) for k, t in self.tensors().items()})

    @classmethod
    def concat(cls, states: Sequence[Self]) -> Self:
        """One batch holding the rows of `states` in order."""
        if not states:
            raise ValueError("concat needs at least one state")
        kinds = {type(s) for s in states}
        if len(kinds) != 1:
            raise TypeError(f"cannot concat states of different kinds: {sorted(k.__name__ for k in kinds)}")
        names = [f.name for f in dataclasses.fields(states[0])]
        return dataclasses.replace(states[0], **{n: torch.cat([getattr(s, n) for s in states]) for n in names})

    def check_compatible(self, expected: "MixerState", *, owner: str) -> None:
        """Raise if this state cannot be the state of the mixer that would build `expected`."""
        if type(self) is not type(expected):
            raise TypeError(f"{owner}: expected a {type(expected).__name__}, got a {type(self).__name__}")
        for f in dataclasses.fields(self):
            got, want = getattr(self, f.name), getattr(expected, f.name)
            free = set(f.metadata.get("variable_dims", ()))
            same_rank = got.dim() == want.dim()
            if not same_rank or any(g != w for d, (g, w) in enumerate(zip(got.shape, want.shape)) if d not in free):
                raise ValueError(
                    f"{owner}: state field {f.name!r} has shape {list(got.shape)}, this mixer's config "
                    f"needs {list(want.shape)} (dims {sorted(free)} may differ): a state from another config?"
                )
            if got.is_floating_point() != want.is_floating_point() or (
                f.metadata.get("float32") and got.dtype != want.dtype
            ):
                raise ValueError(f"{owner}: state field {f.name!r} has dtype {got.dtype}, expected {want.dtype}")

    def save(self, path: str | os.PathLike, config: MixerConfig) -> None:
        """Write the state and the identity of its config to a safetensors file, atomically."""
        metadata = {
            "format": _STATE_FORMAT,
            "state_class": type(self).__name__,
            "config": json.dumps(config.identity(), sort_keys=True),
        }
        tensors = {k: t.detach().contiguous().cpu() for k, t in self.tensors().items()}
        atomic_save_safetensors(tensors, Path(path), metadata)

    @classmethod
    def load(cls, path: str | os.PathLike, config: MixerConfig, *, device: torch.device | str = "cpu") -> Self:
        """Read a state written by `save`; refuses a file made for another config or state kind."""
        tensors = cls.read_tensors(path, config, device=device)
        names = {f.name for f in dataclasses.fields(cls)}
        if tensors.keys() != names:
            raise ValueError(f"{path}: tensors {sorted(tensors)} do not match {cls.__name__} fields {sorted(names)}")
        return cls(**tensors)

    @classmethod
    def read_tensors(cls, path: str | os.PathLike, config: MixerConfig, *,
                     device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The named tensors of a state file written by `save` for this state kind and `config` (checked)."""
        with open_safetensors(path, device=str(device)) as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != _STATE_FORMAT:
                raise ValueError(f"{path}: not a mixerzoo state file (format {metadata.get('format')!r})")
            if metadata.get("state_class") != cls.__name__:
                raise ValueError(f"{path}: holds a {metadata.get('state_class')}, not a {cls.__name__}")
            saved, wanted = json.loads(metadata["config"]), config.identity()
            if saved != wanted:
                diff = {k: (saved.get(k), wanted.get(k)) for k in sorted(saved.keys() | wanted.keys())
                        if saved.get(k) != wanted.get(k)}
                raise ValueError(f"{path}: state was saved for another mixer config; (saved, given) differ at {diff}")
            return finite_tensors(f, path)


@dataclasses.dataclass
class CompositeState(MixerState):
    """A state made of other states, in order: a parallel layer's parts, or a mixer's parts (Hyena's short
    conv tail beside its growing history). Its tensors are named "{part}.{field}"."""

    parts: list[MixerState]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every part's tensors, named "{part}.{field}"."""
        return {f"{i}.{name}": t for i, b in enumerate(self.parts) for name, t in b.tensors().items()}

    def growing_fields(self) -> list[str]:
        """The parts' fields that grow with the tokens seen, named "{part}.{field}"."""
        return [f"{i}.{name}" for i, b in enumerate(self.parts) for name in b.growing_fields()]

    def _each(self, method: str, *args) -> Self:
        return CompositeState([getattr(b, method)(*args) for b in self.parts])

    def clone(self) -> Self:
        """An independent copy of every part."""
        return self._each("clone")

    def contiguous(self) -> Self:
        """Every part in its canonical contiguous layout."""
        return self._each("contiguous")

    def canonical(self) -> Self:
        """Every part with the strides of fresh tensors (see MixerState.canonical)."""
        return self._each("canonical")

    def to(self, device=None, dtype=None) -> Self:
        """Every part moved and cast (see MixerState.to)."""
        return CompositeState([b.to(device=device, dtype=dtype) for b in self.parts])

    def with_capacity(self, capacity: int) -> Self:
        """Every growing part preallocated for `capacity` tokens per row."""
        return self._each("with_capacity", capacity)

    def select(self, rows: Sequence[int] | torch.Tensor) -> Self:
        """The sub-batch of `rows` in every part."""
        return self._each("select", rows)

    def poisoned(self, rows: torch.Tensor, before: MixerState) -> Self:
        """The rows `rows` marked non-finite in every part."""
        return CompositeState([b.poisoned(rows, old) for b, old in zip(self.parts, before.parts)])

    @classmethod
    def concat(cls, states: Sequence[Self]) -> Self:
        """One batch of `states`' rows, part by part."""
        if not states:
            raise ValueError("concat needs at least one state")
        return cls([type(group[0]).concat(list(group)) for group in zip(*(s.parts for s in states))])

    def check_compatible(self, expected: MixerState, *, owner: str) -> None:
        """Raise unless every part is compatible with the part `expected` holds."""
        if type(self) is not type(expected) or len(self.parts) != len(expected.parts):
            raise TypeError(f"{owner}: expected a CompositeState of {len(getattr(expected, 'parts', []))} "
                            f"parts, got a {type(self).__name__}")
        for i, (got, want) in enumerate(zip(self.parts, expected.parts)):
            got.check_compatible(want, owner=f"{owner} part {i}")


    @staticmethod
    def split_tensors(tensors: dict[str, torch.Tensor], n_parts: int) -> list[dict[str, torch.Tensor]]:
        """Named tensors ("{part}.{field}", as `tensors()` gives) -> each part's own, by field name."""
        return [{k[len(f"{i}."):]: t for k, t in tensors.items() if k.startswith(f"{i}.")} for i in range(n_parts)]


def cached_cat(owner: nn.Module, name: str, tensors: Sequence[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """torch.cat(tensors, dim) of `owner`'s parameters, kept on `owner` under `name` while they are unchanged.

    Lets a module keep separately named parameters (fla / HF checkpoints load as they are) and still
    run one matmul or conv over them. The cached copy is rebuilt when any parameter is replaced,
    moved, cast or written in place (its version counter moves: optimizer steps, load_state_dict);
    while autograd records a parameter the concatenation is made per call, so gradients reach
    the parameters. It is not a parameter or buffer: state_dict never sees it. Inference tensors
    (a model built under torch.inference_mode) have no version counter, so theirs is made per call.
    """
    if torch.compiler.is_compiling():  # a compiled step reads the copy its eager warm-up made (weights fixed)
        cache = getattr(owner, "_cat_cache", None)
        if cache is not None and name in cache and not (torch.is_grad_enabled() and tensors[0].requires_grad):
            return cache[name][1]
        return torch.cat(list(tensors), dim)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors) or any(t.is_inference() for t in tensors):
        return torch.cat(list(tensors), dim)
    key = tuple((id(t), t.data_ptr(), t._version, t.dtype, t.device) for t in tensors) + (dim,)
    cache = owner.__dict__.setdefault("_cat_cache", {})
    hit = cache.get(name)
    if hit is None or hit[0] != key:
        with torch.no_grad():
            hit = cache[name] = (key, torch.cat(list(tensors), dim))
    return hit[1]


def fused_linear(owner: nn.Module, name: str, layers: Sequence[nn.Linear], x: torch.Tensor) -> torch.Tensor:
    """`layers` (all with a bias, or none) applied to x [..., d_in] by one matmul over their
    concatenated weights (cached on `owner` under `name`, see `cached_cat`): [..., sum of d_out],
    the layers' outputs side by side in order. A layer that is not a plain nn.Linear (a LoRA wrapper,
    a subclass) or that carries forward hooks is called as it is, and so are the others then."""
    if any(type(layer) is not nn.Linear or layer._forward_hooks or layer._forward_pre_hooks for layer in layers):
        return torch.cat([layer(x) for layer in layers], dim=-1)
    weight = cached_cat(owner, f"{name}.weight", [layer.weight for layer in layers])
    has_bias = [layer.bias is not None for layer in layers]
    if any(has_bias) and not all(has_bias):
        raise ValueError(f"fused_linear {name}: either every layer has a bias or none")
    bias = cached_cat(owner, f"{name}.bias", [layer.bias for layer in layers]) if all(has_bias) else None
    return F.linear(x, weight, bias)


def _contain_non_finite(x: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, T, D] with every pad and every non-finite real token set to 0, so that neither can reach
    another token through a chunk's arithmetic (0 x NaN is NaN); and poisoned [B, T] bool: each row's
    tokens from its first non-finite real token on (whose outputs, and whose row's state, are NaN)."""
    finite = torch.isfinite(x).all(-1)  # [B, T]
    real = finite if valid is None else finite & valid
    bad = ~finite if valid is None else ~finite & valid
    return torch.where(real[..., None], x, 0), bad.cumsum(1) > 0


def _fresh_strides(shape: torch.Size) -> tuple[int, ...]:
    """The strides of a fresh contiguous tensor of `shape`."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)  # as torch lays out empty dimensions
    return tuple(reversed(strides))


def device_check(condition: torch.Tensor, message: str) -> None:
    """Raise ValueError(message) unless the bool tensor `condition` is True, without a host sync: on a
    CPU it raises at once, on CUDA the device stops with the message at the next sync
    (`torch._assert_async`). Skipped inside a compiled program (its caller checked the inputs)."""
    if torch.compiler.is_compiling():
        return
    try:
        torch._assert_async(condition, message)
    except RuntimeError as error:  # raised here on the CPU only
        raise ValueError(message) from error


def activation_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype activations computed from `x` will have: autocast's dtype when autocast is on for
    x's device, else x's own (a fresh state's caches must hold what the projections produce)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def check_input_dtype(module: nn.Module, x: torch.Tensor, owner: str) -> None:
    """Raise a ValueError naming `owner` unless x is floating and, outside autocast, has the
    dtype of the module's parameters."""
    if not x.is_floating_point():
        raise ValueError(f"{owner}: x must be a floating tensor, got {x.dtype}")
    weight = next(module.parameters(), None)
    if weight is not None and x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise ValueError(f"{owner}: x is {x.dtype} but the parameters are {weight.dtype}; cast one to the "
                         f"other (x.to({weight.dtype}) or module.to({x.dtype}))")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path`; on success it is fsynced and renamed over `path`, on
    failure removed, so `path` holds either its old content or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0o600 would survive the rename
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (see `atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors' save_file, atomically (see `atomic_path`)."""
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


class Mixer(nn.Module):
    """Base of every token mixer: `y, state = mixer(x, state, positions=..., valid=...)`.

    Subclasses set `config_class` and `state_class`, implement `init_state` and
    `_forward` (which receives checked inputs, a state and a bool `valid`, or None for all
    valid when the subclass sets `dense_valid`); `forward_packed`
    runs packed documents through `_forward_packed`, which works for any mixer by default.
    """

    config_class: ClassVar[type[MixerConfig]]
    state_class: ClassVar[type[MixerState]]
    residual_projection: ClassVar[str] = "o_proj"  # the Linear whose output joins the residual stream
    # True: `_forward` takes valid=None for "every token is real", which the host then knows without
    # reading a mask (no sync, no masking ops); False: it always gets a [B, T] bool tensor.
    dense_valid: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "init_state" in cls.__dict__:
            cls.init_state = _checking_counts(cls.__dict__["init_state"])

    def __init__(self, config: MixerConfig):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} takes a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config

    def init_state(
        self, batch_size: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> MixerState:
        """The state before any token, for `batch_size` rows; `dtype` is the activation dtype."""
        raise NotImplementedError

    def state_placement(
        self, device: torch.device | str | None, dtype: torch.dtype | None
    ) -> tuple[torch.device | str, torch.dtype]:
        """The device and activation dtype a new state takes: those given, else the residual projection's
        parameters' (read only when needed, so a wrapped projection, e.g. LoRA, works either way)."""
        if device is None or dtype is None:
            reference = next(getattr(self, self.residual_projection).parameters())
            device, dtype = (reference.device if device is None else device), (reference.dtype if dtype is None else dtype)
        return device, dtype

    def residual_outputs(self) -> list[nn.Module]:
        """The projections whose outputs join the residual stream (the `residual_projection`)."""
        projection = getattr(self, self.residual_projection, None)
        return [] if projection is None else [projection]

    def state_from_tensors(self, tensors: dict[str, torch.Tensor]) -> MixerState:
        """This mixer's state from its named tensors (`state.tensors()`, as saved)."""
        names = {f.name for f in dataclasses.fields(self.state_class)}
        if tensors.keys() != names:
            raise ValueError(f"{type(self).__name__}: tensors {sorted(tensors)} do not match "
                             f"{self.state_class.__name__} fields {sorted(names)}")
        return self.state_class(**tensors)

    def forward(
        self,
        x: torch.Tensor,
        state: MixerState | None = None,
        *,
        positions: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, MixerState]:
        """Mix a chunk x [B, T, d_model] after `state`; returns (y [B, T, d_model], new state).

        positions: [B, T] (or [S, B, T] for multi-stream rotary) token positions; by
        default the number of valid tokens seen before. valid: [B, T] bool, default all.
        """
        name = type(self).__name__
        if x.dim() != 3:
            raise ValueError(f"{name}: x must be [B, T, d_model], got shape {list(x.shape)}")
        batch, length, width = x.shape
        if width != self.config.d_model:
            raise ValueError(f"{name}: x has d_model {width}, the config says {self.config.d_model}")
        if length < 1:
            raise ValueError(f"{name}: x must hold at least one token, got T = {length}")
        check_input_dtype(self, x, name)
        if valid is None:
            if not self.dense_valid:
                valid = torch.ones(batch, length, dtype=torch.bool, device=x.device)
        elif valid.shape != (batch, length) or valid.dtype != torch.bool:
            raise ValueError(f"{name}: valid must be a bool tensor [{batch}, {length}], got {valid.dtype} {list(valid.shape)}")
        compiling = torch.compiler.is_compiling()
        if state is None:
            state = self.init_state(batch, device=x.device, dtype=activation_dtype(x))
        else:
            if state.batch_size != batch:
                raise ValueError(f"{name}: x has batch {batch} but the state has {state.batch_size} rows")
            if state.device != x.device:
                raise ValueError(f"{name}: x is on {x.device} but the state is on {state.device}")
            # validated once per state (a compiled step continues states its eager warm-up checked)
            made_for = None if compiling else state.__dict__.get("_made_for", (None, None))
            if made_for is not None and (made_for[0] is not self.config or made_for[1] != x.dtype):
                state.check_compatible(self.init_state(batch, device="meta", dtype=x.dtype), owner=name)
        before = state
        x, poisoned = _contain_non_finite(x, valid) if length > 1 or valid is not None else (x, None)
        y, state = self._forward(x, state, positions, valid)
        if poisoned is not None:  # a non-finite real token: NaN from it on, and in its row's state
            y = torch.where(poisoned[..., None], torch.nan, y)
            state = state.poisoned(poisoned[:, -1], before)
        state = state.contiguous()  # a loaded state is contiguous: continuing either is bit-identical
        if not compiling:
            state.__dict__["_made_for"] = (self.config, x.dtype)  # this mixer built it: no check to continue it
        return y, state

    def forward_packed(
        self, x: torch.Tensor, documents: torch.Tensor | PackedLayout, *, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mix packed documents x [B, T, d_model], each from a fresh state as if it ran alone;
        returns y [B, T, d_model] (zeros on padding).

        documents: ids [B, T] (int, non-decreasing along a row, -1 on padding), or the
        PackedLayout.from_documents of them (a model builds it once for all its layers).
        positions: [B, T] (or [S, B, T]); by default each token's index within its document.
        """
        name = type(self).__name__
        layout = documents if isinstance(documents, PackedLayout) else PackedLayout.from_documents(documents)
        if x.dim() != 3 or tuple(x.shape[:2]) != layout.shape:
            raise ValueError(f"{name}: x must be [B, T, d_model] with [B, T] = {list(layout.shape)} as in "
                             f"documents, got shape {list(x.shape)}")
        if positions is not None and (positions.dim() not in (2, 3) or tuple(positions.shape[-2:]) != layout.shape):
            raise ValueError(f"{name}: positions must be [B, T] or [S, B, T] with [B, T] = {list(layout.shape)}, "
                             f"got shape {list(positions.shape)}")
        return self._forward_packed(x, layout, positions)

    def _forward_packed(self, x: torch.Tensor, layout: PackedLayout, positions: torch.Tensor | None) -> torch.Tensor:
        """forward_packed on checked inputs. This default unpacks each document to a row of its own
        and runs the ordinary forward with the pads invalid (exact by padding invariance); a mixer
        with a cheaper exact path (e.g. varlen kernels) overrides it."""
        if layout.n_segments == 0:  # nothing but padding
            return torch.zeros_like(x)
        if positions is not None:
            positions = layout.unpack(positions, lead=positions.dim() - 2)  # [(S,) N, L]
        y, _ = self(layout.unpack(x), None, positions=positions, valid=layout.valid)
        return layout.pack(y)

    def _forward(
        self, x: torch.Tensor, state: MixerState, positions: torch.Tensor | None, valid: torch.Tensor
    ) -> tuple[torch.Tensor, MixerState]:
        raise NotImplementedError

    def load_state(self, path: str | os.PathLike, *, device: torch.device | str = "cpu") -> MixerState:
        """Read a state saved with `state.save(path, mixer.config)`; refuses another config's state."""
        return self.state_from_tensors(self.state_class.read_tensors(path, self.config, device=device))
