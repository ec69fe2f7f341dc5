"""The ablation runner: sweep expansion, config errors, the efficiency study, resuming, the CLI."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from mixerzoo.ablate.runner import (
    ExperimentConfig, ablate, dry_run, expand, load_experiments, read_rows, run_experiment, to_markdown,
)
from mixerzoo.ablate.studies import RunConfig, StudySettings, build_spec, list_studies, register_study, study_settings
from mixerzoo.blocks import parameter_count
from mixerzoo.blocks.costs import FLOP_UNITS, in_units
from mixerzoo.cli import main

CALLS: list[str] = []


class _CountingSettings(StudySettings):
    steps: int = 1
    lr: float = 0.1


@register_study("test-counting", settings=_CountingSettings)
def _counting(run: RunConfig, scratch: Path) -> list[dict]:
    """Two rows per run; records the call."""
    assert scratch.is_dir()
    CALLS.append(run.key())
    return [{"part": 0, "value": run.seed * 10.0}, {"part": 1, "value": run.seed * 10.0 + 1}]


def _experiment(**overrides) -> ExperimentConfig:
    data = dict(name="exp", study="test-counting", sweep={"recipe": ["gdn", "swa"], "seed": [0, 1, 2]}, fixed={"steps": 3})
    return ExperimentConfig.model_validate({**data, **overrides})


def test_expansion_is_a_cartesian_product_in_sweep_order_with_stable_keys():
    runs = expand(_experiment())
    assert [(r.recipe, r.seed) for r in runs] == [("gdn", 0), ("gdn", 1), ("gdn", 2), ("swa", 0), ("swa", 1), ("swa", 2)]
    assert all(r.settings == {"steps": 3, "scale": 1.0} for r in runs)
    assert [r.key() for r in runs] == [r.key() for r in expand(_experiment())]
    assert len({r.key() for r in runs}) == 6
    same = RunConfig(study="test-counting", recipe="gdn", settings={"scale": 1.0, "steps": 3})
    assert same.key() == runs[0].key()  # settings order does not matter
    assert RunConfig(study="test-counting", recipe="gdn", seed=1).key() != RunConfig(study="test-counting", recipe="gdn").key()


def test_run_keys_are_those_of_earlier_versions_so_old_results_resume():
    """The key of a run without a composed layout is what the runner computed before layouts existed."""
    run = RunConfig(study="mqar", recipe="gdn", seed=1, window=4, settings={"seq_len": 32, "n_pairs": 4, "scale": 1.0})
    assert run.key() == "cab26f3354ac695f"
    assert run.model_copy(update={"layout": {"d_model": 8}}).key() != run.key()


def test_settings_sweeps_merge_over_fixed():
    runs = expand(_experiment(sweep={"recipe": ["gdn"], "settings.steps": [1, 2], "settings": [{"lr": 0.1}, {"lr": 0.2}]}))
    assert [r.settings for r in runs] == [
        {"steps": 1, "lr": 0.1, "scale": 1.0}, {"steps": 1, "lr": 0.2, "scale": 1.0},
        {"steps": 2, "lr": 0.1, "scale": 1.0}, {"steps": 2, "lr": 0.2, "scale": 1.0},
    ]


@pytest.mark.parametrize("change, field", [
    (dict(sweeps={"recipe": ["gdn"]}), "sweeps"),
    (dict(sweep={"recipe": ["gdn"], "sead": [0]}), "sweep.sead"),
    (dict(sweep={"recipe": ["nope"]}), "sweep.recipe"),
    (dict(sweep={"seed": [0]}), "sweep.recipe"),
    (dict(sweep={"recipe": ["gdn"], "ratio": ["1-3"]}), "sweep.ratio"),
    (dict(study="no-such-study"), "study"),
])
def test_bad_configs_name_the_field(change, field):
    with pytest.raises(ValidationError) as error:
        _experiment(**change)
    assert field in str(error.value)


def test_unknown_study_lists_the_registered_studies():
    with pytest.raises(ValidationError, match="efficiency") as error:
        _experiment(study="efficency")
    assert "test-counting" in str(error.value) and set(list_studies()) >= {"efficiency", "test-counting"}


def test_build_spec_applies_window_and_ratio_overrides():
    spec = build_spec(RunConfig(study="efficiency", recipe="infinitevl", ratio="1:1", window=7))
    kinds = [(layer.mixer.type, getattr(layer.mixer, "window", None)) for layer in spec.layers]
    assert kinds == [("attention", 7), ("gated_deltanet", None)] * 4
    full = build_spec(RunConfig(study="efficiency", recipe="transformer", window=7))
    assert all(layer.mixer.window is None for layer in full.layers)
    with pytest.raises(ValueError, match="Gated DeltaNet"):
        build_spec(RunConfig(study="efficiency", recipe="swa", ratio="1:3"))


def test_build_spec_scales_the_width_of_a_parallel_layers_branches():
    spec = build_spec(RunConfig(study="mqar", recipe="falcon-h1", n_layers=2, d_model=32))
    attention, mamba2 = spec.layers[0].mixer.mixers
    assert (spec.d_model, attention.d_model, mamba2.d_model) == (32, 32, 32)
    assert (attention.n_heads, attention.n_kv_heads, attention.head_dim) == (2, 1, 16)  # heads halve, sizes stay


def test_efficiency_at_minimal_scale_writes_every_output(tmp_path):
    experiment = ExperimentConfig(name="eff", study="efficiency", sweep={"recipe": ["transformer", "infinitevl"]},
                                  fixed={"contexts": [64, 256], "repeats": 1, "prefill_tokens": 16})
    out = run_experiment(experiment, tmp_path, progress=False)
    assert {p.name for p in out.iterdir() if not p.name.startswith(".")} == {"runs.jsonl", "results.csv", "table.md", "plot.png"}
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["recipe"], r["context"]) for r in rows] == [("transformer", "64"), ("transformer", "256"),
                                                           ("infinitevl", "64"), ("infinitevl", "256")]
    for column in ("run_key", "size", "decode_latency_ms", "prefill_tokens_per_s", "state_nbytes",
                   "predicted_state_nbytes", "parameters", "flops_per_token", "state_fill"):
        assert column in rows[0], column
    for row in rows:
        assert row["state_nbytes"] == row["predicted_state_nbytes"] and row["state_fill"] == "random"
    by = {(r["recipe"], r["context"]): int(r["state_nbytes"]) for r in rows}
    assert by["transformer", "256"] > by["transformer", "64"] and by["infinitevl", "256"] == by["infinitevl", "64"]
    assert "| transformer | 64 |" in (out / "table.md").read_text()
    assert (out / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_skips_done_runs_and_recovers_from_an_interruption(tmp_path):
    experiment = _experiment()
    CALLS.clear()
    out = run_experiment(experiment, tmp_path, progress=False)
    assert len(CALLS) == 6
    jsonl = out / "runs.jsonl"
    assert len(read_rows(jsonl)) == 12

    CALLS.clear()
    run_experiment(experiment, tmp_path, progress=False)
    assert CALLS == []

    # interruption: the last run wrote only one of its two rows, the first run's rows are gone,
    # and a crash left half a line at the end
    lines = jsonl.read_text().splitlines()
    first, last = json.loads(lines[0])["run_key"], json.loads(lines[-1])["run_key"]
    kept = [line for line in lines if json.loads(line)["run_key"] != first][:-1]
    jsonl.write_text("\n".join(kept) + "\n" + lines[-1][: len(lines[-1]) // 2])
    CALLS.clear()
    run_experiment(experiment, tmp_path, progress=False)
    assert sorted(CALLS) == sorted([first, last])
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]  # every line parses
    assert len(rows) == 12 and len({r["run_key"] for r in rows}) == 6
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["recipe"], r["seed"], r["part"]) for r in table] == [
        (recipe, str(seed), str(part)) for recipe in ("gdn", "swa") for seed in range(3) for part in range(2)]


def test_a_malformed_row_inside_the_file_is_an_error(tmp_path):
    path = tmp_path / "runs.jsonl"
    path.write_text('{"run_key": "a", "run_rows": 1}\nnot json\n{"run_key": "b", "run_rows": 1}\n')
    with pytest.raises(ValueError, match="row 2"):
        read_rows(path)


def _tiny_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(dict(name="cli-eff", study="efficiency", sweep={"recipe": ["gdn"], "size": ["tiny"]},
                                        fixed={"contexts": [32], "repeats": 1, "prefill_tokens": 8})))
    return path


def test_cli_ablate_prints_the_table(tmp_path, capsys):
    main(["ablate", str(_tiny_yaml(tmp_path)), "--out", str(tmp_path / "results"), "--scale", "0.5"])
    out = capsys.readouterr().out
    assert "| gdn |" in out and "| settings.scale |" in out and "| 0.5 |" in out
    assert (tmp_path / "results" / "cli-eff" / "table.md").read_text() == out


def test_python_dash_m_ablate(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mixerzoo", "ablate", str(_tiny_yaml(tmp_path)), "--out",
                           str(tmp_path / "results")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "decode_latency_ms" in done.stdout and (tmp_path / "results" / "cli-eff" / "runs.jsonl").exists()


def _two_experiment_yaml(tmp_path: Path, second_settings: dict) -> Path:
    path = tmp_path / "two.yaml"
    first = dict(name="first", study="test-counting", sweep={"recipe": ["gdn"], "seed": [0, 1]})
    second = dict(name="second", study="test-counting", sweep={"recipe": ["gdn"], "settings.steps": [1, 2]},
                  fixed=second_settings)
    path.write_text(yaml.safe_dump(first) + "---\n" + yaml.safe_dump(second))
    return path


@pytest.mark.parametrize("settings, message", [
    ({"stepz": 3}, r"document 2: run 1 \(gdn/tiny\): settings: unknown key .stepz. \(did you mean .steps.\?\)"),
    ({"lr": "fast"}, r"document 2: run 1 \(gdn/tiny\): settings.lr: Input should be a valid number"),
])
def test_every_runs_settings_are_validated_before_the_first_run(tmp_path, settings, message):
    CALLS.clear()
    with pytest.raises(ValueError, match=message):
        ablate(_two_experiment_yaml(tmp_path, settings), tmp_path / "results", progress=False)
    assert CALLS == [] and not (tmp_path / "results").exists()


def test_study_settings_models_reject_misspelt_and_bad_values():
    for study, bad in [("efficiency", {"repeatz": 3}), ("efficiency", {"contexts": [-1]}), ("mqar", {"seq_len": 16}),
                       ("mqar", {"seq_len": 16, "n_pairs": 2, "steps": -5}), ("visual-recall", {"filer": 3}),
                       ("stream-memory", {"gap_frames": -1})]:
        with pytest.raises(ValidationError):
            study_settings(RunConfig(study=study, recipe="gdn", settings=bad))


def test_dry_run_lists_the_runs_and_their_cost_and_runs_nothing(tmp_path):
    path = _two_experiment_yaml(tmp_path, {"lr": 0.5})
    CALLS.clear()
    run_experiment(load_experiments(path)[0].model_copy(update={"sweep": {"recipe": ["gdn"], "seed": [0]}}),
                   tmp_path / "results", progress=False)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    CALLS.clear()
    text = dry_run(path, tmp_path / "results")
    assert CALLS == [] and sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert "## first: study test-counting, 2 runs, 1 to run" in text and "## second: study test-counting, 2 runs, 2 to run" in text
    assert "| 1 | gdn/tiny | done | ? |" in text and "| 2 | gdn/tiny seed=1 | to run | ? |" in text
    assert "| 1 | gdn/tiny | 1 | to run | ? |" in text and "Same in every run: lr=0.5, scale=1.0" in text
    assert "4 runs have no estimate" not in text and "3 runs have no estimate" in text


def test_only_runs_and_costs_the_named_experiments_after_validating_every_document(tmp_path):
    path = _two_experiment_yaml(tmp_path, {"lr": 0.5})
    CALLS.clear()
    ablate(path, tmp_path / "results", progress=False, only=["second"])
    assert len(CALLS) == 2 and not (tmp_path / "results" / "first").exists()
    assert (tmp_path / "results" / "second" / "runs.jsonl").exists()
    text = dry_run(path, tmp_path / "results", only=["first"])
    assert "## first:" in text and "## second:" not in text
    with pytest.raises(ValueError, match=r"no experiment named 'thrid'; its experiments are \['first', 'second'\]"):
        load_experiments(path, only=["thrid"])
    with pytest.raises(ValueError, match="document 2"):  # a bad document is an error even when not selected
        load_experiments(_two_experiment_yaml(tmp_path, {"stepz": 3}), only=["first"])


def test_dry_run_estimates_training_flops_from_the_settings(tmp_path):
    path = tmp_path / "mqar.yaml"
    path.write_text(yaml.safe_dump(dict(name="m", study="mqar", sweep={"recipe": ["swa"], "settings.steps": [10, 20]},
                                        fixed={"seq_len": 16, "n_pairs": 2, "batch_size": 4, "eval_examples": 8})))
    parameters = parameter_count(build_spec(RunConfig(study="mqar", recipe="swa")))
    text = dry_run(path, tmp_path / "results")
    for steps in (10, 20):
        flops = parameters * (6 * steps * 4 * 16 + 2 * 8 * 16)
        assert f"| {steps} | to run | {in_units(flops, FLOP_UNITS)} |" in text, text


def test_dry_run_times_the_rest_at_the_rate_a_finished_run_measured(tmp_path):
    """After one run of a sweep, the estimate uses that run's FLOPs per second, not the assumed rate."""
    path = tmp_path / "mqar.yaml"
    fixed = {"seq_len": 16, "n_pairs": 2, "batch_size": 4, "eval_examples": 8, "steps": 5}
    path.write_text(yaml.safe_dump(dict(name="m", study="mqar", sweep={"recipe": ["swa"], "seed": [0, 1]}, fixed=fixed)))
    assert "GFLOP/s (one CPU thread, assumed" in dry_run(path, tmp_path / "results")
    first = load_experiments(path)[0].model_copy(update={"sweep": {"recipe": ["swa"], "seed": [0]}})
    out = run_experiment(first, tmp_path / "results", progress=False)
    row = read_rows(out / "runs.jsonl")[0]
    run = expand(first)[0]
    rate = study_settings(run).estimated_flops(build_spec(run)) / row["train_seconds"]
    before = (out / "runs.jsonl").read_bytes()
    text = dry_run(path, tmp_path / "results")
    assert f"at {rate / 1e9:.1f} GFLOP/s, the median rate 1 finished run(s) measured" in text, text
    assert (out / "runs.jsonl").read_bytes() == before


