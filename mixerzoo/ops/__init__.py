"""Pure tensor ops with interchangeable backends ("reference", "torch", and on CUDA "fla" / "flash")."""

from mixerzoo.ops._backend import BACKENDS, Backend
from mixerzoo.ops.attention import attention
from mixerzoo.ops.conv import causal_conv1d
from mixerzoo.ops.gated_delta_rule import gated_delta_rule
from mixerzoo.ops.rope import apply_rotary, rotary_angles
from mixerzoo.ops.ssd import ssd

__all__ = [
    "BACKENDS", "Backend", "apply_rotary", "attention", "causal_conv1d", "gated_delta_rule", "rotary_angles", "ssd",
]
