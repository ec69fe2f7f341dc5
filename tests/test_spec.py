"""LayoutSpec: forms (layers, pattern, ratio, overrides), YAML / JSON round trips, errors, plugins."""

import sys
import textwrap

import pytest
import yaml
from pydantic import ValidationError

import mixerzoo.mixers.registry as mixer_registry
from mixerzoo import LayoutSpec
from mixerzoo.blocks import Decoder
from mixerzoo.registry import SIZES, list_mixers, list_recipes, recipe
from mixerzoo.testing import certify

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
        (("window: 16,", "windw: 16,"), r"layer 0 \(pattern letter 'S'\).*mixer.windw.*Extra inputs"),
        (('"SGGG"', '"SGGX"'), r"pattern letters \['X'\] are missing from the legend"),
        (("conv_size: 4}", "conv_size: 4, window: 3}"), r"layer 1 \(pattern letter 'G'\).*mixer.window.*Extra inputs"),
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


PLUGIN = '''
from typing import Literal
import dataclasses
import torch
from mixerzoo.mixers import Mixer, MixerConfig, MixerState


class EchoConfig(MixerConfig):
    """A running sum of the inputs, scaled."""
    type: Literal["echo"] = "echo"
    scale: float = 0.5

    def state_nbytes(self, n_tokens, batch_size=1, *, dtype=torch.float32):
        return batch_size * self.d_model * torch.empty((), dtype=dtype).element_size()

    def mixing_flops_per_token(self, context):
        return 2 * self.d_model


@dataclasses.dataclass
class EchoState(MixerState):
    total: torch.Tensor  # [B, d_model]


class EchoMixer(Mixer):
    config_class = EchoConfig
    state_class = EchoState

    def __init__(self, config):
        super().__init__(config)
        self.proj = torch.nn.Linear(config.d_model, config.d_model, bias=False)

    def init_state(self, batch_size, *, device=None, dtype=None):
        dtype = dtype or self.proj.weight.dtype
        return EchoState(torch.zeros(batch_size, self.config.d_model, device=device, dtype=dtype))

    def _forward(self, x, state, positions, valid):
        sums = state.total[:, None] + (x * valid[..., None]).cumsum(1)
        return self.proj(sums) * self.config.scale * valid[..., None], EchoState(sums[:, -1])
'''


def test_an_installed_plugin_mixer_works_in_a_yaml_spec(tmp_path, monkeypatch):
    (tmp_path / "mz_echo_plugin.py").write_text(PLUGIN)
    dist = tmp_path / "mz_echo_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mz-echo-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[mixerzoo.mixers]\necho = mz_echo_plugin:EchoMixer\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(mixer_registry, "_plugins_loaded", False)
    monkeypatch.setattr(mixer_registry, "_MIXERS", dict(mixer_registry._MIXERS))
    assert "echo" in list_mixers()
    spec = LayoutSpec.from_yaml(textwrap.dedent("""
        d_model: 16
        vocab_size: 20
        pattern: "EF"
        legend:
          E: {type: echo, scale: 0.25}
          F: {type: attention, n_heads: 2}
        mlp: {hidden: 32}
    """))
    assert spec.layers[0].mixer.scale == 0.25
    import torch

    logits, state = Decoder(spec)(torch.randint(0, 20, (2, 5)))
    assert logits.shape == (2, 5, 20) and torch.isfinite(logits).all()
    certify({"type": "echo", "d_model": 8})
    sys.modules.pop("mz_echo_plugin", None)


@pytest.mark.parametrize("size", SIZES)
def test_every_recipe_builds_at_every_size(size):
    from mixerzoo.blocks import parameter_count

    for name in list_recipes():
        count = parameter_count(recipe(name, size))
        if size == "tiny":
            assert count < 2_000_000, (name, count)
        if size == "small":
            assert 20_000_000 <= count <= 50_000_000, (name, count)


def test_paper_sizes_have_the_published_parameter_counts():
    from mixerzoo.blocks import parameter_count

    assert parameter_count(recipe("transformer", "paper")) == 3_085_938_688
    assert parameter_count(recipe("infinitevl", "paper")) == 3_739_697_248
    spec = recipe("infinitevl", "paper")
    kinds = ["S" if layer.mixer.type == "attention" else "G" for layer in spec.layers]
    assert "".join(kinds) == "SGGG" * 9 and spec.layers[0].mixer.window == 8192