def test_table_shows_a_reported_setting_once(tmp_path):
    rows = [{"run_key": str(i), "recipe": r, "settings.steps": 200, "steps": 200, "settings.lr": 0.1, "lr": 0.2,
             "settings.seq_len": s, "seq_len": s, "accuracy": a} for i, (r, s, a) in enumerate([("gdn", 16, 0.1), ("swa", 32, 0.2)])]
    table = to_markdown(rows, "t")
    assert "settings.steps" not in table and "steps=200" in table and "settings.seq_len" not in table
    assert "| recipe | seq_len | accuracy |" in table
    assert "settings.lr=0.1" in table and "lr=0.2" in table  # different values: both shown


def _captured_figure(monkeypatch, plot, rows, module):
    figures = []
    monkeypatch.setattr(module, "save_figure", lambda fig, path: figures.append(fig))
    plot(rows, Path("unused.png"))
    (fig,) = figures
    return fig


def test_efficiency_plot_has_a_title_units_log_axes_and_recipe_legend(monkeypatch):
    from mixerzoo.ablate import runner

    rows = [{"run_key": r, "study": "efficiency", "recipe": r, "size": "tiny", "context": c, "decode_latency_ms": ms}
            for r, scale in (("transformer", 1.0), ("gdn", 0.0)) for c, ms in ((1024, 3.0), (65536, 3.0 + 100 * scale))]
    ax = _captured_figure(monkeypatch, runner.default_plot, rows, runner).axes[0]
    assert "decode latency against context" in ax.get_title() and "study efficiency, 2 runs, size tiny" in ax.get_title()
    assert ax.get_yscale() == "log" and ax.get_xscale() == "log" and "(ms, log scale)" in ax.get_ylabel()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["transformer", "gdn"]


