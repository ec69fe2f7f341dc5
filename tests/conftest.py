"""Shared test setup: hypothesis profiles, float64 determinism, the `cuda` marker's skip, and scripts run under
Triton's CPU interpreter."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# "ci": derandomized and bounded, so a red CI reproduces exactly; "dev": more examples.
settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=12,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    max_examples=40,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

import torch

# The suite runs thousands of tiny ops; one intra-op thread avoids OpenMP spin contention
# on small machines (a 2-thread pool made a 1.4 ms decode step take 30 ms under load).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` skip, with the reason printed (-ra), where no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device: marked `cuda` (run `pytest -m cuda` on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_logreport(report):
    """With MIXERZOO_FAILURE_LOG set, append each failure's report to that file as it happens, so a run
    cut off by a time limit (the one GPU run) still shows why its tests failed."""
    path = os.environ.get("MIXERZOO_FAILURE_LOG")
    if path and report.failed:
        with open(path, "a") as log:
            log.write(f"===== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")


# Prepended to every interpreted script: the interpreter cannot benchmark, so every autotuned kernel takes its
# first config.
_INTERPRETER_PRELUDE = """from triton.runtime.autotuner import Autotuner
_prune = Autotuner.prune_configs
Autotuner.prune_configs = lambda self, kwargs: _prune(self, kwargs)[:1]
"""


@pytest.fixture
def triton_interpreter():
    """A runner of Python scripts in a fresh process under Triton's CPU interpreter (TRITON_INTERPRET=1, one
    thread, this checkout on the path): it asserts the script exited 0 with "ok" as its last output and
    returns the CompletedProcess. Skips where Triton is not installed (the oracle extra)."""
    pytest.importorskip("triton", reason="triton is not installed (the oracle extra)")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "OMP_NUM_THREADS": "1"}

    def run(script: str) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-c", _INTERPRETER_PRELUDE + script], env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
        return done

    return run
