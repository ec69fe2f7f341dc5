"""The dense-recall task against a naive reading of its examples, and the study end to end."""

from __future__ import annotations

import csv

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mixerzoo.ablate.dense_study import DenseRecallSettings
from mixerzoo.ablate.runner import ExperimentConfig, run_experiment
from mixerzoo.ablate.studies import RunConfig, build_spec
from mixerzoo.tasks.dense_recall import DenseRecallConfig, make_dense_recall
from mixerzoo.tasks.loop import IGNORE
from mixerzoo.tasks.mqar import FILLER, value_distances


@st.composite
def configs(draw):
    n_pairs = draw(st.integers(1, 12))
    gap = draw(st.integers(0, 20))
    n_queries = draw(st.one_of(st.none(), st.integers(1, n_pairs)))
    queries = n_pairs if n_queries is None else n_queries
    return DenseRecallConfig(vocab_size=draw(st.integers(2 * n_pairs + 2, 80)), n_pairs=n_pairs, gap=gap,
                             n_queries=n_queries, seq_len=2 * n_pairs + queries + gap + draw(st.integers(0, 6)))


@given(configs(), st.integers(0, 2**31 - 1))
def test_every_query_asks_a_listed_key_once_and_its_label_is_that_keys_value(config, seed):
    inputs, labels = make_dense_recall(config, 5, seed)
    n, q, start = config.n_pairs, config.queries, 2 * config.n_pairs + config.gap
    half = config.vocab_size // 2
    for row_inputs, row_labels in zip(inputs.tolist(), labels.tolist()):  # a naive reading, example by example
        pairs = dict(zip(row_inputs[0:2 * n:2], row_inputs[1:2 * n:2]))
        assert len(pairs) == n and all(1 <= k < half for k in pairs) and all(half <= v < config.vocab_size for v in pairs.values())
        assert len(set(pairs.values())) == n
        queries = row_inputs[start:start + q]
        assert len(set(queries)) == q and set(queries) <= set(pairs)  # distinct listed keys, each asked once
        assert row_labels[start:start + q] == [pairs[k] for k in queries]
        assert all(t == FILLER for t in row_inputs[2 * n:start] + row_inputs[start + q:])
        assert all(label == IGNORE for label in row_labels[:start] + row_labels[start + q:])
    distances = value_distances(inputs, labels)
    low, high = config.distance_range()
    assert distances.numel() == 5 * q and low <= int(distances.min()) and int(distances.max()) <= high


@given(st.integers(1, 10), st.one_of(st.none(), st.integers(1, 10)), st.integers(2, 40))
def test_inside_cells_lie_inside_the_window_and_past_cells_past_it(n_pairs, queries, window):
    settings = DenseRecallSettings(densities=[n_pairs], queries=queries, gap=max(window - 1, 1))
    spec = build_spec(RunConfig(study="dense-recall", recipe="swa", n_layers=2, window=window))
    if 2 * n_pairs + min(queries or n_pairs, n_pairs) - 2 >= window:
        with pytest.raises(ValueError, match=f"window {window} the inside cell of {n_pairs} pairs"):
            settings.check_spec(spec)
        return
    settings.check_spec(spec)
    inside, past = settings.cells()
    for cell, inside_window in ((inside, True), (past, False)):
        distances = value_distances(*make_dense_recall(cell, 8, 0))
        assert bool((distances < window).all()) == inside_window and bool((distances >= window).all()) != inside_window


def test_bad_shapes_and_settings_are_named():
    with pytest.raises(ValueError, match=r"seq_len \(10\) must be >= 2 \* n_pairs \+ queries \+ gap \(14\)"):
        DenseRecallConfig(vocab_size=64, n_pairs=4, gap=2, seq_len=10)
    with pytest.raises(ValueError, match=r"n_queries \(5\) must be <= n_pairs \(4\)"):
        DenseRecallConfig(vocab_size=64, n_pairs=4, gap=2, seq_len=20, n_queries=5)
    with pytest.raises(ValueError, match="use vocab_size >= 18"):
        DenseRecallConfig(vocab_size=16, n_pairs=8, gap=0, seq_len=30)
    with pytest.raises(ValueError, match="must be distinct"):
        DenseRecallSettings(densities=[4, 4])
    with pytest.raises(ValueError, match="must be distinct"):
        DenseRecallSettings(placements=["past", "past"])
    assert [c.gap for c in DenseRecallSettings(densities=[2, 4], placements=["inside"]).cells()] == [0, 0]
    spec = build_spec(RunConfig(study="dense-recall", recipe="swa", n_layers=2, window=36))
    with pytest.raises(ValueError, match="use gap >= 35"):
        DenseRecallSettings(gap=20).check_spec(spec)


def test_dense_recall_study_scores_every_cell(tmp_path):
    experiment = ExperimentConfig(name="dense", study="dense-recall",
                                  sweep={"recipe": ["swa", "gdn"], "seed": [0, 1], "window": [5], "n_layers": [2]},
                                  fixed=dict(densities=[1, 2], gap=6, steps=3, batch_size=4, eval_examples=8))
    out = run_experiment(experiment, tmp_path, progress=False)
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    cells = [(row["recipe"], row["seed"], row["n_pairs"], row["placement"]) for row in rows]
    assert sorted(cells) == sorted((r, s, n, p) for r in ("swa", "gdn") for s in ("0", "1") for n in ("1", "2")
                                   for p in ("inside", "past"))
    assert all(0.0 <= float(row["accuracy"]) <= 1.0 for row in rows)
    assert {row["seq_len"] for row in rows} == {"12"}  # 3 x 2 pairs + the gap of 6
    assert (out / "plot.png").stat().st_size > 0
    assert torch.isfinite(torch.tensor([float(row["final_loss"]) for row in rows])).all()
