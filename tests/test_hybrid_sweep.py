"""The hybrid sweep (SWA:GDN ratio x window on MQAR, frontier plot), the `plot:` field,
lists of grids, multi-document experiment files and the quick default ablation."""

import csv
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from mixerzoo.ablate.runner import ExperimentConfig, ablate, expand, load_experiments, run_experiment
from mixerzoo.ablate.studies import RunConfig, build_spec, frontier_plot, get_plot, list_plots
from mixerzoo.cli import main

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
MINIMAL_MQAR = dict(seq_len=32, n_pairs=2, steps=1, batch_size=2, eval_examples=4)


def _letters(run: RunConfig) -> str:
    return "".join("S" if layer.mixer.type == "attention" else "G" for layer in build_spec(run).layers)


def test_ratio_zero_to_one_is_all_gdn_and_a_window_leaves_it_unchanged():
    run = RunConfig(study="mqar", recipe="infinitevl", ratio="0:1", window=8)
    assert _letters(run) == "G" * 8 and build_spec(run) == build_spec(RunConfig(study="mqar", recipe="gdn"))
    assert _letters(RunConfig(study="mqar", recipe="gdn", ratio="0:1")) == "G" * 8  # no attention template needed
    assert _letters(RunConfig(study="mqar", recipe="swa", ratio="1:0")) == "S" * 8
    assert [_letters(RunConfig(study="mqar", recipe="infinitevl", ratio=r)) for r in ("1:1", "1:3", "1:7")] == [
        "SG" * 4, "SGGG" * 2, "SGGGGGGG"]
    with pytest.raises(ValueError, match="at least one weight"):
        build_spec(RunConfig(study="mqar", recipe="infinitevl", ratio="0:0"))


def _mqar(**overrides) -> dict:
    return {**dict(name="hs", study="mqar", sweep={"recipe": ["infinitevl"]}, fixed=MINIMAL_MQAR), **overrides}


def test_plot_field_names_a_registered_plot():
    assert "frontier" in list_plots()
    assert ExperimentConfig.model_validate(_mqar()).plot is None
    assert get_plot("mqar", ExperimentConfig.model_validate(_mqar(plot="frontier")).plot) is frontier_plot
    with pytest.raises(ValidationError, match=r"plot\n.*unknown plot 'fronteir'; registered plots: \[.*'frontier'"):
        ExperimentConfig.model_validate(_mqar(plot="fronteir"))
    with pytest.raises(KeyError, match="frontier"):
        get_plot("mqar", "nope")


@pytest.mark.parametrize("sweep, message", [
    ([], "sweep: needs at least one grid"),
    ([{"recipe": ["gdn"]}, {"ratio": ["1:1"]}], r"sweep\[1\].recipe: required"),
    ([{"recipe": ["gdn"]}, {"recipe": ["gdn"], "windw": [4]}], r"sweep\[1\].windw: not a run field"),
    ([{"recipe": ["gdn"]}, {"recipe": ["nope"]}], r"sweep\[1\].recipe: unknown recipe 'nope'"),
    ([{"recipe": ["gdn"]}, {"recipe": ["gdn"], "ratio": ["1-3"]}], r"sweep\[1\].ratio"),
    ([{"recipe": ["gdn"]}, {"recipe": ["gdn"], "seed": [0]}], "appears twice"),
    ({"recipe": ["gdn"], "seed": [1, 1]}, "appears twice"),
])
def test_grid_lists_and_duplicate_runs_are_errors_naming_the_grid(sweep, message):
    with pytest.raises(ValidationError, match=message):
        ExperimentConfig.model_validate(_mqar(sweep=sweep))


@pytest.mark.parametrize("name, study, windows", [("hybrid-sweep", "mqar", (4, 8, 16, 32)),
                                                   ("hybrid-sweep-visual", "visual-recall", (4, 32))])
def test_hybrid_sweep_yamls_are_the_ratio_by_window_grid_plus_references_over_three_seeds(name, study, windows):
    experiment = ExperimentConfig.from_yaml(EXPERIMENTS / f"{name}.yaml")
    assert experiment.study == study and experiment.plot == "frontier"
    runs = expand(experiment)
    grid = [("infinitevl", r, w) for r in ("1:1", "1:3", "1:7") for w in windows]
    models = grid + [("infinitevl", "0:1", None), ("transformer", None, None)]
    assert sorted((r.recipe, r.ratio or "", r.window or 0, r.seed) for r in runs) == sorted(
        (recipe, ratio or "", window or 0, seed) for recipe, ratio, window in models for seed in (0, 1, 2))
    assert all(r.size == "tiny" for r in runs)


