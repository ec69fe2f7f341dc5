"""Count what the host does in a step: aten calls and host syncs, exactly, on any device.

Timings on a shared CPU are noise; the number of ops a step dispatches and the number of times
it waits for a device value are not. `HostCensus` is a dispatch mode that records both:

    with HostCensus() as census:
        logits, state = model(token, state)
    census.syncs, census.calls, census.sync_sites

A sync is an op whose result the host must read before it can go on: `.item()` / `bool()` /
`int()` of a tensor (aten's `_local_scalar_dense`), ops whose output shape depends on values
(`nonzero`, `unique`, `masked_select`, indexing with a boolean mask, ...), `tolist()` / `numpy()`, and copies from a device to
the CPU. On a CUDA device each one stalls the launch queue; a CUDA graph and a
`torch.compile(fullgraph=True)` cannot hold any of them.
"""

from __future__ import annotations

import collections
import importlib
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

# Ops whose output (a Python scalar, or a shape) depends on tensor values.
_VALUE_DEPENDENT = {
    "_local_scalar_dense", "nonzero", "unique", "_unique", "_unique2", "unique_consecutive", "unique_dim",
    "bincount", "masked_select", "equal", "is_nonzero", "histc",
}
_PACKAGE = Path(__file__).resolve().parents[1]
_TORCH = Path(torch.__file__).resolve().parent
_INDEXING = {"index", "index_put", "index_put_", "_index_put_impl_"}


def _is_sync(func, args, kwargs, out) -> bool:
    name = func._schema.name.split("::")[-1]
    if name in _VALUE_DEPENDENT:
        return True
    if name in _INDEXING and any(  # a boolean mask as an index: nonzero inside
        isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in (args[1] or ())
    ):
        return True
    if name == "repeat_interleave" and "output_size" not in kwargs and any(isinstance(a, torch.Tensor) for a in args):
        return True
    if name in ("_to_copy", "copy_") and isinstance(out, torch.Tensor) and out.device.type == "cpu":
        source = args[1] if name == "copy_" else args[0]
        return isinstance(source, torch.Tensor) and source.device.type != "cpu"
    return False


def _call_site() -> str:
    """file:line (function) of the innermost caller outside torch and this module."""
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename).resolve()
        if _TORCH not in path.parents and path != Path(__file__).resolve():
            shown = path.relative_to(_PACKAGE.parent) if _PACKAGE in path.parents else path
            return f"{shown}:{frame.lineno} ({frame.name})"
    return "?"


class HostCensus(TorchDispatchMode):
    """Dispatch mode counting aten calls (`calls`, by op in `ops`) and host syncs (`syncs`, by
    call site in `sync_sites`) of everything run inside it. `tolist()` and `numpy()` on a tensor,
    which read its data without dispatching, count as syncs too."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.sync_sites: collections.Counter[str] = collections.Counter()
        self._patched: dict[str, object] = {}

    @property
    def calls(self) -> int:
        """aten ops dispatched."""
        return sum(self.ops.values())

    @property
    def syncs(self) -> int:
        """Host syncs: device values the host waited for."""
        return sum(self.sync_sites.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops[str(func.overloadpacket.__name__)] += 1
        if _is_sync(func, args, kwargs, out):
            self.sync_sites[f"{func.overloadpacket.__name__} at {_call_site()}"] += 1
        return out

    def __enter__(self):
        attention_ops = importlib.import_module("mixerzoo.ops.attention")  # the module, not the function
        made = attention_ops.causal_lower_right
        self._patched["causal_lower_right"] = made

        def bias(*size, _made=made):  # a tensor subclass of two ints: made outside the mode, which cannot wrap it
            with _disable_current_modes():
                return _made(*size)

        attention_ops.causal_lower_right = bias
        for name in ("tolist", "numpy"):
            original = getattr(torch.Tensor, name)
            self._patched[name] = original

            def reading(tensor, *args, _original=original, _name=name, **kwargs):
                self.sync_sites[f"{_name} at {_call_site()}"] += 1
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, reading)
        return super().__enter__()

    def __exit__(self, *exc):
        attention_ops = importlib.import_module("mixerzoo.ops.attention")
        for name, original in self._patched.items():
            setattr(attention_ops if name == "causal_lower_right" else torch.Tensor, name, original)
        self._patched.clear()
        return super().__exit__(*exc)

    def report(self) -> str:
        """A short text: totals, then each sync site with its count."""
        lines = [f"{self.calls} aten calls, {self.syncs} host syncs"]
        lines += [f"  {count} x {site}" for site, count in self.sync_sites.most_common()]
        return "\n".join(lines)
