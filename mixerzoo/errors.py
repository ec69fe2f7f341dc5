"""Errors a user can act on: one-line descriptions, and readers of user files whose errors name the file."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, ClassVar, Iterator

import yaml
from pydantic import BaseModel, ConfigDict, SerializerFunctionWrapHandler, ValidationError, model_serializer, model_validator
from safetensors import SafetensorError, safe_open


def describe_validation_error(error: ValidationError) -> str:
    """Pydantic errors as 'field.path: message; ...' on one line (a model-level error without its field)."""
    parts = []
    for e in error.errors():
        message = e["msg"].removeprefix("Value error, ")
        parts.append(f"{'.'.join(str(p) for p in e['loc'])}: {message}" if e["loc"] else message)
    return "; ".join(parts)


def describe(error: BaseException) -> str:
    """The error's message on one line: pydantic errors as 'field: message; ...', a KeyError
    without its quotes, an OSError as 'file: reason', anything else with whitespace collapsed."""
    if isinstance(error, ValidationError):
        text = describe_validation_error(error)
    elif isinstance(error, KeyError) and error.args:
        text = str(error.args[0])
    elif isinstance(error, OSError) and error.strerror:
        text = f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())


def read_yaml(path: str | os.PathLike, *, documents: bool = False) -> Any:
    """The YAML file at `path` (yaml.safe_load), or the list of its documents with `documents`;
    a missing file or a syntax error is a FileNotFoundError / ValueError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, "no such file" if not path.exists() else "not a file", str(path))
    try:
        text = path.read_text()
        return list(yaml.safe_load_all(text)) if documents else yaml.safe_load(text)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValueError(f"{path}: not valid YAML{where}: {error.problem or error.context}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None


@contextlib.contextmanager
def open_safetensors(path: str | os.PathLike, *, device: str = "cpu") -> Iterator[Any]:
    """safetensors' safe_open (framework "pt") whose errors name the file: a missing file is a
    FileNotFoundError, a damaged one a ValueError saying so."""
    if not Path(path).is_file():
        raise FileNotFoundError(2, "no such file", os.fspath(path))
    try:
        handle = safe_open(os.fspath(path), framework="pt", device=str(device))
    except SafetensorError as error:
        raise ValueError(f"{path}: not a readable safetensors file (damaged or truncated?): {error}") from None
    with handle as f:
        yield f


class StrictModel(BaseModel):
    """Base of every config model: frozen, and a key it does not take is an error that names the key,
    the nearest one it takes and all of them, at whatever depth of a nested config it appears."""

    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")

    # Fields added after configs were saved: left out of dumps while at their default, so what was written
    # before them keeps its dumps and hashes (ablation run keys).
    omitted_when_default: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _without_late_defaults(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        if isinstance(data, dict):
            for name in self.omitted_when_default:
                if getattr(self, name) == type(self).model_fields[name].default:
                    data.pop(name, None)
        return data

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        cls.check_keys(data)
        return data

    @classmethod
    def check_keys(cls, data: Any) -> None:
        """Raise ValueError for the first key of the mapping `data` this model does not take (a subclass's
        own before-validator calls it first: those run before this one)."""
        if isinstance(data, dict):
            known = cls.known_keys()
            for key in data:
                if key not in known:
                    raise ValueError(f"unknown key {key!r}{close_matches(str(key), known)}; "
                                     f"{cls.__name__} takes {sorted(known)}")

    @classmethod
    def known_keys(cls) -> set[str]:
        """The keys this model takes (field names and their aliases)."""
        return set(cls.model_fields) | {f.alias for f in cls.model_fields.values() if f.alias}


def finite_tensors(handle: Any, path: str | os.PathLike) -> dict[str, Any]:
    """Every tensor of an open safetensors file (`open_safetensors`), refusing a floating tensor that
    holds NaN or inf with a ValueError naming the file and the tensor (a saved state never does)."""
    import torch

    tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"{path}: tensor {name!r} holds {bad} non-finite value(s) (NaN or inf); "
                             f"a state with them would poison every output it touches")
    return tensors


def close_matches(word: str, known: list[str] | set[str]) -> str:
    """' (did you mean 'x'?)' for the nearest known word, or '' when none is near."""
    import difflib

    near = difflib.get_close_matches(word, sorted(known), n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""


__all__ = ["StrictModel", "close_matches", "finite_tensors", "describe", "describe_validation_error", "open_safetensors", "read_yaml"]
