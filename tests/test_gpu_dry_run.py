"""The GPU check prepared on CPU: the benchmark's dry run, the script's syntax, the CUDA tests' code on
CPU backends, and the benchmark's summary of the paper's claims."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path):
    """A fresh copy of the module at `path` (under its own name, apart from pytest's import of it)."""
    spec = importlib.util.spec_from_file_location(f"dry_run_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_gpu_check_script_parses_and_names_its_steps():
    """gpu_check.sh is valid bash, runs every step and refuses an unknown step name (its --dry-run collects
    the CUDA tests and runs the benchmark's dry run below, as a developer runs it by hand)."""
    script = ROOT / "experiments" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    for step in ("step pytest", "step graph", "step bench", "--dry-run", "zoology-row.yaml", "--sections train"):
        assert step in text
    unknown = subprocess.run(["bash", str(script), "--dry-run", "no-such-step"], capture_output=True, text=True)
    assert unknown.returncode == 2 and "unknown step 'no-such-step'" in unknown.stderr


def test_gpu_bench_dry_run_builds_and_runs_every_section(tmp_path, capsys):
    bench = _load(ROOT / "experiments" / "gpu_bench.py")
    bench.main(["--dry-run", "--out", str(tmp_path)])
    assert "DRY RUN" in capsys.readouterr().out
    sections = json.loads((tmp_path / "bench.json").read_text())["sections"]
    assert set(sections) == {"graph", "decode", "stream", "prefill", "ops", "train"}
    trained = {row["model"] for row in sections["train"] if row["implementation"] == "mixerzoo"}
    assert trained == {f"{name} {size}" for name in ("transformer", "swa", "gdn", "mamba2", "infinitevl")
                       for size in ("mqar", "tiny")}
    assert all(row["tokens_per_s"] > 0 for row in sections["train"])
    assert all(row["tokens_equal"] for row in sections["graph"])
    decode = {(row["recipe"], row["mode"]) for row in sections["decode"]}
    assert decode == {(name, mode) for name in ("infinitevl", "transformer") for mode in ("eager", "graph")}
    graphs = [row for row in sections["decode"] if row["mode"] == "graph"]
    assert all(row["gb_per_s"] > 0 and row["read_gb"] > 0 for row in graphs)  # bandwidth of every graph step
    assert all(row["tokens_per_frame"] == 64 for row in sections["stream"])
    rows = [row for rows in sections.values() for row in rows]
    assert not [row for row in rows if "status" in row], "a dry-run case failed"
    assert "## claims" in (tmp_path / "bench.md").read_text()


@pytest.fixture
def cuda_tests(monkeypatch):
    """tests/test_cuda_backends.py with its device set to CPU."""
    module = _load(ROOT / "tests" / "test_cuda_backends.py")
    monkeypatch.setattr(module, "DEVICE", "cpu")
    return module


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_backend_tests_pass_on_cpu_with_the_torch_backend(cuda_tests, dtype):
    """The comparisons and tolerances of the CUDA tests, run on CPU where only "torch" applies (FlexAttention
    has no CPU backward, fla no CPU kernels)."""
    for length in (1, 100):
        cuda_tests.test_gated_delta_rule("torch", dtype, length)
        cuda_tests.test_ssd("torch", dtype, length)
    for case in cuda_tests.ATTENTION_CASES:
        cuda_tests.test_attention("torch", dtype, case)
    cuda_tests.test_bidirectional_attention("torch", dtype)
    for form in cuda_tests.ZOO_FORMS:
        cuda_tests.test_zoo_ops("torch", dtype, form)


def test_cuda_kit_configs_build_with_the_op_tests_head_layout(cuda_tests):
    """The kit's CUDA configs are valid and share the op tests' head layout (one fla compile per dtype)."""
    from mixerzoo.registry import build_mixer

    gdn = build_mixer(cuda_tests.KIT_CONFIGS["gated_deltanet"][0]).config
    shape = cuda_tests.GDN_SHAPE
    assert (gdn.n_heads, gdn.value_heads, gdn.key_dim, gdn.value_dim) == (
        shape["heads"], shape["value_heads"], shape["dim_k"], shape["dim_v"])
    mamba = build_mixer(cuda_tests.KIT_CONFIGS["mamba2"][0]).config
    shape = cuda_tests.SSD_SHAPE
    assert (mamba.n_heads, mamba.head_dim, mamba.n_groups, mamba.d_state) == (
        shape["heads"], shape["dim_p"], shape["groups"], shape["dim_n"])
    for name in ("attention", "sliding_window"):
        build_mixer(cuda_tests.KIT_CONFIGS[name][0])


def test_the_check_catches_a_wrong_backend(cuda_tests, monkeypatch):
    """A backend whose outputs are off by a few percent fails the bfloat16 tolerance."""
    ops = sys.modules["mixerzoo.ops.gated_delta_rule"]
    chunked = ops._chunked
    monkeypatch.setattr(ops, "_chunked", lambda *args: (lambda o, s: (o * 1.05, s))(*chunked(*args)))
    with pytest.raises(AssertionError, match="relative RMSE"):
        cuda_tests.test_gated_delta_rule("torch", torch.bfloat16, 100)


def test_claims_compare_the_paper_goals():
    bench = _load(ROOT / "experiments" / "gpu_bench.py")

    def row(recipe, mode, context, ms):
        return dict(recipe=recipe, mode=mode, context=context, ms_per_token=ms)

    sections = {
        "decode": [row("infinitevl", "graph", 4096, 2.0), row("infinitevl", "graph", 51200, 2.0),
                   row("infinitevl", "graph", 307200, 2.2), row("transformer", "graph", 51200, 8.0),
                   row("infinitevl", "eager", 51200, 40.0), row("transformer", "eager", 51200, 80.0),
                   dict(recipe="transformer", mode="graph", context=307200, status="oom")],
        "stream": [dict(tokens_per_frame=256, fps=40.0, model_fps=55.0)],
        "train": [dict(model="gdn small", implementation="mixerzoo", tokens_per_s=3.0e5),
                  dict(model="gdn small", implementation="fla", tokens_per_s=2.0e5),
                  dict(model="swa small", implementation="mixerzoo", tokens_per_s=4.0e5)],
    }
    text = "\n".join(bench.claims(sections))
    # like for like: graph against graph (4.00x, holds), eager against eager (2.00x, does not hold)
    assert "decode at 50K: infinitevl 4.00x faster than the SDPA transformer, both graph (paper: >= 3.6x): holds" in text
    assert "decode at 50K: infinitevl 2.00x faster than the SDPA transformer, both eager (paper: >= 3.6x): " \
           "does not hold" in text
    assert "decode at 300K: the transformer ran out of memory" in text
    assert "latency 300K / 4K: 1.10x" in text
    assert "at most 2.20 ms/token over every context (target on an H200: <= 2.5): met" in text
    assert "40.0 FPS end to end, 55.0 FPS without CPU preprocessing" in text
    assert "training gdn small: mixerzoo 1.50x the tokens/s of fla's GatedDeltaNetForCausalLM" in text
    assert "training swa small" not in text  # no fla peer, no claim


def test_failure_log_records_each_failure_as_it_happens(tmp_path):
    """With MIXERZOO_FAILURE_LOG set, the suite's conftest appends every failing test's report to the
    file (the GPU run's pytest step can be cut off before pytest prints its summary)."""
    (tmp_path / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    (tmp_path / "test_planted.py").write_text(
        "def test_passes():\n    assert True\n\n"
        "def test_fails():\n    assert 1 + 1 == 3, 'planted failure'\n"
    )
    log = tmp_path / "failures.log"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                            env={**os.environ, "MIXERZOO_FAILURE_LOG": str(log)},
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    text = log.read_text()
    assert "test_planted.py::test_fails (call)" in text and "planted failure" in text
    assert "test_passes" not in text


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_fla_peer_has_our_shape_and_parameter_count(size):
    """The GPU training comparison's fla model is ours in fla's layers: every parameter tensor's count matches."""
    if importlib.util.find_spec("fla") is None:
        print("skipped: fla (flash-linear-attention) is not installed")
        pytest.skip("fla (flash-linear-attention) is not installed")
    from mixerzoo.blocks import Decoder
    from mixerzoo.registry import recipe

    bench = _load(ROOT / "experiments" / "gpu_bench.py")
    spec = recipe("gdn", size)
    theirs = bench.fla_gated_deltanet(spec)
    ours = Decoder(spec)
    assert sorted(p.numel() for p in theirs.parameters()) == sorted(p.numel() for p in ours.parameters())
    with pytest.raises(ValueError, match="gated_deltanet mixer"):
        bench.fla_gated_deltanet(recipe("infinitevl", size))