def test_recall_plots_draw_chance_and_fit_the_y_axis_to_the_points(monkeypatch):
    from mixerzoo.ablate import studies, visual_study

    rows = [{"run_key": r, "study": "mqar", "recipe": r, "size": "tiny", "seq_len": 64, "state_bytes": b, "accuracy": a}
            for r, b, a in (("transformer", 65608, 0.129), ("gdn", 38920, 0.004))]
    fig = _captured_figure(monkeypatch, studies.frontier_plot, rows, studies)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "chance (0.00781)" in labels and {"transformer", "gdn"} <= {label.split(" (")[0] for label in labels}
    assert ax.get_ylim()[1] < 0.2 and ax.get_xscale() == "log" and "recall against memory" in fig._suptitle.get_text()
    visual = [{"run_key": r, "study": "visual-recall", "recipe": r, "size": "tiny", "distance": d, "accuracy": a,
               "swa_window": 16} for r, d, a in (("swa", 4, 0.25), ("swa", 68, 0.09))]
    ax = _captured_figure(monkeypatch, visual_study.plot_accuracy_vs_distance, visual, visual_study).axes[0]
    assert "chance (0.1)" in [t.get_text() for t in ax.get_legend().get_texts()] and ax.get_ylim()[1] < 0.35
    assert "recall against distance" in ax.get_title() and "(tokens, log scale)" in ax.get_xlabel()


