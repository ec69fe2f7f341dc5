"""Bad input raises a clear error naming what is wrong."""

import pytest
import torch
from pydantic import ValidationError

from mixerzoo.registry import build_mixer

SPEC = {"type": "attention", "d_model": 16, "n_heads": 2, "window": 4}


@pytest.mark.parametrize(
    "spec, message",
    [
        ({**SPEC, "window": 0}, "window must be >= 1"),
        ({**SPEC, "n_heads": 3}, r"n_heads \(3\) does not divide d_model \(16\)"),
        ({**SPEC, "n_heads": 4, "n_kv_heads": 3}, r"multiple of n_kv_heads \(3\)"),
        ({**SPEC, "windw": 4}, "windw"),
        ({**SPEC, "rope": {"kind": "mrope"}}, "sections is required"),
        ({**SPEC, "rope": {"kind": "mrope", "sections": [1, 1, 1]}}, "must sum to the rotated dims // 2 = 4"),
        ({**SPEC, "d_model": 0}, "d_model"),
    ],
)
def test_bad_configs_name_the_field(spec, message):
    with pytest.raises(ValidationError, match=message):
        build_mixer(spec)


def test_unknown_mixer_type_lists_the_known_ones():
    with pytest.raises(KeyError, match="unknown mixer type 'attn'.*attention"):
        build_mixer({"type": "attn", "d_model": 16})


@pytest.fixture
def mixer():
    return build_mixer(SPEC)


def test_wrong_rank(mixer):
    with pytest.raises(ValueError, match=r"x must be \[B, T, d_model\], got shape \[5, 16\]"):
        mixer(torch.randn(5, 16))


def test_wrong_d_model(mixer):
    with pytest.raises(ValueError, match="x has d_model 8, the config says 16"):
        mixer(torch.randn(1, 5, 8))


def test_batch_mismatch_between_x_and_state(mixer):
    _, state = mixer(torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match="x has batch 3 but the state has 2 rows"):
        mixer(torch.randn(3, 1, 16), state)


def test_state_from_another_config(mixer):
    _, other = build_mixer({**SPEC, "window": 8})(torch.randn(1, 3, 16))
    with pytest.raises(ValueError, match=r"state field 'k' has shape \[1, 2, 8, 8\].*needs \[1, 2, 4, 8\]"):
        mixer(torch.randn(1, 1, 16), other)
    _, full = build_mixer({**SPEC, "window": None})(torch.randn(1, 3, 16))
    with pytest.raises(TypeError, match="expected a RingKVCache, got a KVCache"):
        mixer(torch.randn(1, 1, 16), full)


def test_bad_valid_and_positions(mixer):
    with pytest.raises(ValueError, match=r"valid must be a bool tensor \[1, 3\]"):
        mixer(torch.randn(1, 3, 16), valid=torch.ones(1, 3))
    with pytest.raises(ValueError, match=r"positions must have shape \[1, 3\]"):
        mixer(torch.randn(1, 3, 16), positions=torch.zeros(3, 1, 3, dtype=torch.long))


@pytest.mark.parametrize("call, message", [
    (lambda m: m.config.state_nbytes(n_tokens=-5), r"AttentionConfig.state_nbytes: n_tokens must be an integer >= 0, got -5"),
    (lambda m: m.config.state_nbytes(4, batch_size=0), r"batch_size must be an integer >= 1, got 0"),
    (lambda m: m.init_state(batch_size=0), r"Attention.init_state: batch_size must be an integer >= 1, got 0"),
    (lambda m: m(torch.randn(1, 3, 16, dtype=torch.float64)), r"Attention: x is torch.float64 but the parameters are "
                                                              r"torch.float32; cast one to the other"),
    (lambda m: m(torch.ones(1, 3, 16, dtype=torch.long)), r"Attention: x must be a floating tensor, got torch.int64"),
])
def test_bad_counts_and_dtypes_are_named(mixer, call, message):
    with pytest.raises(ValueError, match=message):
        call(mixer)


