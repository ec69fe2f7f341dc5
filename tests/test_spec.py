"""LayoutSpec: forms (layers, pattern, ratio, overrides), YAML / JSON round trips, errors (plugins: test_plugin_example)."""

import pytest
import yaml
from pydantic import ValidationError

from mixerzoo import LayoutSpec
from mixerzoo.registry import SIZES, list_recipes, recipe

HYBRID_YAML = """
d_model: 64
vocab_size: 100
n_layers: 8
pattern: "SGGG"
legend:
  S: {type: attention, window: 16, n_heads: 4, n_kv_heads: 2, qkv_bias: true}
  G: {type: gated_deltanet, n_heads: 4, head_dim: 16, expand_v: 2, conv_size: 4}
rope: {kind: mrope, sections: [2, 3, 3], theta: 1000000}
mlp: {type: swiglu, hidden: 128}
overrides: {7: {mixer: {chunk_size: 32}}, 4: {mlp: {type: none}}}
"""


def test_pattern_legend_rope_and_overrides_expand_to_layers():
    spec = LayoutSpec.from_yaml(HYBRID_YAML)
    assert [layer.mixer.type for layer in spec.layers] == ["attention", "gated_deltanet", "gated_deltanet", "gated_deltanet"] * 2
    assert spec.layers[0].mixer.rope.kind == "mrope" and spec.layers[0].mixer.d_model == 64
    assert spec.layers[7].mixer.chunk_size == 32 and spec.layers[3].mixer.chunk_size == 64
    assert spec.layers[4].mlp.type == "none" and spec.layers[0].mlp.hidden == 128


@pytest.mark.parametrize("name", list_recipes())
def test_every_recipe_round_trips_yaml_and_json(name):
    spec = recipe(name, "tiny")
    assert LayoutSpec.from_yaml(spec.to_yaml()) == spec
    assert LayoutSpec.from_json(spec.to_json()) == spec
    assert LayoutSpec.model_validate_json(spec.model_dump_json()) == spec  # pydantic's own JSON (infinities kept)
    assert LayoutSpec.model_validate(yaml.safe_load(spec.to_yaml())).to_yaml() == spec.to_yaml()


def test_ratio_spreads_layers_evenly():
    spec = LayoutSpec.model_validate({
        "d_model": 32, "vocab_size": 10, "n_layers": 12, "ratio": {"S": 1, "G": 3},
        "legend": {"S": {"type": "attention", "n_heads": 2, "window": 4}, "G": {"type": "gated_deltanet", "n_heads": 2}},
    })
    assert "".join("S" if layer.mixer.type == "attention" else "G" for layer in spec.layers) == "SGGG" * 3


@pytest.mark.parametrize(
    "edit, message",
    [
        (("window: 16,", "windw: 16,"), r"layer 0 \(pattern letter 'S'\): mixer: unknown key 'windw' \(did you mean 'window'\?\)"),
        (('"SGGG"', '"SGGX"'), r"pattern letters \['X'\] are missing from the legend"),
        (("conv_size: 4}", "conv_size: 4, window: 3}"), r"layer 1 \(pattern letter 'G'\): mixer: unknown key 'window'; GatedDeltaNetConfig takes"),
        (("n_heads: 4, head_dim: 16", "n_heads: 3"), r"layer 1 \(pattern letter 'G'\).*n_heads \(3\) does not divide d_model \(64\)"),
        (("n_layers: 8", "n_layers: 6"), r"pattern 'SGGG' \(4 letters\) does not tile n_layers = 6"),
        (("vocab_size: 100", "vocab_size: 100\nvocab: 3"), r"unknown key 'vocab' \(did you mean 'vocab_size'\?\)"),
        (("overrides: {7:", "overrides: {9:"), r"overrides: layer 9 does not exist"),
        (("type: swiglu, hidden: 128", "type: swiglu"), r"mlp.hidden is required"),
        (("type: gated_deltanet", "type: gated_delta_net"), r"unknown mixer type 'gated_delta_net'"),
    ],
)
def test_bad_specs_name_the_layer_and_field(edit, message):
    with pytest.raises(ValidationError, match="(?s)" + message):  # (?s): pydantic's report spans lines
        LayoutSpec.from_yaml(HYBRID_YAML.replace(*edit))


@pytest.mark.parametrize("size", SIZES)
def test_every_recipe_builds_at_every_size(size):
    from mixerzoo.blocks import parameter_count

    for name in list_recipes():
        count = parameter_count(recipe(name, size))
        if size == "tiny":
            assert count < 2_000_000, (name, count)
        if size == "small":  # experts hold more than a token runs: minimax 53M, jamba 64M (4 MLP-wide experts)
            assert 20_000_000 <= count <= 70_000_000, (name, count)


def test_paper_sizes_have_the_published_parameter_counts():
    from mixerzoo.blocks import parameter_count

    assert parameter_count(recipe("transformer", "paper")) == 3_085_938_688
    assert parameter_count(recipe("infinitevl", "paper")) == 3_739_697_248
    spec = recipe("infinitevl", "paper")
    kinds = ["S" if layer.mixer.type == "attention" else "G" for layer in spec.layers]
    assert "".join(kinds) == "SGGG" * 9 and spec.layers[0].mixer.window == 8192
