"""MQAR: generator properties, the training loop, and the `mqar` ablation study at minimal scale."""

from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from mixerzoo.blocks import Decoder, LayoutSpec
from mixerzoo.registry import recipe
from mixerzoo.tasks import MQARConfig, evaluate_mqar, make_mqar, train_mqar

ROOT = Path(__file__).resolve().parents[1]


@st.composite
def configs(draw) -> MQARConfig:
    n_pairs = draw(st.integers(1, 8))
    return MQARConfig(
        n_pairs=n_pairs,
        seq_len=draw(st.integers(4 * n_pairs, 4 * n_pairs + 40)),
        vocab_size=draw(st.integers(2 * n_pairs + 2, 300)),
        power_a=draw(st.sampled_from([0.01, 0.1, 0.5, 1.0])),
    )


def _queries(config: MQARConfig, inputs: torch.Tensor, labels: torch.Tensor):
    """Per row: the query positions (labels != -100), the prefix keys and values."""
    n = config.n_pairs
    for row in range(inputs.shape[0]):
        yield (labels[row] != -100).nonzero().flatten(), inputs[row, 0:2 * n:2], inputs[row, 1:2 * n:2], row


@given(configs(), st.integers(1, 4), st.integers(0, 2**40))
def test_generator_layout(config, n_examples, seed):
    inputs, labels = make_mqar(config, n_examples, seed)
    n, half, length = config.n_pairs, config.vocab_size // 2, config.seq_len
    assert inputs.shape == labels.shape == (n_examples, length)
    assert inputs.dtype == labels.dtype == torch.long
    for positions, keys, values, row in _queries(config, inputs, labels):
        # keys distinct in [1, V/2), values distinct in [V/2, V)
        assert keys.unique().numel() == n and keys.min() >= 1 and keys.max() < half
        assert values.unique().numel() == n and values.min() >= half and values.max() < config.vocab_size
        # labels only at query positions: n of them, all after the prefix, one per key
        assert positions.numel() == n and positions.min() >= 2 * n
        assert sorted(inputs[row, positions].tolist()) == sorted(keys.tolist())
        # each query's label is the value paired with its key in the prefix
        pair = {k: v for k, v in zip(keys.tolist(), values.tolist())}
        assert all(pair[inputs[row, p].item()] == labels[row, p].item() for p in positions)
        # everything else after the prefix is filler 0, which is never a key
        rest = torch.ones(length, dtype=torch.bool)
        rest[: 2 * n] = False
        rest[positions] = False
        assert (inputs[row, rest] == 0).all() and 0 not in keys.tolist()
        assert (labels[row, : 2 * n] == -100).all()


@given(configs(), st.integers(0, 2**40))
def test_generator_is_deterministic_by_seed(config, seed):
    first, second = make_mqar(config, 3, seed), make_mqar(config, 3, seed)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_seeds_differ_and_queries_follow_the_power_law():
    config = MQARConfig(vocab_size=256, seq_len=256, n_pairs=4)
    a, b = make_mqar(config, 64, 0), make_mqar(config, 64, 1)
    assert not torch.equal(a[0], b[0])
    distance = (a[1] != -100).nonzero()[:, 1] - 2 * config.n_pairs + 1  # 1 = right after the prefix
    uniform_mean = (config.seq_len - 2 * config.n_pairs + 1) / 2
    assert distance.float().mean() < 0.6 * uniform_mean  # a = 0.01: P(d) ~ 1/d, mostly near the prefix


@pytest.mark.parametrize("fields, message", [
    (dict(vocab_size=256, seq_len=15, n_pairs=4), "seq_len"),
    (dict(vocab_size=9, seq_len=16, n_pairs=4), "vocab_size"),
    (dict(vocab_size=256, seq_len=64, n_pairs=4, power_a=0.0), "power_a"),
    (dict(vocab_size=256, seq_len=64, n_pairs=4, n_pair=4), "n_pair"),
])
def test_config_rejects_bad_shapes(fields, message):
    with pytest.raises(ValidationError, match=message):
        MQARConfig(**fields)