def test_a_frontier_of_many_families_keeps_its_legend_off_the_points_and_names_a_shared_width_once(monkeypatch):
    from mixerzoo.ablate import studies

    from mixerzoo.registry import list_recipes

    rows = [{"run_key": name, "study": "mqar", "recipe": name, "size": "tiny", "seq_len": 32, "d_model": 32,
             "state_bytes": 1000 + 100 * i, "accuracy": 0.05 * i} for i, name in enumerate(list_recipes()[:12])]
    ax = _captured_figure(monkeypatch, studies.frontier_plot, rows, studies).axes[0]
    anchor = ax.get_legend().get_bbox_to_anchor().transformed(ax.transAxes.inverted())
    assert anchor.x0 > 1.0  # the legend starts right of the panel
    assert "d_model 32" in ax.get_xlabel() and not [t for t in ax.texts if "d=" in t.get_text()]


HYBRID_YAML = """d_model: 64
vocab_size: 256
n_layers: 4
pattern: SGMG
legend:
  S: {type: attention, window: 8, n_heads: 4, head_dim: 16}
  G: {type: gated_deltanet, n_heads: 4, head_dim: 16}
  M: {type: mamba2, d_state: 16}
mlp: {type: swiglu, hidden: 128}
"""


def test_a_composed_layout_is_ablated_from_a_yaml_path_or_inline(tmp_path):
    """recipe: a registered name, a layout YAML (relative to the experiment file) or an inline layout;
    each run records its layout's name and hash, overrides apply, the dry run lists its cost."""
    from mixerzoo.blocks import LayoutSpec

    (tmp_path / "layouts").mkdir()
    (tmp_path / "layouts" / "sgmg.yaml").write_text(HYBRID_YAML)
    inline = {"name": "gg", **yaml.safe_load(HYBRID_YAML), "pattern": "GG", "n_layers": 2}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(dict(name="mine", study="mqar", fixed={
        "seq_len": 16, "n_pairs": 2, "batch_size": 4, "eval_examples": 8, "steps": 2},
        sweep={"recipe": ["gdn", "layouts/sgmg.yaml", inline], "n_layers": [2]})))
    experiment = load_experiments(path)[0]
    runs = expand(experiment)
    assert [r.recipe for r in runs] == ["gdn", "sgmg", "gg"] and runs[0].layout is None
    sgmg = LayoutSpec.from_yaml(HYBRID_YAML)
    assert runs[1].layout == sgmg.model_dump(mode="json") and runs[1].size == "custom"
    spec = build_spec(runs[1])  # n_layers 2 cuts SGMG to SG, as for a recipe
    assert [layer.mixer.type for layer in spec.layers] == ["attention", "gated_deltanet"]
    assert len({r.layout_hash() for r in runs}) == 3 and runs[1].layout_hash() != runs[2].layout_hash()
    text = dry_run(path, tmp_path / "results")
    assert f"| 2 | sgmg (layout {runs[1].layout_hash()}) n_layers=2 | to run |" in text, text
    out = run_experiment(experiment, tmp_path / "results", progress=False)
    rows = read_rows(out / "runs.jsonl")
    assert [(r["recipe"], r.get("layout_hash")) for r in rows] == [(r.recipe, r.layout_hash()) for r in runs]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)


