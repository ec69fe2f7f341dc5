"""Every mixer family of the zoo passes the protocol's kit: with its defaults (only d_model given, as a
user starts), and small with a chunk shorter than the kit's sequences so the chunked op's carry runs."""

from __future__ import annotations

import pytest
import torch

from mixerzoo.registry import build_mixer, list_mixers
from mixerzoo.testing import certify

FAMILIES = ["linear_attention", "based", "retnet", "lightning", "gla", "hgrn2", "deltanet", "kda", "short_conv", "mamba", "rglru", "rwkv6", "rwkv7", "gated_deltaproduct", "mla", "hyena"]
# Small float32 settings: chunks of 5 (never a divisor of the kit's splits, so the chunked ops' carry runs),
# 2 heads where a family has heads; Based's Taylor map keeps 1 + 4 + 16 features of 4-dim keys.
_MATRIX = {"d_model": 16, "n_heads": 2, "chunk_size": 5}
SMALL = {name: _MATRIX for name in FAMILIES[:8]} | {
    "based": {**_MATRIX, "head_dim": 4},
    "short_conv": {"d_model": 16, "conv_size": 4},
    "mamba": {"d_model": 16, "d_state": 4, "chunk_size": 5},
    "rglru": {"d_model": 16, "n_heads": 2, "chunk_size": 5},
    "gated_deltaproduct": {**_MATRIX, "num_householder": 3},
    "rwkv6": {"d_model": 16, "n_heads": 2, "chunk_size": 5, "mix_low_rank": 4, "decay_low_rank": 4},
    "hyena": {"d_model": 16, "order": 3, "filter_hidden": 8, "filter_features": 5, "filter_length": 16},
    "mla": {"d_model": 16, "n_heads": 2, "kv_lora_rank": 8, "q_lora_rank": 6, "qk_nope_head_dim": 4,
            "qk_rope_head_dim": 4, "v_head_dim": 4},
    "rwkv7": {"d_model": 16, "n_heads": 2, "chunk_size": 5, "decay_low_rank": 4, "rate_low_rank": 4,
              "gate_low_rank": 4},
}

def test_every_family_is_registered():
    missing = set(FAMILIES) - set(list_mixers())
    assert not missing, f"not registered: {sorted(missing)}"


@pytest.mark.parametrize("name", FAMILIES)
def test_family_passes_the_kit_with_defaults_float64(name):
    certify({"type": name, "d_model": 32})


@pytest.mark.parametrize("name", FAMILIES)
def test_family_passes_the_kit_across_chunks_float32(name):
    certify({"type": name, **SMALL[name]}, dtype=torch.float32)


def test_gated_attention_passes_the_kit():
    certify({"type": "attention", "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "output_gate": True})


def test_gated_attention_gates_each_output_channel():
    mixer = build_mixer({"type": "attention", "d_model": 16, "n_heads": 2, "output_gate": True})
    x = torch.randn(1, 5, 16)
    with torch.no_grad():
        mixer.gate_proj.weight.zero_()  # sigmoid(0) = 1/2 on every channel: half the ungated output
        gated, _ = mixer(x)
        plain = build_mixer({"type": "attention", "d_model": 16, "n_heads": 2})
        plain.load_state_dict({k: v for k, v in mixer.state_dict().items() if not k.startswith("gate_proj")})
        ungated, _ = plain(x)
    torch.testing.assert_close(gated, ungated / 2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"type": "gla", "d_model": 30, "n_heads": 4}, r"n_heads \(4\) does not divide d_model \(30\)"),
        ({"type": "linear_attention", "d_model": 32, "feature_map": "relu"}, r"feature_map"),
        ({"type": "lightning", "d_model": 32, "decay_scale": -1.0}, r"decay_scale"),
        ({"type": "gla", "d_model": 32, "gate_logit_normalizer": 0}, r"gate_logit_normalizer"),
        ({"type": "kda", "d_model": 32, "backend": "flash"}, r"backend 'flash' is attention's"),
    ],
    ids=["heads-divide", "feature-map", "decay-sign", "normalizer", "backend"],
)
def test_bad_fields_are_named(spec, match):
    with pytest.raises(ValueError, match=match):
        build_mixer(spec)


_PARALLEL = {"type": "parallel", "d_model": 32, "output_scales": [0.5, 1.5],
             "mixers": [{"type": "attention", "n_heads": 4, "n_kv_heads": 2}, {"type": "mamba2"}]}


