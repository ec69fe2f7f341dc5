"""The config reference (docs/CONFIG.md, `mixerzoo mixers`, `mixer_config(name)`) and misspelt keys at every depth."""

from pathlib import Path
from typing import Literal

import pytest
import yaml
from pydantic import Field, ValidationError

import mixerzoo as mz
from mixerzoo.cli import main
from mixerzoo.reference import config_reference, reference_models

REPO = Path(__file__).resolve().parents[1]


def test_docs_config_md_is_the_generated_reference():
    """docs/CONFIG.md is current: regenerate it with `python -m mixerzoo.reference > docs/CONFIG.md`."""
    assert (REPO / "docs" / "CONFIG.md").read_text() == config_reference(plugins=False)


def test_every_documented_field_says_what_it_means():
    missing = [f"{title}.{name}" for _, title, model in reference_models(plugins=False)
               for name, field in model.model_fields.items() if not (field.description or "").strip()]
    assert not missing, f"fields without a description: {missing}"


def test_the_mixers_command_lists_plugin_mixers_with_their_fields(capsys):
    from mixerzoo.mixers import Mixer, MixerConfig
    from mixerzoo.mixers.registry import _MIXERS

    class EchoConfig(MixerConfig):
        """A test mixer that documents itself."""

        type: Literal["echo-reference-test"] = "echo-reference-test"
        gain: float = Field(1.0, description="multiplies the input")

    class Echo(Mixer):
        config_class = EchoConfig

    mz.registry.register_mixer(Echo)
    try:
        main(["mixers"])
        out = capsys.readouterr().out
        assert "### type: echo-reference-test" in out and "| `gain` | float | `1.0` | multiplies the input |" in out
        assert "| `n_heads` | int | `required` | query heads |" in out
        assert mz.registry.mixer_config("echo-reference-test") is EchoConfig
    finally:
        del _MIXERS["echo-reference-test"]


def test_mixer_config_of_a_name_is_its_schema():
    schema = mz.registry.mixer_config("mamba2")
    assert "d_state" in schema.model_fields and schema.model_json_schema()["title"] == "Mamba2Config"
    with pytest.raises(KeyError, match="did you mean 'mamba2'"):
        mz.registry.mixer_config("mamba22")


LAYOUT = {"d_model": 64, "vocab_size": 256, "n_layers": 2, "pattern": "SG",
          "legend": {"S": {"type": "attention", "n_heads": 4, "window": 8}, "G": {"type": "gated_deltanet", "n_heads": 4}},
          "mlp": {"type": "swiglu", "hidden": 128}}


def _patched(data: dict, path: tuple, key: str) -> dict:
    """A deep copy of `data` with key `key` added at `path` (the misspelling under test)."""
    data = yaml.safe_load(yaml.safe_dump(data))
    node = data
    for step in path:
        node = node[step]
    node[key] = 1
    return data


@pytest.mark.parametrize("path, key, where, nearest", [
    ((), "patern", "", "pattern"),
    (("legend", "G"), "n_head", "layer 1 (pattern letter 'G'): mixer", "n_heads"),
    (("legend", "S"), "windw", "layer 0 (pattern letter 'S'): mixer", "window"),
    (("mlp",), "hiden", "mlp", "hidden"),
])
def test_a_misspelt_layout_key_names_its_place_and_the_nearest_key(path, key, where, nearest):
    with pytest.raises(ValidationError) as error:
        mz.LayoutSpec.model_validate(_patched(LAYOUT, path, key))
    text = mz.errors.describe(error.value)
    assert where in text and f"unknown key {key!r} (did you mean {nearest!r}?)" in text, text


def test_a_misspelt_rope_key_names_the_nearest_key():
    data = _patched(LAYOUT, ("legend", "S"), "rope")
    data["legend"]["S"]["rope"] = {"kind": "rope", "thta": 10}
    with pytest.raises(ValidationError, match=r"rope: unknown key 'thta' \(did you mean 'theta'\?\)"):
        mz.LayoutSpec.model_validate(data)


def test_misspelt_experiment_settings_and_training_keys_name_the_nearest_key(tmp_path):
    from mixerzoo.ablate.runner import load_experiments
    from mixerzoo.train.config import TrainConfig

    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "study": "mqar", "sweeep": {"recipe": ["gdn"]}}))
    with pytest.raises(ValueError, match=r"unknown key 'sweeep' \(did you mean 'sweep'\?\)"):
        load_experiments(path)
    path.write_text(yaml.safe_dump({"name": "x", "study": "mqar", "sweep": {"recipe": ["gdn"]},
                                    "fixed": {"seq_len": 16, "n_pairs": 2, "stpes": 3}}))
    with pytest.raises(ValueError, match=r"run 1 \(gdn/tiny\): settings: unknown key 'stpes' \(did you mean 'steps'\?\)"):
        load_experiments(path)
    config = {"stage": "sft", "out_dir": str(tmp_path), "student": {"recipe": "gdn"}, "steps": 1,
              "data": {"source": "mqar"}, "optim": {"lrr": 0.1}}
    with pytest.raises(ValidationError, match=r"optim\n.*unknown key 'lrr' \(did you mean 'lr'\?\)"):
        TrainConfig.model_validate(config)
