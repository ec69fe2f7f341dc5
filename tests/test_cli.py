"""The `mixerzoo` command: recipes table, the state-protocol demo, streaming, one-line user errors, threads."""

import os
import subprocess
import sys
import unittest.mock
from pathlib import Path

import pytest

from mixerzoo import cli
from mixerzoo.blocks import parameter_count
from mixerzoo.cli import build_parser, default_threads, main
from mixerzoo.registry import list_recipes, recipe
from mixerzoo.train.config import STAGES


def test_recipes_lists_every_recipe_with_costs(capsys):
    main(["recipes", "--size", "tiny"])
    out = capsys.readouterr().out
    for name in list_recipes():
        assert f"| {name} |" in out
    assert "state @1M" in out and "FLOPs/token @128K" in out and "0.0 MiB" not in out


def test_demo_reports_matching_state_bytes_and_exact_round_trip(capsys):
    main(["demo", "--context", "300", "--window", "32", "--d-model", "32"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| full") or line.startswith("| sliding")]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == cells[2], row  # state bytes == config prediction
        assert cells[3] == "True" and cells[4] == "True", row  # fork == replay, bit-exact save/load


def _clip(path: Path) -> Path:
    """A 1 s, 10 fps, 96 x 64 video file."""
    import numpy as np

    av = pytest.importorskip("av", reason="PyAV (the video extra) is not installed")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for i in range(10):
            frame = np.full((64, 96, 3), 25 * i, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_stream_command_reports_constant_state_for_a_video_file(tmp_path, capsys):
    path = _clip(tmp_path / "clip.mp4")
    main(["stream", str(path), "--recipe", "infinitevl", "--size", "tiny", "--frame-size", "56", "--fps", "10"])
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| infinitevl/tiny")][0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    # frames streamed; a 64 x 96 frame fitted (aspect kept) into 56 x 56 = 3,136 pixels is 28 x 56: 1 x 2 tokens
    assert int(cells[1]) >= 8 and cells[2] == "2"
    assert cells[6] == cells[7], "infinitevl's state must not grow"
    assert float(cells[8]) > 0 and cells[9] == "1"  # peak resident MiB; one thread for a tiny model by default


def test_stream_command_compiles_every_frame_into_one_graph(tmp_path, capsys):
    """--compile: all frames through one captured program (aot_eager here: the capture is what is tested;
    inductor's C++ build takes minutes on a CPU), reporting what the eager stream reports."""
    import functools

    import torch._dynamo

    path = _clip(tmp_path / "clip.mp4")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    generate_module = sys.modules["mixerzoo.blocks.generate"]
    with unittest.mock.patch.object(generate_module.torch, "compile", functools.partial(torch.compile, backend="aot_eager")):
        main(["stream", str(path), "--size", "tiny", "--frame-size", "56", "--fps", "10", "--compile"])
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| infinitevl/tiny")][0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert int(cells[1]) >= 8 and cells[2] == "2" and cells[6] == cells[7]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


# ---------------------------------------------------------------- user errors: one line, non-zero exit

REPO = Path(__file__).resolve().parents[1]


def _mixerzoo(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "mixerzoo", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)


@pytest.mark.parametrize("args, files, message", [
    (["ablate", "bad.yaml"], {"bad.yaml": "name: x\nstudy: mqar\nsweep: {recipe: [gdn]\n"},
     "bad.yaml: not valid YAML at line 4, column 1: expected ',' or '}'"),
    (["ablate", "x.yaml"], {"x.yaml": "name: x\nstudy: mqar\nsweep: {recipe: [gnd]}\nfixed: {seq_len: 16, n_pairs: 2}\n"},
     "x.yaml: sweep.recipe: unknown recipe 'gnd' (did you mean 'gdn'?); registered: ["),
    (["demo", "--threads", "100000"], {}, "--threads: must be at most"),
    (["sft", "missing.yaml"], {}, "missing.yaml: no such file"),
    (["sft", "broken.yaml"], {"broken.yaml": "out_dir: out\nstudent: {checkpoint: broken.safetensors}\n"
                                             "data: {source: mqar, task: {seq_len: 16, n_pairs: 2}}\nsteps: 1\n",
                              "broken.safetensors": "\xff" * 64},
     "broken.safetensors: not a readable safetensors file (damaged or truncated?)"),
    (["demo", "--context", "-5"], {}, "demo: argument --context: must be a positive integer, got -5"),
])
def test_user_errors_print_one_line_and_exit_non_zero(tmp_path, args, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="latin-1")
    result = _mixerzoo(*args, cwd=tmp_path)
    assert result.returncode in (1, 2), result
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("mixerzoo: error: ") and message in result.stderr, result.stderr


def test_distill_layers_without_a_teacher_says_which_command_to_run_first(tmp_path):
    result = _mixerzoo("distill-layers", str(REPO / "experiments/train/distill-layers.yaml"), cwd=tmp_path)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert (f"run `mixerzoo sft {REPO / 'experiments/train/teacher.yaml'}` first" in result.stderr
            and "results/train/teacher/model.safetensors: teacher.checkpoint does not exist" in result.stderr), result.stderr


def test_debug_shows_the_error_itself(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        main(["ablate", str(tmp_path / "missing.yaml"), "--debug"])
    with pytest.raises(SystemExit, match="^mixerzoo: error: .*missing.yaml: no such file$"):
        main(["ablate", str(tmp_path / "missing.yaml")])


def test_every_command_takes_threads_and_reports_them(capsys):
    parser = build_parser()
    cpus = os.cpu_count()
    for command in ("demo", "recipes", "mixers", "stream", "ablate", *STAGES):
        extra = {"stream": ["v.mp4"], "ablate": ["x.yaml"]}.get(command, ["c.yaml"] if command in STAGES else [])
        assert parser.parse_args([command, *extra, "--threads", str(cpus)]).threads == cpus
        assert parser.parse_args([command, *extra]).threads is None  # resolved per model size
    assert default_threads(parameter_count(recipe("infinitevl", "small"))) == 1
    assert default_threads(parameter_count(recipe("infinitevl", "paper"))) == cli._TORCH_DEFAULT_THREADS
    main(["demo", "--context", "40", "--window", "8", "--d-model", "16", "--threads", "1"])
    assert "1 thread(s)" in capsys.readouterr().out
