"""The example plugin package (examples/mixerzoo-ema) installs, registers its mixer through its entry
point, is certified from a plain script, and shows up in specs and in `mixerzoo mixers`."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "mixerzoo-ema"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """The environment of a Python that has the example package installed (into a private target)."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(EXAMPLE)], check=True, capture_output=True, timeout=300)
    assert any(p.name.startswith("mixerzoo_ema-") and p.suffix == ".dist-info" for p in target.iterdir())
    path = os.pathsep.join([str(target), str(REPO), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def test_the_example_plugin_is_certified_from_a_plain_script(installed):
    """No pytest, no hypothesis profile: certify runs under its own settings (no deadline) and passes."""
    done = subprocess.run([sys.executable, str(EXAMPLE / "certify_ema.py")], capture_output=True, text=True,
                          env={**installed, "HYPOTHESIS_PROFILE": ""}, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ema certified; an ES hybrid runs: logits [2, 10, 64]" in done.stdout


def test_the_mixers_command_documents_the_installed_plugin(installed):
    done = subprocess.run([sys.executable, "-m", "mixerzoo", "mixers"], capture_output=True, text=True,
                          env=installed, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "### type: ema" in done.stdout
    assert "| `init_decay` | float | `0.9` | every channel's decay a at initialisation |" in done.stdout


def test_certify_catches_a_broken_plugin(installed):
    """The same call fails on a mixer that breaks an invariant (an EMA whose pads decay the state)."""
    script = """
import torch, mixerzoo_ema
from mixerzoo.registry import register_mixer
from mixerzoo.testing import certify

class PadsDecay(mixerzoo_ema.EMAMixer):
    def _forward(self, x, state, positions, valid):
        return super()._forward(x, state, positions, torch.ones_like(valid))

class PadsDecayConfig(mixerzoo_ema.EMAConfig):
    type: str = "ema-pads-decay"

PadsDecay.config_class = PadsDecayConfig
register_mixer(PadsDecay)
try:
    certify({"type": "ema-pads-decay", "d_model": 8}, checks=("padding_invariance",))
except AssertionError as error:
    print("caught:", str(error).splitlines()[0])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=installed, cwd=REPO,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "caught: padding invariance" in done.stdout, done.stdout
