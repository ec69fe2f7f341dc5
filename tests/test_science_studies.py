"""What the science studies add: depth / width overrides, seeds folded into mean and spread,
parallel runs, the real-text LM study and real handwritten digits."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from mixerzoo.ablate.runner import ExperimentConfig, run_experiment
from mixerzoo.ablate.studies import RunConfig, build_spec
from mixerzoo.ablate.summary import over_seeds, with_spread
from mixerzoo.registry import recipe
from mixerzoo.tasks.text import stdlib_corpus, text_windows
from mixerzoo.tasks.visual import VisualRecallConfig, digit_scans, make_visual_recall, render_digits, sized_processor
from mixerzoo.vlm import vlm_recipe


def _rows(out_dir: Path) -> list[dict]:
    with open(out_dir / "results.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("name", ["transformer", "infinitevl", "gdn", "mamba2"])
def test_depth_and_width_overrides(name):
    base = recipe(name, "tiny")
    spec = build_spec(RunConfig(study="mqar", recipe=name, n_layers=2, d_model=128))
    assert spec.n_layers == 2 and spec.d_model == 128
    for layer, template in zip(spec.layers, base.layers):  # the first layers of the recipe, twice as wide
        assert layer.mixer.type == template.mixer.type and layer.mixer.d_model == 128
        assert getattr(layer.mixer, "n_heads", 0) == 2 * getattr(template.mixer, "n_heads", 0) or name == "mamba2"
        assert getattr(layer.mixer, "head_dim", None) == getattr(template.mixer, "head_dim", None)
        assert layer.mlp.hidden == 2 * template.mlp.hidden
    deeper = build_spec(RunConfig(study="mqar", recipe=name, n_layers=10))
    assert [layer.mixer.type for layer in deeper.layers] == [base.layers[i % 8].mixer.type for i in range(10)]
    if name != "mamba2":  # Mamba2's head count follows from its width; the others' must scale whole
        with pytest.raises(ValueError, match="not a whole number"):
            build_spec(RunConfig(study="mqar", recipe=name, d_model=72))


def test_over_seeds_means_and_spreads_per_group():
    rows = [dict(run_key=k, recipe=r, seed=s, seq_len=64, accuracy=a, state_bytes=10, **{"settings.lr": 1e-3})
            for k, r, s, a in [("a", "t", 0, 0.9), ("b", "t", 1, 1.0), ("c", "t", 2, 0.95), ("d", "g", 0, 0.5)]]
    summary = over_seeds(rows)
    assert [(r["recipe"], r["seeds"]) for r in summary] == [("t", 3), ("g", 1)]
    assert summary[0]["accuracy"] == pytest.approx(0.95) and summary[0]["accuracy_std"] == pytest.approx(0.05)
    assert summary[1]["accuracy_std"] == 0.0 and summary[0]["settings.lr"] == 1e-3  # a float setting is no measurement
    assert with_spread(summary)[0]["accuracy"] == "0.95 ± 0.05"


def test_parallel_runs_equal_serial_runs_and_tables_give_the_spread(tmp_path):
    def experiment(name: str) -> ExperimentConfig:
        return ExperimentConfig(name=name, study="mqar", sweep={"recipe": ["gdn", "transformer"], "seed": [0, 1]},
                                fixed=dict(seq_len=16, n_pairs=2, steps=3, batch_size=4, eval_examples=8))

    serial = _rows(run_experiment(experiment("serial"), tmp_path, progress=False))
    parallel = _rows(run_experiment(experiment("parallel"), tmp_path, progress=False, jobs=2))
    for a, b in zip(serial, parallel, strict=True):
        assert (a["recipe"], a["seed"]) == (b["recipe"], b["seed"])
        assert float(a["final_loss"]) == pytest.approx(float(b["final_loss"]), rel=1e-6)
    table = (tmp_path / "parallel" / "table.md").read_text()
    assert "mean ± std over seeds" in table and " ± " in table.split("\n\n# ")[0]


def test_stdlib_corpus_splits_by_file_and_windows_shift_by_one():
    train, validation = stdlib_corpus("train"), stdlib_corpus("validation")
    assert train.numel() > 5 * validation.numel() > 0
    assert bytes(validation[:1000].tolist()) not in bytes(train.tolist())  # held-out files
    inputs, labels = text_windows(validation, 4, 32, seed=3)
    assert inputs.shape == labels.shape == (4, 32) and torch.equal(inputs[:, 1:], labels[:, :-1])
    assert torch.equal(text_windows(validation, 4, 32, seed=3)[0], inputs)


def test_lm_study_end_to_end(tmp_path):
    experiment = ExperimentConfig(name="lm", study="lm", sweep={"recipe": ["swa", "gdn"]},
                                  fixed=dict(seq_len=32, steps=2, batch_size=2, eval_windows=4, buckets=4))
    out = run_experiment(experiment, tmp_path, progress=False)
    rows = _rows(out)
    columns = ["val_loss", "loss_pos_0_8", "loss_pos_8_16", "loss_pos_16_24", "loss_pos_24_32"]
    for row in rows:
        values = [float(row[c]) for c in columns]
        assert all(np.isfinite(values)) and 0 < values[0] < 10
        assert values[0] == pytest.approx(np.mean(values[1:]), rel=1e-5)  # equal buckets average to the whole
        assert row["train_tokens"] == str(2 * 2 * 32)
    assert (out / "plot.png").stat().st_size > 0


def test_scanned_digits_are_real_held_out_handwriting():
    train, test = digit_scans("train"), digit_scans("test")
    assert sum(len(s) for s in train) + sum(len(s) for s in test) == 1797
    for digit in range(10):
        assert len(test[digit]) > 0 and not any((test[digit][i] == t).all() for i in range(len(test[digit]))
                                                for t in train[digit][:20])
    config = VisualRecallConfig(digit_source="scans", noise=0.0)
    image = render_digits([7], config, np.random.default_rng(0))
    assert image.shape == (28, 28, 3) and image.max() > 100 and (image[..., 0] == image[..., 1]).all()
    processor = sized_processor(vlm_recipe("transformer", "tiny").processor, 28)
    batch = make_visual_recall(config.model_copy(update={"scan_split": "test"}), 3, seed=1, processor_config=processor)
    assert batch["pixel_values"].shape[0] > 0 and torch.isfinite(batch["pixel_values"]).all()


def test_timed_studies_never_run_in_parallel(tmp_path, monkeypatch):
    from mixerzoo.ablate import runner
    from mixerzoo.ablate.studies import is_timed

    assert is_timed("efficiency") and not is_timed("mqar")
    monkeypatch.setattr(runner, "ProcessPool", None)  # any pool would fail
    experiment = ExperimentConfig(name="eff", study="efficiency", sweep={"recipe": ["gdn", "swa"]},
                                  fixed=dict(contexts=[16], repeats=1, prefill_tokens=8))
    assert len(_rows(run_experiment(experiment, tmp_path, progress=False, jobs=2))) == 2
