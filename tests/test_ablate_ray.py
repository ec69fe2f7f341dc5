"""`ablate --backend ray`: runs as Ray tasks on a local cluster (CPU), rows back to the driver, resumed
after an interruption. Skipped, with the reason printed, where the `ray` extra is not installed."""

from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]'); the ray backend is untested here")

from mixerzoo.ablate.runner import ExperimentConfig, read_rows, run_experiment  # noqa: E402

FIXED = dict(seq_len=16, n_pairs=2, steps=2, batch_size=4, eval_examples=8)


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 2 CPUs for the module (the executor uses it, as it would a running one)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_runs_execute_as_ray_tasks_and_a_sweep_resumes(cluster, tmp_path):
    first = ExperimentConfig(name="r", study="mqar", sweep={"recipe": ["gdn"], "n_layers": [1], "seed": [0]},
                             fixed=FIXED)
    out = run_experiment(first, tmp_path, progress=False, jobs=2, backend="ray")
    kept = read_rows(out / "runs.jsonl")
    assert [r["seed"] for r in kept] == [0]
    # as after an interruption: the folder holds one finished run; the sweep resumes with the others
    more = first.model_copy(update={"sweep": {"recipe": ["gdn", "swa"], "n_layers": [1], "seed": [0, 1]}})
    rows = read_rows(run_experiment(more, tmp_path, progress=False, jobs=2, backend="ray") / "runs.jsonl")
    assert sorted((r["recipe"], r["seed"]) for r in rows) == [("gdn", 0), ("gdn", 1), ("swa", 0), ("swa", 1)]
    assert [r for r in rows if (r["recipe"], r["seed"]) == ("gdn", 0)] == kept, "the finished run was not redone"
    assert all(0 <= r["accuracy"] <= 1 for r in rows)
    assert not list((Path(out) / ".claims").iterdir()) and not list(Path(out).glob(".scratch-*"))
