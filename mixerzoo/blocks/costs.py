"""What a spec costs, from the config alone: parameters, state bytes at a context, FLOPs per token."""

from __future__ import annotations

import torch
from torch import nn

from mixerzoo.blocks.decoder import Decoder
from mixerzoo.blocks.mlp import Experts
from mixerzoo.blocks.spec import LayoutSpec
from mixerzoo.mixers.base import check_count

_COUNTER_BYTES = 8  # the model-level int64 count of tokens seen, per row


def meta_model(spec: LayoutSpec) -> Decoder:
    """The Decoder built on the meta device: shapes without memory."""
    with torch.device("meta"):
        return Decoder(spec)


def parameter_count(spec: LayoutSpec) -> int:
    """Number of parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in meta_model(spec).parameters())


def state_nbytes(model: LayoutSpec | nn.Module, context: int, *, batch_size: int = 1,
                 dtype: torch.dtype | None = None) -> int:
    """Bytes of the model-level state after `context` tokens per row, activations in `dtype`: by
    default the model's own (a Decoder's parameter dtype); a spec has none, so it needs `dtype`."""
    if isinstance(model, nn.Module):
        dtype = dtype or next(model.parameters()).dtype
        spec = model.spec
    else:
        spec = model
        if dtype is None:
            raise ValueError("state_nbytes: a spec has no dtype; give dtype= (the activations' dtype, e.g. "
                             "torch.bfloat16) or pass the model")
    check_count("context", context, minimum=0, owner="state_nbytes")
    check_count("batch_size", batch_size, minimum=1, owner="state_nbytes")
    per_row = sum(layer.mixer.state_nbytes(context, 1, dtype=dtype) for layer in spec.layers) + _COUNTER_BYTES
    return batch_size * per_row


def flops_per_token(spec: LayoutSpec, context: int) -> int:
    """FLOPs of one decode step after `context` tokens: 2 per weight of every linear and conv
    (LM head included, embedding lookup free; of experts, the top_k a token runs) plus each mixer's mixing
    with the past."""
    check_count("context", context, minimum=0, owner="flops_per_token")
    model = meta_model(spec)
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d)))
    weights += sum(m.active_weights() for m in model.modules() if isinstance(m, Experts))  # the k routed experts
    head = spec.vocab_size * spec.d_model if spec.tie_embeddings else 0  # the tied head is the embedding
    mixing = sum(layer.mixer.mixing_flops_per_token(context) for layer in spec.layers)
    return 2 * (weights + head) + mixing


BYTE_UNITS = ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB"), (1, "B"))
FLOP_UNITS = ((1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP"), (1e3, "kFLOP"), (1, "FLOP"))


def in_units(value: float, units: tuple[tuple[float, str], ...]) -> str:
    """`value` in the largest of `units` (scale, name) it holds at least one of, to three
    significant figures: in_units(42008, BYTE_UNITS) == '41 KiB'."""
    scale, name = next(((scale, name) for scale, name in units if abs(value) >= scale), units[-1])
    return f"{value / scale:.3g} {name}"
