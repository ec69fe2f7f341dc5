"""Pure tensor ops with interchangeable backends ("reference", "torch", "flex", and on CUDA "fla" / "flash")."""

from mixerzoo.ops._backend import ATTENTION_ONLY_BACKENDS, BACKENDS, Backend
from mixerzoo.ops.attention import attention
from mixerzoo.ops.conv import causal_conv1d
from mixerzoo.ops.dplr_delta_rule import dplr_delta_rule
from mixerzoo.ops.elementwise_recurrence import elementwise_recurrence
from mixerzoo.ops.gated_delta_rule import gated_delta_product, gated_delta_rule
from mixerzoo.ops.gated_linear_attention import gated_linear_attention
from mixerzoo.ops.rope import apply_rotary, rotary_angles, rotary_tables, rotate, shared_rotary
from mixerzoo.ops.ssd import ssd

__all__ = [
    "ATTENTION_ONLY_BACKENDS", "BACKENDS", "Backend", "apply_rotary", "attention", "causal_conv1d",
    "dplr_delta_rule", "elementwise_recurrence", "gated_delta_product", "gated_delta_rule", "gated_linear_attention", "rotary_angles", "rotary_tables", "rotate", "shared_rotary", "ssd",
]