def test_parallel_layer_passes_the_kit():
    certify(_PARALLEL)
    certify({"type": "parallel", "d_model": 16, "mixers": [{"type": "attention", "n_heads": 2, "window": 3},
                                                           {"type": "gated_deltanet", "n_heads": 2, "chunk_size": 5}]},
            dtype=torch.float32)


def test_parallel_layer_sums_its_scaled_branches():
    torch.manual_seed(0)
    layer = build_mixer(_PARALLEL).double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    with torch.no_grad():
        y, state = layer(x)
        alone = [branch(x)[0] for branch in layer.branches]
    torch.testing.assert_close(y, 0.5 * alone[0] + 1.5 * alone[1], rtol=0, atol=0)
    assert [type(b).__name__ for b in state.parts] == ["KVCache", "Mamba2State"]
    assert state.nbytes == layer.config.state_nbytes(9, 2, dtype=torch.float64)


def test_parallel_state_saves_loads_and_reports_its_growing_branch(tmp_path):
    """A decoder with parallel layers: its state round-trips through a file bit for bit and continues the
    same; a CUDA-graph decoder is refused while the attention branch's cache grows, and names it."""
    from mixerzoo.blocks import Decoder
    from mixerzoo.blocks.cuda_graph import check_fixed_shapes
    from mixerzoo.registry import recipe

    torch.manual_seed(0)
    model = Decoder(recipe("falcon-h1", "tiny")).eval()
    ids = torch.randint(0, model.spec.vocab_size, (2, 7))
    with torch.no_grad():
        _, state = model(ids)
        state.save(tmp_path / "state.safetensors", model.spec)
        loaded = model.load_state(tmp_path / "state.safetensors")
        assert state.flat_tensors().keys() == loaded.flat_tensors().keys()
        assert all(torch.equal(a, b) for a, b in zip(state.flat_tensors().values(), loaded.flat_tensors().values()))
        step = ids[:, :1]
        assert torch.equal(model(step, state)[0], model(step, loaded)[0])
    with pytest.raises(ValueError, match=r"layer 0 \(parallel\) .*fields \['0.k', '0.v'\]"):
        check_fixed_shapes(model, state)
    check_fixed_shapes(model, state.with_capacity(16))


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({**_PARALLEL, "output_scales": [1.0]}, r"output_scales has 1 entries for 2 mixers"),
        ({**_PARALLEL, "mixers": [_PARALLEL, {"type": "mamba2"}]}, r"mixers\[0\]: a parallel branch cannot"),
        ({**_PARALLEL, "mixers": [{"type": "gated_deltanet", "d_model": 16, "n_heads": 2}, {"type": "mamba2"}]},
         r"mixers\[0\] \(gated_deltanet\) has d_model 16, the layer 32"),
        ({**_PARALLEL, "mixers": [{"type": "mamba2", "head_dim": 7}, {"type": "mamba2"}]},
         r"mixers\[0\] \(mamba2\): .*head_dim \(7\) must divide"),
        ({**_PARALLEL, "mixers": [{"type": "mamba3"}, {"type": "mamba2"}]}, r"mixers\[0\]: .*unknown mixer type 'mamba3'"),
        ({**_PARALLEL, "backend": "torch"}, r"branches set their own backends"),
    ],
    ids=["scales", "nested", "width", "branch-field", "unknown-type", "backend"],
)
def test_bad_parallel_fields_are_named(spec, match):
    with pytest.raises(ValueError, match=match):
        build_mixer(spec)


LANDMARKS = ["qwen3-next", "minimax", "samba", "griffin", "jamba", "lfm2", "rwkv7", "falcon-h1", "kimi-linear"]


@pytest.mark.parametrize("name", LANDMARKS)
def test_landmark_recipe_prefills_in_chunks_as_in_one_call(name):
    """Each landmark hybrid at tiny size: a prefill split 5 + 7 gives the logits of one 12-token call
    (float32, relative 1e-4 as the kit's), and its state holds the bytes its spec predicts."""
    from mixerzoo.blocks import Decoder, state_nbytes
    from mixerzoo.registry import recipe
    from mixerzoo.testing import assert_rel_close

    torch.manual_seed(0)
    model = Decoder(recipe(name, "tiny")).eval()
    ids = torch.randint(0, model.spec.vocab_size, (2, 12))
    with torch.no_grad():
        whole, state = model(ids)
        first, part = model(ids[:, :5])
        rest, _ = model(ids[:, 5:], part)
    assert_rel_close(torch.cat([first, rest], 1), whole, 1e-4, what=f"{name}: chunked prefill logits")
    assert state.nbytes == state_nbytes(model, 12, batch_size=2), f"{name}: state bytes"