def test_model_level_counts_token_ids_and_generate_are_checked():
    from mixerzoo import Decoder, generate
    from mixerzoo.blocks import state_nbytes
    from mixerzoo.registry import recipe

    spec = recipe("infinitevl", "tiny")
    model = Decoder(spec)
    ids = torch.randint(spec.vocab_size, (1, 4))
    with pytest.raises(ValueError, match="generate: max_new_tokens must be an integer >= 1, got -3"):
        generate(model, ids, max_new_tokens=-3)
    with pytest.raises(ValueError, match="Decoder.init_state: batch_size must be an integer >= 1, got 0"):
        model.init_state(0)
    with pytest.raises(ValueError, match="state_nbytes: context must be an integer >= 0, got -5"):
        state_nbytes(model, -5)
    with pytest.raises(ValueError, match="state_nbytes: a spec has no dtype; give dtype="):
        state_nbytes(spec, 5)
    with pytest.raises(ValueError, match="input_ids must be an integer tensor .token ids., got torch.float32"):
        model(ids.float())
    with pytest.raises(ValueError, match="Decoder: embeds: x is torch.float64 but the parameters are torch.float32"):
        model(embeds=torch.randn(1, 4, spec.d_model, dtype=torch.float64))


@pytest.mark.parametrize("edit, message", [
    ({"patern": "SG"}, r"unknown key 'patern' \(did you mean 'pattern'\?\)"),
    ({"n_layers": -4}, r"n_layers must be a positive integer, got -4"),
])
def test_spec_top_level_mistakes_are_named(edit, message):
    from mixerzoo import LayoutSpec

    data = {"d_model": 16, "vocab_size": 32, "pattern": "SG", "n_layers": 4,
            "legend": {"S": {"type": "attention", "n_heads": 2, "window": 4}, "G": {"type": "gated_deltanet", "n_heads": 2}}}
    data = {k: v for k, v in data.items() if not (k == "pattern" and "patern" in edit)} | edit
    with pytest.raises(ValidationError, match=message):
        LayoutSpec.model_validate(data)


def test_damaged_state_files_name_the_file(mixer, tmp_path):
    from mixerzoo import Decoder
    from mixerzoo.registry import recipe

    path = tmp_path / "state.safetensors"
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match=r"state.safetensors: not a readable safetensors file \(damaged or truncated\?\)"):
        mixer.load_state(path)
    with pytest.raises(ValueError, match=r"state.safetensors: not a readable safetensors file"):
        Decoder(recipe("swa", "tiny")).load_state(path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        mixer.load_state(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("change, message", [
    ({"n_layers": 10**9}, r"n_layers = 1,000,000,000 is more than any machine holds \(at most 4,096\)"),
    ({"d_model": 2**20}, r"d_model = 1,048,576 is more than any machine holds"),
    ({"vocab_size": 10**9}, r"vocab_size = 1,000,000,000 is more than any machine holds"),
    ({"n_layers": 4096, "d_model": 131072}, r"more than 1e\+13 parameters"),
])
def test_a_spec_no_machine_can_hold_is_refused_before_anything_is_built(change, message):
    import time

    from mixerzoo import LayoutSpec

    data = {"d_model": 64, "vocab_size": 256, "n_layers": 2, "pattern": "G",
            "legend": {"G": {"type": "gated_deltanet", "n_heads": 4}}, "mlp": {"hidden": 128}, **change}
    start = time.perf_counter()
    with pytest.raises(ValueError, match=message):
        LayoutSpec.model_validate(data)
    assert time.perf_counter() - start < 5, "refused before the layers were built"


def test_an_explicit_layer_list_is_bounded_too():
    from mixerzoo import LayoutSpec

    layer = {"mixer": {"type": "gated_deltanet", "n_heads": 4}, "mlp": {"hidden": 128}}
    with pytest.raises(ValueError, match="n_layers = 5,000 is more than any machine holds"):
        LayoutSpec.model_validate({"d_model": 64, "vocab_size": 256, "layers": [layer] * 5000})


def test_impossible_sweeps_are_refused_at_dry_run(tmp_path):
    import yaml

    from mixerzoo.ablate.runner import dry_run

    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "study": "mqar", "sweep": {"recipe": ["gdn"], "n_layers": [10**9]},
                                    "fixed": {"seq_len": 16, "n_pairs": 2}}))
    with pytest.raises(ValueError, match="n_layers: Input should be less than or equal to 4096"):
        dry_run(path, tmp_path / "results")
    path.write_text(yaml.safe_dump({"name": "x", "study": "mqar", "sweep": {"recipe": ["gdn"]},
                                    "fixed": {"seq_len": 16, "n_pairs": 2, "vocab_size": 1}}))
    with pytest.raises(ValueError, match=r"run 1 \(gdn/tiny\): .*vocab_size 1 has -1 keys.*use vocab_size >= 6"):
        dry_run(path, tmp_path / "results")
