"""Backend choice shared by every op: one name in, one implementation out."""

from __future__ import annotations

import importlib.util
from functools import cache
from typing import Literal

import torch

Backend = Literal["auto", "reference", "torch", "fla", "flash", "flex"]
BACKENDS: tuple[str, ...] = ("auto", "reference", "torch", "fla", "flash", "flex")
# Backends that only attention has: a recurrent mixer's config rejects them up front.
ATTENTION_ONLY_BACKENDS: tuple[str, ...] = ("flash", "flex")

# Python module each optional CUDA backend needs.
_CUDA_BACKEND_MODULES = {"fla": "fla", "flash": "flash_attn"}


@cache
def module_available(name: str) -> bool:
    """Whether `name` can be imported, without importing it."""
    return importlib.util.find_spec(name) is not None


def _can_run(backend: str, tensor: torch.Tensor) -> bool:
    module = _CUDA_BACKEND_MODULES.get(backend)
    return module is None or (tensor.is_cuda and module_available(module))


def choose_backend(op: str, requested: str, tensor: torch.Tensor, *, supported: tuple[str, ...]) -> str:
    """The concrete backend `op` runs for `requested` on `tensor`'s device.

    `supported` lists the op's concrete backends in order of preference; "auto"
    takes the first that can run on `tensor` (CUDA backends need a CUDA tensor and
    their package). An explicit request that cannot run here raises.
    """
    if requested not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {requested!r}; expected one of {BACKENDS}")
    if requested == "auto":
        return next(name for name in supported if _can_run(name, tensor))
    if requested not in supported:
        raise ValueError(f"{op}: backend {requested!r} is not available for this op; it has {supported}")
    if requested in _CUDA_BACKEND_MODULES:
        if not tensor.is_cuda:
            raise ValueError(f"{op}: backend {requested!r} needs CUDA tensors, got device {tensor.device}")
        if not module_available(_CUDA_BACKEND_MODULES[requested]):
            raise ImportError(
                f"{op}: backend {requested!r} needs the package {_CUDA_BACKEND_MODULES[requested]!r}; "
                "install mixerzoo[gpu]"
            )
    return requested
