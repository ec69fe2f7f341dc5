"""The conformance kit on full and sliding-window attention, and on deliberately broken mixers."""

import dataclasses
from typing import Literal

import pytest
import torch

from mixerzoo.mixers import Attention, AttentionConfig, RingKVCache
from mixerzoo.registry import register_mixer
from mixerzoo.testing import certify

ATTENTION_CONFIGS = {
    "full": dict(d_model=32, n_heads=4),
    "full-gqa-qknorm-bias": dict(d_model=32, n_heads=4, n_kv_heads=2, qk_norm=True, qkv_bias=True),
    "full-mrope": dict(d_model=48, n_heads=2, head_dim=12, rope=dict(kind="mrope", sections=[2, 2, 2], theta=1e4)),
    "full-norope": dict(d_model=32, n_heads=2, rope=dict(kind="none")),
    "swa-1": dict(d_model=32, n_heads=4, n_kv_heads=1, window=1),
    "swa-2": dict(d_model=32, n_heads=4, n_kv_heads=2, window=2),
    "swa-5": dict(d_model=32, n_heads=4, n_kv_heads=2, window=5, qkv_bias=True),
    "swa-16-mrope": dict(d_model=32, n_heads=2, window=16, rope=dict(kind="mrope", sections=[2, 3, 3])),
}


@pytest.mark.parametrize("name", list(ATTENTION_CONFIGS))
def test_attention_passes_the_kit_float64(name):
    certify({"type": "attention", **ATTENTION_CONFIGS[name]})


@pytest.mark.parametrize("window", [None, 3])
def test_attention_passes_the_kit_float32(window):
    certify({"type": "attention", "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "window": window}, dtype=torch.float32)


# Broken mixers: each breaks one invariant; the kit must notice.


class ForgetfulConfig(AttentionConfig):
    type: Literal["forgetful_attention"] = "forgetful_attention"


@register_mixer
class ForgetfulAttention(Attention):
    """Forgets the state between chunks: every call starts from an empty cache."""

    config_class = ForgetfulConfig

    def _forward(self, x, state, positions, valid):
        return super()._forward(x, self.init_state(x.shape[0], device=x.device, dtype=x.dtype), positions, valid)


class PadLeakConfig(AttentionConfig):
    type: Literal["pad_leak_attention"] = "pad_leak_attention"


@register_mixer
class PadLeakAttention(Attention):
    """Treats pads as tokens (zeroing only their outputs): pads leak into the state."""

    config_class = PadLeakConfig

    def _forward(self, x, state, positions, valid):
        if valid is None:  # every token real (dense_valid): nothing to leak
            return super()._forward(x, state, positions, valid)
        y, state = super()._forward(x, state, positions, torch.ones_like(valid))
        return y * valid[..., None], state


class AliasingConfig(AttentionConfig):
    type: Literal["aliasing_attention"] = "aliasing_attention"


@dataclasses.dataclass
class SharedRing(RingKVCache):
    """A ring whose clone() shares storage and whose update is in place."""

    def clone(self):
        return dataclasses.replace(self)


@register_mixer
class AliasingAttention(Attention):
    """Updates its ring in place, and clone() does not copy: forks alias each other."""

    config_class = AliasingConfig
    state_class = SharedRing

    def init_state(self, batch_size, *, device=None, dtype=None):
        return SharedRing(**super().init_state(batch_size, device=device, dtype=dtype).tensors())

    def _forward(self, x, state, positions, valid):
        y, new = super()._forward(x, state, positions, valid)
        for name, tensor in new.tensors().items():
            state.tensors()[name].copy_(tensor)
        return y, state


class MisreportConfig(AttentionConfig):
    type: Literal["misreport_attention"] = "misreport_attention"

    def state_nbytes(self, n_tokens, batch_size=1, *, dtype=torch.float32):
        return super().state_nbytes(min(n_tokens, 8), batch_size, dtype=dtype)  # claims a bounded cache


@register_mixer
class MisreportAttention(Attention):
    """Full attention whose config claims its state stops growing."""

    config_class = MisreportConfig


class LeakyPackingConfig(AttentionConfig):
    type: Literal["leaky_packing_attention"] = "leaky_packing_attention"


@register_mixer
class LeakyPackingAttention(Attention):
    """Runs a packed row as one sequence: earlier documents leak into later ones."""

    config_class = LeakyPackingConfig

    def _forward_packed(self, x, layout, positions):
        return self(x, None, valid=layout.tokens)[0]


@pytest.mark.parametrize(
    "kind, window, invariant",
    [
        ("forgetful_attention", None, "chunk invariance"),
        ("forgetful_attention", 4, "chunk invariance"),
        ("pad_leak_attention", None, "padding invariance"),
        ("pad_leak_attention", 4, "padding invariance"),
        ("aliasing_attention", 4, "fork independence"),
        ("misreport_attention", None, "bounded memory"),
        ("leaky_packing_attention", None, "packing"),
        ("leaky_packing_attention", 4, "packing"),
    ],
)
def test_kit_catches_a_broken_mixer(kind, window, invariant):
    spec = {"type": kind, "d_model": 16, "n_heads": 2, "window": window}
    check = invariant.replace(" ", "_")
    with pytest.raises(AssertionError, match=invariant):
        certify(spec, checks=(check,))


def test_kit_rejects_unknown_checks_and_dtypes():
    with pytest.raises(ValueError, match="unknown checks"):
        certify({"type": "attention", "d_model": 16, "n_heads": 2}, checks=("speed",))
    with pytest.raises(ValueError, match="dtype"):
        certify({"type": "attention", "d_model": 16, "n_heads": 2}, dtype=torch.float16)