def _small_transformer() -> Decoder:
    data = recipe("transformer", "tiny").model_dump(mode="json")
    data["layers"] = data["layers"][:2]
    torch.manual_seed(0)
    model = Decoder(LayoutSpec.model_validate(data))
    torch.nn.init.normal_(model.embed.weight, std=0.02)
    return model


def test_training_lowers_the_loss():
    config = MQARConfig(vocab_size=256, seq_len=32, n_pairs=4)
    model = _small_transformer()
    result = train_mqar(model, config, steps=40, batch_size=16, lr=3e-3, seed=0)
    assert len(result["losses"]) == 40
    assert sum(result["losses"][-5:]) < sum(result["losses"][:5])
    accuracy = evaluate_mqar(model, config, 32, seed=1)
    assert 0.0 <= accuracy <= 1.0


studies = pytest.importorskip("mixerzoo.ablate.studies", reason="mixerzoo.ablate.studies is not written yet")


def test_study_returns_one_row_with_the_expected_columns(tmp_path):
    run = studies.RunConfig(study="mqar", recipe="infinitevl", settings=dict(
        seq_len=32, n_pairs=4, steps=5, batch_size=8, eval_examples=16))
    rows = studies.get_study("mqar")(run, tmp_path)
    assert len(rows) == 1
    row = rows[0]
    assert {"seq_len", "n_pairs", "swa_window", "accuracy", "final_loss", "initial_loss", "steps", "state_bytes",
            "parameters", "train_seconds"} <= row.keys()
    assert (row["seq_len"], row["n_pairs"], row["swa_window"], row["steps"]) == (32, 4, 16, 5)
    assert 0.0 <= row["accuracy"] <= 1.0 and row["state_bytes"] > 0 and row["parameters"] > 0


def test_study_applies_window_and_scale_and_rejects_unknown_settings(tmp_path):
    from mixerzoo.ablate.mqar_study import mqar_study

    run = studies.RunConfig(study="mqar", recipe="swa", window=8, settings=dict(
        seq_len=32, n_pairs=4, steps=4, scale=0.25, batch_size=4, eval_examples=4))
    row = mqar_study(run, tmp_path)[0]
    assert (row["swa_window"], row["steps"]) == (8, 1)
    with pytest.raises(ValidationError, match="n_pair"):
        mqar_study(studies.RunConfig(study="mqar", recipe="swa", settings=dict(seq_len=32, n_pair=4)), tmp_path)


def test_experiment_yaml_expands_to_valid_runs():
    from mixerzoo.ablate import runner
    from mixerzoo.ablate.mqar_study import MQARSettings

    experiment = runner.ExperimentConfig.model_validate(yaml.safe_load((ROOT / "experiments/mqar.yaml").read_text()))
    runs = runner.expand(experiment)
    assert {run.recipe for run in runs} == {"transformer", "swa", "gdn", "mamba2", "infinitevl"}
    assert {run.seed for run in runs} == {0, 1, 2} and {run.n_layers for run in runs} == {2}
    for run in runs:
        settings = MQARSettings.model_validate(run.settings)
        MQARConfig(vocab_size=settings.vocab_size or studies.build_spec(run).vocab_size, seq_len=settings.seq_len,
                   n_pairs=settings.n_pairs)


@given(configs(), st.integers(1, 4), st.integers(0, 2**40))
def test_value_distances_point_at_each_querys_pair(config, n_examples, seed):
    from mixerzoo.tasks.mqar import value_distances

    inputs, labels = make_mqar(config, n_examples, seed)
    distances = value_distances(inputs, labels)
    rows, queries = (labels != -100).nonzero(as_tuple=True)
    values = queries - distances
    assert distances.shape == (n_examples * config.n_pairs,) and bool((distances > 0).all())
    assert torch.equal(inputs[rows, values], labels[rows, queries])  # the value token of the queried pair
    assert torch.equal(inputs[rows, values - 1], inputs[rows, queries])  # right after its key
