"""The `mixerzoo` command: recipes table and the state-protocol demo."""

from mixerzoo.cli import main
from mixerzoo.registry import list_recipes


def test_recipes_lists_every_recipe_with_costs(capsys):
    main(["recipes", "--size", "tiny"])
    out = capsys.readouterr().out
    for name in list_recipes():
        assert f"| {name} |" in out
    assert "state @1M" in out and "GFLOP/token @128K" in out


def test_demo_reports_matching_state_bytes_and_exact_round_trip(capsys):
    main(["demo", "--context", "300", "--window", "32", "--d-model", "32"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| full") or line.startswith("| sliding")]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == cells[2], row  # state bytes == config prediction
        assert cells[3] == "True" and cells[4] == "True", row  # fork == replay, bit-exact save/load


def test_stream_command_reports_constant_state_for_a_video_file(tmp_path, capsys):
    import numpy as np
    import pytest

    av = pytest.importorskip("av", reason="PyAV (the video extra) is not installed")
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for i in range(10):
            frame = np.full((64, 96, 3), 25 * i, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    main(["stream", str(path), "--recipe", "infinitevl", "--size", "tiny", "--frame-size", "56", "--fps", "10"])
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| infinitevl/tiny")][0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert int(cells[1]) >= 8 and cells[2] == "4"  # frames streamed; (56 / 28)^2 tokens per frame
    assert cells[6] == cells[7], "infinitevl's state must not grow"
