"""The `visual-recall` and `stream-memory` studies end to end through the runner, at a minimal scale."""

import csv
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from mixerzoo.ablate.runner import ExperimentConfig, expand, run_experiment
from mixerzoo.ablate.stream_study import StreamMemorySettings, stream_memory_study
from mixerzoo.ablate.studies import RunConfig, list_studies
from mixerzoo.ablate.visual_study import VisualRecallSettings, visual_recall_study, vlm_spec

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(steps=2, batch_size=2, eval_examples=4, tower_steps=2)


def _table(out: Path) -> list[dict]:
    kept = {p.name for p in out.iterdir()} - {".claims", ".lock"}  # the runner's own bookkeeping aside
    assert kept == {"runs.jsonl", "results.csv", "table.md", "plot.png", ".towers"}
    assert {p.suffix for p in (out / ".towers").iterdir()} == {".safetensors", ".lock"}  # the shared towers
    assert (out / "plot.png").read_bytes()[:4] == b"\x89PNG"
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


def test_both_studies_are_registered():
    assert {"visual-recall", "stream-memory"} <= set(list_studies())


def test_visual_recall_end_to_end(tmp_path):
    experiment = ExperimentConfig(name="vr", study="visual-recall", fixed=dict(n_images=2, **TINY),
                                  sweep={"recipe": ["swa", "gdn"], "settings.filler": [0, 20]})
    rows = _table(run_experiment(experiment, tmp_path, progress=False))
    assert [(r["recipe"], r["filler"]) for r in rows] == [("swa", "0"), ("swa", "20"), ("gdn", "0"), ("gdn", "20")]
    for column in ("accuracy", "final_loss", "initial_loss", "steps", "distance", "distance_max", "tokens",
                   "swa_window", "state_bytes", "parameters", "train_seconds", "run_key"):
        assert column in rows[0], column
    for row in rows:
        assert 0.0 <= float(row["accuracy"]) <= 1.0 and row["steps"] == "2"
        assert int(row["distance"]) >= int(row["filler"]) + 3 and int(row["distance_max"]) >= int(row["distance"])
        assert row["swa_window"] == ("16" if row["recipe"] == "swa" else "")
    by = {(r["recipe"], r["filler"]): int(r["state_bytes"]) for r in rows}
    assert by["gdn", "0"] == by["gdn", "20"]  # constant memory
    assert "| swa |" in (tmp_path / "vr" / "table.md").read_text()


def test_stream_memory_end_to_end(tmp_path):
    experiment = ExperimentConfig(name="sm", study="stream-memory", fixed=TINY,
                                  sweep={"recipe": ["transformer", "infinitevl"], "settings.gap_frames": [2, 24]})
    rows = _table(run_experiment(experiment, tmp_path, progress=False))
    assert [(r["recipe"], r["gap_frames"]) for r in rows] == [
        ("transformer", "2"), ("transformer", "24"), ("infinitevl", "2"), ("infinitevl", "24")]
    for column in ("accuracy", "final_loss", "distance", "stream_tokens", "swa_window", "state_bytes", "parameters",
                   "train_seconds"):
        assert column in rows[0], column
    by = {(r["recipe"], r["gap_frames"]): r for r in rows}
    assert [int(by["infinitevl", g]["distance"]) for g in ("2", "24")] == [6, 28]  # gap + <ve> Q idx + the key itself
    assert by["infinitevl", "2"]["state_bytes"] == by["infinitevl", "24"]["state_bytes"]  # past the window: constant
    assert int(by["transformer", "24"]["state_bytes"]) > int(by["transformer", "2"]["state_bytes"])  # grows
    assert all(0.0 <= float(r["accuracy"]) <= 1.0 for r in rows)


def test_overrides_reach_the_vlm_decoder():
    spec = vlm_spec(RunConfig(study="visual-recall", recipe="infinitevl", window=7, ratio="1:1"))
    kinds = [(layer.mixer.type, getattr(layer.mixer, "window", None)) for layer in spec.decoder.layers]
    assert kinds == [("attention", 7), ("gated_deltanet", None)] * 4
    assert all(layer.mixer.rope.kind == "mrope" for layer in spec.decoder.layers if layer.mixer.type == "attention")


def test_scale_sets_steps_and_unknown_settings_are_errors(tmp_path):
    run = RunConfig(study="stream-memory", recipe="gdn", settings=dict(TINY, steps=8, scale=0.25, gap_frames=1))
    assert stream_memory_study(run, tmp_path)[0]["steps"] == 2
    with pytest.raises(ValidationError, match="gap_frame"):
        stream_memory_study(RunConfig(study="stream-memory", recipe="gdn", settings=dict(gap_frame=3)), tmp_path)
    with pytest.raises(ValidationError, match="filer"):
        visual_recall_study(RunConfig(study="visual-recall", recipe="gdn", settings=dict(filer=3)), tmp_path)


@pytest.mark.parametrize("name, settings", [("visual-recall", VisualRecallSettings),
                                            ("stream-memory", StreamMemorySettings)])
def test_experiment_yamls_expand_to_valid_runs(name, settings):
    experiment = ExperimentConfig.model_validate(yaml.safe_load((ROOT / f"experiments/{name}.yaml").read_text()))
    runs = expand(experiment)
    assert experiment.study == name and {run.recipe for run in runs} == {"transformer", "swa", "gdn", "infinitevl"}
    for run in runs:
        settings.model_validate(run.settings)