def test_landmark_recipes_have_their_published_depth_and_order():
    from mixerzoo.registry import recipe

    letters = {"qwen3-next": "GGGA" * 12, "minimax": "LLLLLLLF" * 10, "jamba": "NNNNFNNN" * 4,
               "griffin": ("RRS" * 9)[:26], "lfm2": "CCFCCFCCFCFCFCFC", "samba": "NS" * 16,
               "rwkv7": "W" * 24, "falcon-h1": "H" * 44,
               "kimi-linear": "KKKD" * 6 + "KKD"}
    kinds = {"G": ("gated_deltanet",), "A": ("attention", True), "L": ("lightning",), "F": ("attention", False),
             "N": ("mamba",), "S": ("attention", False), "R": ("rglru",), "C": ("short_conv",), "W": ("rwkv7",),
             "H": ("parallel",), "K": ("kda",), "D": ("mla",)}
    for name, pattern in letters.items():
        layers = recipe(name, "paper").layers
        got = [(m.type, m.output_gate) if m.type == "attention" else (m.type,) for m in (layer.mixer for layer in layers)]
        assert got == [kinds[letter] for letter in pattern], name


def test_rglru_starts_with_griffins_slow_decays():
    """Griffin initialises the RG-LRU's base decay a = exp(-softplus(lambda)) in [0.9, 0.999] (a^2 uniform there):
    a fresh block remembers over tens to thousands of tokens, not one."""
    import torch.nn.functional as F

    gates = build_mixer({"type": "rglru", "d_model": 256}).rg_lru
    base = torch.exp(-F.softplus(gates.recurrent_param.detach()))
    assert 0.9 <= base.min() and base.max() <= 0.999, (base.min().item(), base.max().item())


def test_mla_decodes_the_same_from_a_preallocated_latent_cache():
    """MLA's cache (one latent and one rotary key per token) preallocated for 16 tokens (what CUDA graphs and
    compiled steps take) gives the outputs of the growing cache, prefill and steps alike."""
    torch.manual_seed(0)
    mixer = build_mixer({"type": "mla", "d_model": 32, "kv_lora_rank": 12}).double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    with torch.no_grad():
        growing, fixed = mixer.init_state(2), mixer.init_state(2, capacity=16)
        outputs = {"growing": [], "fixed": []}
        for start, stop in ((0, 5), (5, 6), (6, 7), (7, 9)):
            y, growing = mixer(x[:, start:stop], growing)
            outputs["growing"].append(y)
            y, fixed = mixer(x[:, start:stop], fixed)
            outputs["fixed"].append(y)
    torch.testing.assert_close(torch.cat(outputs["fixed"], 1), torch.cat(outputs["growing"], 1), rtol=1e-12, atol=1e-12)
    assert list(growing.k.shape) == [2, 1, 9, 12] and list(growing.v.shape) == [2, 1, 9, 16]


def test_hyena_equals_its_operator_written_with_conv1d():
    """The Hyena operator recomputed with torch's conv1d (short convs and long causal convolutions as direct
    depthwise convolutions, independent of the mixer's FFT and its state): one call and two chunks."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    d, length = 16, 23
    mixer = build_mixer({"type": "hyena", "d_model": d, "order": 3, "filter_length": 32}).double()
    x = torch.randn(2, length, d, dtype=torch.float64)
    with torch.no_grad():
        streams = mixer.in_proj(x).transpose(1, 2)  # [B, C, T]
        width = mixer.short_conv.shape[1]
        streams = F.conv1d(F.pad(streams, (width - 1, 0)), mixer.short_conv[:, None], mixer.short_bias,
                           groups=streams.shape[1])
        *gates, v = streams.split(d, dim=1)
        filters = mixer.filters(length, x.device, x.dtype)  # [N - 1, T, d]
        for o, gate in enumerate(reversed(gates[1:])):
            u = v * gate
            v = F.conv1d(F.pad(u, (length - 1, 0)), filters[o].T.flip(-1)[:, None], groups=d) + mixer.long_bias[o][:, None] * u
        expected = mixer.out_proj((v * gates[0]).transpose(1, 2))
        whole, _ = mixer(x)
        first, state = mixer(x[:, :9])
        rest, _ = mixer(x[:, 9:], state)
    torch.testing.assert_close(whole, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.cat([first, rest], 1), expected, rtol=1e-10, atol=1e-12)
