"""Pure tensor ops with interchangeable backends ("reference", "torch", and on CUDA "fla" / "flash")."""

from mixerzoo.ops._backend import BACKENDS, Backend
from mixerzoo.ops.attention import attention
from mixerzoo.ops.rope import apply_rotary, rotary_angles

__all__ = ["BACKENDS", "Backend", "apply_rotary", "attention", "rotary_angles"]
