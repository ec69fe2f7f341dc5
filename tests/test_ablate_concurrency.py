"""Sweeps that share a results folder, and interrupted sweeps: processes divide the runs, no row is
lost or written twice, Ctrl-C / SIGTERM stop the workers at once and leave no claims or scratch."""

import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

STUDY = '''
import os, time
from pathlib import Path
from mixerzoo.ablate.studies import StudySettings, register_study

class SleepSettings(StudySettings):
    seconds: float = 0.5
    first_seconds: float | None = None

@register_study("test-sleep", settings=SleepSettings)
def sleep_study(run, scratch):
    """Sleeps, then reports which process ran it; leaves its pid where the test can see it."""
    settings = SleepSettings.model_validate(run.settings)
    (Path(scratch).parent / f"pid-{os.getpid()}").write_text(str(os.getpid()))
    seconds = settings.first_seconds if run.seed == 0 and settings.first_seconds is not None else settings.seconds
    time.sleep(seconds)
    return [{"pid": os.getpid(), "slept": seconds}]
'''


@pytest.fixture()
def sweep(tmp_path):
    """An environment whose Python registers the test-sleep study (sitecustomize), and a writer of
    experiment files."""
    (tmp_path / "sleep_study.py").write_text(STUDY)
    (tmp_path / "sitecustomize.py").write_text("import sleep_study\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO), os.environ.get("PYTHONPATH", "")])}

    def write(runs: int, **fixed) -> Path:
        path = tmp_path / "exp.yaml"
        path.write_text(yaml.safe_dump({"name": "shared", "study": "test-sleep",
                                        "sweep": {"recipe": ["gdn"], "seed": list(range(runs))}, "fixed": fixed}))
        return path

    return env, write, tmp_path


def _ablate(env, path, out, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mixerzoo", "ablate", str(path), "--out", str(out), *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "shared" / "runs.jsonl").read_text().splitlines() if line.strip()]


def test_two_processes_on_one_sweep_divide_the_runs_and_keep_every_row(sweep):
    env, write, tmp = sweep
    path, out = write(8, seconds=0.6), tmp / "results"
    first = _ablate(env, path, out)
    time.sleep(2.0)  # the first has started (imports take about a second), then the second joins
    second = _ablate(env, path, out)
    for process in (first, second):
        _, err = process.communicate(timeout=240)
        assert process.returncode == 0, err[-2000:]
    rows = _rows(out)
    keys = [row["run_key"] for row in rows]
    assert len(keys) == 8 and len(set(keys)) == 8, f"every run exactly once, got {keys}"
    assert len({row["pid"] for row in rows}) == 2, "both processes ran some of the runs"
    assert not list((out / "shared" / ".claims").iterdir()) and not list((out / "shared").glob(".scratch-*"))
    table = (out / "shared" / "table.md").read_text()  # the last to finish wrote every run's row
    assert len(re.findall(r"^\| \d \| \d+ \|$", table, re.M)) == 8, table


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_an_interrupted_sweep_stops_its_workers_at_once_and_keeps_finished_rows(sweep, signum, status):
    env, write, tmp = sweep
    path, out = write(6, seconds=60.0, first_seconds=0.1), tmp / "results"
    parent = _ablate(env, path, out, "--jobs", "2")
    folder = out / "shared"
    deadline = time.time() + 120
    while time.time() < deadline:  # run 0 finished and two long runs are under way
        if (folder / "runs.jsonl").exists() and len(list(folder.glob(".scratch-*"))) == 2:
            break
        time.sleep(0.2)
    else:
        parent.kill()
        pytest.fail(f"the sweep never had two runs under way: {parent.communicate()}")
    workers = {int(p.read_text()) for p in folder.glob("pid-*")}
    signalled = time.time()
    parent.send_signal(signum)
    _, err = parent.communicate(timeout=60)
    assert time.time() - signalled < 15, "the sweep took too long to stop"
    assert parent.returncode == status, err[-2000:]
    assert "finished results are kept" in err
    time.sleep(1.5)
    alive = [pid for pid in workers if _alive(pid)]
    assert not alive, f"workers outlived the sweep: {alive}"
    assert [row["seed"] for row in _rows(out)] == [0], "run 0's row is kept and no stopped run wrote one"
    assert not list((folder / ".claims").iterdir()), "the stopped runs' claims are released"
    assert not list(folder.glob(".scratch-*")), "the stopped runs' scratch directories are removed"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def test_a_dead_claimants_run_is_reclaimed(sweep):
    env, write, tmp = sweep
    path, out = write(2, seconds=0.1), tmp / "results"
    claims = out / "shared" / ".claims"
    claims.mkdir(parents=True)
    from mixerzoo.ablate.studies import RunConfig

    run = RunConfig(study="test-sleep", recipe="gdn", seed=0, settings={"seconds": 0.1, "scale": 1.0})  # as expanded
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    (claims / run.key()).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    process = _ablate(env, path, out)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-2000:]
    assert sorted(row["seed"] for row in _rows(out)) == [0, 1]
