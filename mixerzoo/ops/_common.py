"""Input checks and the span loop shared by the recurrent ops (gated_delta_rule, gated_linear_attention, ssd)."""

from __future__ import annotations

from typing import Callable

import torch

from mixerzoo.ops._backend import choose_backend

# Chunks the "torch" backends batch at once: spans of this many chunks run one after the other with
# the state carried, so the batched temporaries stay small (cache-resident, bounded for a long prefill).
SPAN_CHUNKS = 16


def recurrent_backend(op: str, requested: str, inputs: tuple[torch.Tensor | None, ...]) -> tuple[str, torch.dtype]:
    """The concrete backend of a recurrent op ("fla", else "torch", else "reference") and its compute dtype
    (float64 when any input is float64, else float32); "auto" passes over fla for float64 inputs, which its
    kernels do not take, and asking for fla with them is an error."""
    present = [t for t in inputs if t is not None]
    dtype = torch.float64 if torch.float64 in {t.dtype for t in present} else torch.float32
    chosen = choose_backend(op, requested, present[0], supported=("fla", "torch", "reference"))
    if chosen == "fla" and dtype == torch.float64:
        if requested != "auto":
            raise ValueError(f"{op}: backend 'fla' does not take float64 inputs; use 'torch' or 'reference'")
        chosen = "torch"
    return chosen, dtype


def check_chunk_size(op: str, chunk_size: int) -> None:
    """chunk_size is a positive int (not a bool); raise naming it otherwise."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be a positive int, got {chunk_size!r}")


def check_float_tensors(op: str, named: dict[str, torch.Tensor | None]) -> None:
    """Each given tensor is a floating-point torch.Tensor on the first one's device (None skipped)."""
    first_name, first = next(iter(named.items()))
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
        if t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first_name} is on {first.device}")


def expect_shape(op: str, t: torch.Tensor, name: str, layout: str, shape: tuple[int, ...]) -> None:
    """Raise naming the tensor, its layout and the expected shape unless t has `shape`."""
    if tuple(t.shape) != shape:
        raise ValueError(f"{op}: {name} must be {layout} = {list(shape)}, got {list(t.shape)}")


def check_linear_recurrence(op: str, q, k, v, g, initial_state, chunk_size: int, **others) -> tuple[int, ...]:
    """Validate the inputs every matrix-state op shares (q, k [B, T, H, K]; v [B, T, HV, V]; g; initial_state
    [B, HV, K, V]; chunk_size) and the dtypes and devices of `others` too; return (B, T, H, K, HV, V)."""
    check_float_tensors(op, {"q": q, "k": k, "v": v, "g": g, **others, "initial_state": initial_state})
    if q.dim() != 4:
        raise ValueError(f"{op}: q must be [B, T, H, K], got {list(q.shape)}")
    batch, seq_len, heads, dim_k = q.shape
    expect_shape(op, k, "k", "[B, T, H, K]", (batch, seq_len, heads, dim_k))
    if v.dim() != 4 or v.shape[:2] != (batch, seq_len):
        raise ValueError(f"{op}: v must be [B, T, HV, V] with [B, T] = {[batch, seq_len]}, got {list(v.shape)}")
    value_heads, dim_v = v.shape[2:]
    if value_heads % heads:
        raise ValueError(f"{op}: v has HV = {value_heads} heads, not a multiple of the H = {heads} heads of q and k")
    check_decay_shape(op, g, "HV", (batch, seq_len, value_heads), dim_k)
    if initial_state is not None:
        expect_shape(op, initial_state, "initial_state", "[B, HV, K, V]", (batch, value_heads, dim_k, dim_v))
    if seq_len == 0:
        raise ValueError(f"{op}: T must be at least 1, got q of shape {list(q.shape)}")
    check_chunk_size(op, chunk_size)
    return batch, seq_len, heads, dim_k, value_heads, dim_v


def check_decay_shape(op: str, g: torch.Tensor | None, heads: str, lead: tuple[int, int, int], dim_k: int) -> None:
    """g is None, a scalar decay [B, T, h] or a per-key-channel decay [B, T, h, K]; raise naming it otherwise."""
    if g is None or tuple(g.shape) in (lead, (*lead, dim_k)):
        return
    raise ValueError(f"{op}: g must be [B, T, {heads}] = {list(lead)} (scalar decay) or [B, T, {heads}, K] = "
                     f"{[*lead, dim_k]} (per-channel decay), got {list(g.shape)}")


def decay_channels(g: torch.Tensor | None, lead: tuple[int, int, int], dtype: torch.dtype, device) -> torch.Tensor:
    """A log decay as [B, T, h, Kg] in `dtype`: Kg = 1 for a scalar decay or none (zeros), K per channel."""
    if g is None:
        return torch.zeros(*lead, 1, dtype=dtype, device=device)
    g = g if g.dtype == dtype else g.to(dtype)
    return g[..., None] if g.dim() == 3 else g


def without_autocast(device: torch.device):
    """A context with autocast off on `device`: the torch recurrences compute in the dtype they
    chose (float32, or float64), not in autocast's bf16 / fp16."""
    return torch.autocast(device.type, enabled=False)


def in_spans(
    chunked: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    tensors: tuple[torch.Tensor, ...],
    state: torch.Tensor,
    chunk_size: int,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `chunked(*time_slices, state) -> (out, state)` over spans of SPAN_CHUNKS chunks along
    dim 1 of `tensors`, carrying the state; returns (outputs in out_dtype, final state)."""
    span = SPAN_CHUNKS * chunk_size
    outputs = []
    for start in range(0, tensors[0].shape[1], span):
        out, state = chunked(*(t[:, start : start + span] for t in tensors), state)
        outputs.append(out.to(out_dtype))
    return (outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)), state
