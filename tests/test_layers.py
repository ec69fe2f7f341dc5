"""The package's layers (docs/ARCHITECTURE.md) hold: no module imports a layer above its own, lazily or not."""

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mixerzoo"
# Rank of each layer; a module may import its own layer and those below it.
RANKS = {"errors": 0, "optim": 0, "ops": 1, "mixers": 2, "blocks": 3, "registry": 4, "testing": 5, "vlm": 5,
         "tasks": 6, "train": 7, "ablate": 7, "cli": 8, "reference": 8, "__init__": 8, "__main__": 8}
IMPORT = re.compile(r"^\s*(?:from|import)\s+mixerzoo\.(\w+)|^\s*from\s+mixerzoo\s+import\s+(\w+)", re.MULTILINE)


def _layer(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def test_no_import_runs_up_the_layers():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        layer = _layer(path)
        if path.relative_to(PACKAGE).parts == (path.name,) and layer not in RANKS:
            raise AssertionError(f"{path.name}: a top-level module with no layer in RANKS")
        for dotted, named in IMPORT.findall(path.read_text()):
            imported = dotted or named
            if RANKS[imported] > RANKS[layer]:
                upward.append(f"{path.relative_to(PACKAGE)} imports mixerzoo.{imported}")
    assert not upward, "imports that run up the layers:\n" + "\n".join(upward)