def _minimal(path: Path, tmp_path: Path, **fixed) -> Path:
    """A copy of the experiment file at a minimal scale: `fixed` settings per study, seed 0 only."""
    documents = list(yaml.safe_load_all(path.read_text()))
    for document in documents:
        document["fixed"] = {**document["fixed"], **fixed.get(document["study"], {})}
        grids = document["sweep"] if isinstance(document["sweep"], list) else [document["sweep"]]
        for grid in grids:
            grid.pop("seed", None)
    out = tmp_path / path.name
    out.write_text(yaml.safe_dump_all(documents))
    return out


def test_hybrid_sweep_at_minimal_scale_writes_rows_and_the_frontier_plot(tmp_path):
    path = _minimal(EXPERIMENTS / "hybrid-sweep.yaml", tmp_path, mqar=MINIMAL_MQAR)
    (experiment,) = load_experiments(path)
    out = run_experiment(experiment, tmp_path / "results", progress=False)
    assert {p.name for p in out.iterdir() if not p.name.startswith(".")} == {"runs.jsonl", "results.csv", "table.md", "plot.png"}
    assert (out / "plot.png").read_bytes()[:4] == b"\x89PNG"
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 14
    for column in ("ratio", "window", "swa_window", "state_bytes", "accuracy", "seq_len"):
        assert column in rows[0], column
    by = {(r["ratio"], r["window"]): r for r in rows}
    assert by["1:3", "16"]["swa_window"] == "16" and by["0:1", ""]["swa_window"] == ""
    for ratio in ("1:1", "1:3", "1:7"):  # a wider window, a larger state
        sizes = [int(by[ratio, w]["state_bytes"]) for w in ("4", "8", "16", "32")]
        assert sizes == sorted(set(sizes)), ratio


def test_frontier_plot_draws_panels_and_rejects_rows_without_its_columns(tmp_path):
    rows = [dict(recipe="infinitevl", ratio=ratio, window=w, swa_window=w, seq_len=t, state_bytes=1000 * (w or 40) * t,
                 accuracy=0.1 * i) for i, (ratio, w) in enumerate([("1:1", 4), ("1:3", 8), ("0:1", None)])
            for t in (64, 128)] + [dict(recipe="transformer", ratio=None, window=None, seq_len=64, state_bytes=9e6,
                                        accuracy=1.0)]
    frontier_plot(rows, tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="row 2 .*'state_bytes' or 'accuracy'"):
        frontier_plot([dict(accuracy=0.5, state_bytes=10), dict(recipe="gdn", accuracy=0.5)], tmp_path / "g.png")


def test_several_experiments_in_one_file_are_validated_first_and_need_distinct_names(tmp_path):
    efficiency = dict(name="a", study="efficiency", sweep={"recipe": ["gdn"]}, fixed={"contexts": [16]})
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump_all([efficiency, {**efficiency, "name": "b", "sweep": {"recipe": ["nope"]}}]))
    with pytest.raises(ValueError, match=r"(?s)two.yaml, document 2: .*sweep.recipe: unknown recipe 'nope'"):
        ablate(path, tmp_path / "results", progress=False)
    assert not (tmp_path / "results").exists()  # nothing ran
    path.write_text(yaml.safe_dump_all([efficiency, efficiency]))
    with pytest.raises(ValueError, match="document 2: name 'a' is used by an earlier document"):
        load_experiments(path)
    path.write_text(yaml.safe_dump_all([efficiency, {**efficiency, "name": "b"}]))
    assert [(e.name, e.scale) for e in load_experiments(path, scale=0.5)] == [("a", 0.5), ("b", 0.5)]


def test_quick_job_runs_efficiency_then_mqar_and_prints_both_tables(tmp_path, capsys):
    assert [(e.name, e.study) for e in load_experiments(EXPERIMENTS / "quick.yaml")] == [
        ("quick-efficiency", "efficiency"), ("quick-mqar", "mqar")]
    path = _minimal(EXPERIMENTS / "quick.yaml", tmp_path, efficiency=dict(contexts=[16, 64], repeats=1, prefill_tokens=8),
                    mqar=MINIMAL_MQAR)
    main(["ablate", str(path), "--out", str(tmp_path / "results")])
    out = capsys.readouterr().out
    first, second = out.index("# quick-efficiency: study efficiency, 4 runs"), out.index("# quick-mqar: study mqar, 4 runs")
    assert first < second
    for recipe in ("transformer", "swa", "gdn", "infinitevl"):
        assert out[first:second].count(f"| {recipe} |") == 2 and out[second:].count(f"| {recipe} |") == 1
    assert "decode_latency_ms" in out[first:second] and "accuracy" in out[second:]
    for name in ("quick-efficiency", "quick-mqar"):
        assert (tmp_path / "results" / name / "table.md").read_text() in out
        assert (tmp_path / "results" / name / "plot.png").read_bytes()[:4] == b"\x89PNG"