@pytest.mark.parametrize("recipe, message", [
    ("missing.yaml", "layout file 'missing.yaml' not found"),
    ({"name": "bad", "d_model": 64, "vocab_size": 256, "n_layers": 2, "pattern": "G",
      "legend": {"G": {"type": "gated_deltanet", "n_head": 4}}}, r"layout 'bad'.*layer 0.*mixer: unknown key 'n_head' \(did you mean 'n_heads'\?\)"),
])
def test_a_bad_composed_layout_names_what_is_wrong(tmp_path, recipe, message):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(dict(name="x", study="test-counting", sweep={"recipe": [recipe]})))
    with pytest.raises(ValueError, match=message):
        load_experiments(path)


def test_a_composed_layout_takes_no_size():
    with pytest.raises(ValidationError, match="a composed layout has its own sizes"):
        _experiment(sweep={"recipe": [{"d_model": 64}], "size": ["small"]})


class _PrecisionSettings(StudySettings):
    pass


@register_study("test-precision", settings=_PrecisionSettings)
def _precision(run: RunConfig, scratch: Path) -> list[dict]:
    """Reports the autocast state the runner put the study in, and the device it was given."""
    import torch

    from mixerzoo.ablate.studies import run_device

    return [{"autocast": torch.is_autocast_enabled("cpu"), "autocast_dtype": str(torch.get_autocast_dtype("cpu")),
             "on": str(run_device(run))}]


