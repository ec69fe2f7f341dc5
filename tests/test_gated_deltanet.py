"""Gated DeltaNet mixer: conformance, fla parameter compatibility, InfiniteVL shapes and initialisations."""

from typing import Literal

import pytest
import torch
import torch.nn.functional as F

from mixerzoo.mixers import Attention, AttentionConfig, GatedDeltaNet, GatedDeltaNetConfig
from mixerzoo.registry import build_mixer, register_mixer
from mixerzoo.testing import certify

SMALL = {"type": "gated_deltanet", "d_model": 16, "n_heads": 2, "head_dim": 4, "chunk_size": 4}


@pytest.mark.parametrize(
    "overrides",
    [
        {"expand_v": 1.5},
        {"n_v_heads": 4, "expand_v": 1.0},  # grouped value heads
        {"allow_neg_eigval": True, "conv_size": 2, "conv_bias": True},
        {"conv_size": 1, "chunk_size": 7},
    ],
    ids=["expand-1.5", "grouped-v-heads", "neg-eigval-conv2", "conv1-chunk7"],
)
def test_gated_deltanet_passes_the_kit_float64(overrides):
    certify({**SMALL, **overrides})


def test_gated_deltanet_passes_the_kit_float32():
    certify(SMALL, dtype=torch.float32)


class PadDecayConfig(GatedDeltaNetConfig):
    type: Literal["pad_decay_gdn"] = "pad_decay_gdn"


@register_mixer
class PadDecayGatedDeltaNet(GatedDeltaNet):
    """The neighbours' bug (fla #1272, the InfiniteVL release): pads write nothing but still decay."""

    config_class = PadDecayConfig

    def _gates(self, a, b, valid):
        g, beta = super()._gates(a, b, None)
        return g, beta if valid is None else beta * valid[..., None]


def test_kit_catches_pads_that_decay_the_state():
    with pytest.raises(AssertionError, match="padding invariance"):
        certify({**SMALL, "type": "pad_decay_gdn"}, checks=("padding_invariance",))


def test_fla_gated_deltanet_state_dict_loads_without_renaming():
    layers = pytest.importorskip("fla.layers", reason="flash-linear-attention (fla.layers) is not installed")
    for kwargs, ours in [
        (dict(hidden_size=64, expand_v=2, head_dim=16, num_heads=4), dict(d_model=64, n_heads=4, head_dim=16, expand_v=2)),
        (dict(hidden_size=64, expand_v=1, head_dim=8, num_heads=2, num_v_heads=4, allow_neg_eigval=True),
         dict(d_model=64, n_heads=2, head_dim=8, expand_v=1, n_v_heads=4, allow_neg_eigval=True)),
    ]:
        theirs = layers.GatedDeltaNet(**kwargs, mode="chunk", use_short_conv=True, conv_size=4)
        mixer = build_mixer({"type": "gated_deltanet", **ours})
        mixer.load_state_dict(theirs.state_dict(), strict=True)
        for name, tensor in theirs.state_dict().items():
            assert torch.equal(mixer.state_dict()[name], tensor), name


def test_infinitevl_layer_shapes():
    config = GatedDeltaNetConfig(d_model=2048, n_heads=16, head_dim=128, expand_v=2, conv_size=4)
    with torch.device("meta"):
        layer = GatedDeltaNet(config)
    assert sum(p.numel() for p in layer.parameters()) == 33_653_024  # reference/infinitevl.md
    matrix = 16 * 128 * 256 * 4
    assert matrix == 2 * 2**20
    tails = 3 * (2 * 2048 + 4096) * 2  # bf16 conv tails
    assert config.state_nbytes(10, dtype=torch.bfloat16) == config.state_nbytes(10**6, dtype=torch.bfloat16) == matrix + tails


def test_mimic_init_matches_the_release():
    mixer = build_mixer({**SMALL, "conv_bias": True})
    mixer.mimic_init()
    x = torch.randn(2, 6, 16)
    decay = -mixer.A_log.exp() * F.softplus(mixer.a_proj(x) + mixer.dt_bias)
    torch.testing.assert_close(decay, torch.full_like(decay, -1e-3))
    torch.testing.assert_close(torch.sigmoid(mixer.b_proj(x)), torch.full((2, 6, 2), 0.5))
    for conv in (mixer.q_conv1d, mixer.k_conv1d, mixer.v_conv1d):
        h = torch.randn(2, conv.in_channels, 9)
        torch.testing.assert_close(conv(F.pad(h, (conv.kernel_size[0] - 1, 0))), h)  # identity at the last tap


def test_init_from_attention_repeats_kv_heads():
    attention = Attention(AttentionConfig(d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, qkv_bias=True))
    gdn = GatedDeltaNet(GatedDeltaNetConfig(d_model=32, n_heads=4, head_dim=8, expand_v=1))
    gdn.init_from_attention(attention)
    assert torch.equal(gdn.q_proj.weight, attention.q_proj.weight)
    assert torch.equal(gdn.o_proj.weight, attention.o_proj.weight)
    for head in range(4):
        rows, kv_rows = slice(8 * head, 8 * head + 8), slice(8 * (head // 2), 8 * (head // 2) + 8)
        assert torch.equal(gdn.k_proj.weight[rows], attention.k_proj.weight[kv_rows])
        assert torch.equal(gdn.v_proj.weight[rows], attention.v_proj.weight[kv_rows])
    with pytest.raises(ValueError, match="value heads x value dim = 32"):
        GatedDeltaNet(GatedDeltaNetConfig(d_model=32, n_heads=4, head_dim=8, expand_v=2)).init_from_attention(attention)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"n_heads": 3, "head_dim": None}, r"n_heads \(3\) does not divide d_model \(16\)"),
        ({"n_v_heads": 3}, r"n_v_heads \(3\) must be a multiple of n_heads \(2\)"),
        ({"expand_v": 1.1}, r"expand_v \(1.1\) must be an integer"),
        ({"conv_size": 0}, "conv_size"),
    ],
)
def test_bad_configs(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_mixer({**SMALL, **overrides})
