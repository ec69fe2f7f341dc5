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