def test_device_and_dtype_reach_every_run_and_every_row(tmp_path):
    """--dtype bfloat16 runs each study under bf16 autocast; device and dtype are recorded in every row
    (cpu / float32 when unset), and a sweep may vary them."""
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(dict(name="p", study="test-precision", sweep={"recipe": ["gdn"], "seed": [0, 1]})))
    out = tmp_path / "results"
    ablate(path, out, progress=False, dtype="bfloat16", device="cpu")
    rows = read_rows(out / "p" / "runs.jsonl")
    assert [(r["device"], r["dtype"], r["autocast"], r["autocast_dtype"], r["on"]) for r in rows] == \
        [("cpu", "bfloat16", True, "torch.bfloat16", "cpu")] * 2
    plain = ExperimentConfig(name="q", study="test-precision", sweep={"recipe": ["gdn"], "dtype": ["float32", "bfloat16"]})
    rows = read_rows(run_experiment(plain, out, progress=False) / "runs.jsonl")
    assert [(r["dtype"], r["autocast"]) for r in rows] == [("float32", False), ("bfloat16", True)]
    default = RunConfig(study="mqar", recipe="gdn")  # the defaults written out are the same run
    assert RunConfig(study="mqar", recipe="gdn", dtype="float32", device="cpu").key() == default.key()
    assert RunConfig(study="mqar", recipe="gdn", dtype="bfloat16").key() != default.key()


def test_a_run_on_a_device_this_machine_lacks_fails_clearly(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the missing-device error cannot be provoked")
    experiment = ExperimentConfig(name="c", study="test-precision", sweep={"recipe": ["gdn"]}, device="cuda")
    with pytest.raises(RuntimeError, match="asks for device 'cuda' but this machine has no CUDA device"):
        run_experiment(experiment, tmp_path, progress=False)


def test_workers_spread_over_the_gpus_in_turn():
    from mixerzoo.ablate.executors import gpu_slots

    assert gpu_slots(4, 2) == [0, 1, 0, 1] and gpu_slots(3, 4) == [0, 1, 2] and gpu_slots(2, 1) == [0, 0]


class _LRSettings(StudySettings):
    lr: float = 1e-3


@register_study("test-lr", settings=_LRSettings, score="accuracy")
def _lr_study(run: RunConfig, scratch: Path) -> list[dict]:
    """An accuracy that peaks at lr 1e-3 for gdn and at 1e-2 for swa (1e-1 for swa's seed 1)."""
    import math

    best = {"gdn": -3.0, "swa": -2.0 + run.seed}[run.recipe]  # swa's seed 1 peaks at lr 1e-1
    lr = _LRSettings.model_validate(run.settings).lr
    return [{"accuracy": 1.0 - abs(math.log10(lr) - best) / 10}]


def test_best_of_keeps_each_models_best_learning_rate_in_the_table(tmp_path):
    lrs = [1e-4, 1e-3, 1e-2]
    experiment = ExperimentConfig(name="lr", study="test-lr", best_of="lr",
                                  sweep={"recipe": ["gdn", "swa"], "settings.lr": lrs})
    out = run_experiment(experiment, tmp_path, progress=False)
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 6  # every run kept
    table = (out / "table.md").read_text()
    assert "each at its best settings.lr by accuracy" in table
    assert "| gdn | 0.001 |" in table and "| swa | 0.01 |" in table and "accuracy=1" in table, table
    assert table.count("| gdn |") == 1 and table.count("| swa |") == 1


def test_best_of_summarises_each_model_over_seeds_whichever_value_each_seed_chose(tmp_path):
    experiment = ExperimentConfig(name="lr-seeds", study="test-lr", best_of="lr",
                                  sweep={"recipe": ["swa"], "seed": [0, 1], "settings.lr": [1e-2, 1e-1]})
    out = run_experiment(experiment, tmp_path, progress=False)
    summary, runs = (out / "table.md").read_text().split("\n# ")
    assert summary.count("| swa |") == 1 and summary.rstrip().endswith("| 2 | 1 ± 0 |"), summary  # seeds, accuracy
    assert "settings.lr" not in summary.split("\n", 1)[1]  # the mean over seeds is not split by the chosen lr
    assert "| 0 | 0.01 |" in runs and "| 1 | 0.1 |" in runs, runs  # each seed's run keeps the lr it chose


def test_best_of_rejects_a_sweep_without_the_setting_or_a_score():
    lrs = [1e-4, 1e-3, 1e-2]
    with pytest.raises(ValidationError, match="best_of: settings.lr is not swept"):
        ExperimentConfig(name="lr", study="test-lr", best_of="lr", sweep={"recipe": ["gdn"]})
    with pytest.raises(ValidationError, match="best_of: study 'test-counting' has no score"):
        ExperimentConfig(name="lr", study="test-counting", best_of="lr", sweep={"recipe": ["gdn"], "settings.lr": lrs})


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_experiment_validates(path):
    """Each experiment file in experiments/ loads with every run validated (what --dry-run checks)."""
    experiments = load_experiments(path)
    assert experiments and all(expand(e) for e in experiments)
    if path.name == "zoology-fig2.yaml":
        runs = expand(experiments[0])
        assert len(runs) == 320 and experiments[0].best_of == "lr"
        assert {r.settings["lr"] for r in runs} == {1e-4, 4.6416e-4, 2.1544e-3, 1e-2}
    if path.name == "mqar-frontier.yaml":  # each recurrent model at its best of three lrs per width and seed
        runs = expand(experiments[0])
        assert experiments[0].best_of == "lr"
        lrs = {(r.recipe, r.d_model, r.seed): set() for r in runs}
        for r in runs:
            lrs[r.recipe, r.d_model, r.seed].add(r.settings["lr"])
        assert {key: sorted(v) for key, v in lrs.items() if key[0] in ("gdn", "mamba2", "infinitevl")} == {
            (recipe, d, s): [1e-3, 3e-3, 1e-2] for recipe in ("gdn", "mamba2", "infinitevl")
            for d in (32, 64, 128) for s in (0, 1, 2)}
