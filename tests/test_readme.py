"""README.md's code runs as written: every ```python block is executed, in order, in one namespace,
in a temporary working directory (doctest style).

Markers, an HTML comment on the line before a fenced block:

    <!-- readme-test: file NAME -->      the block's text is written to NAME before the Python
                                         blocks run (e.g. the hybrid YAML that a snippet reads)
    <!-- readme-test: skip (REASON) -->  the block is not run; the reason says why (e.g. it needs
                                         a downloaded 3B checkpoint)

Shell blocks (```bash) are commands, not snippets, and are not run here.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"(?:<!-- readme-test: (?P<marker>[^>]*?) -->\n)?```(?P<lang>\w*)\n(?P<code>.*?)```", re.S)


def blocks() -> list[tuple[int, str, str, str]]:
    """(line, marker, language, code) of every fenced block of README.md."""
    text = README.read_text()
    return [(text[:m.start()].count("\n") + 1, m["marker"] or "", m["lang"], m["code"]) for m in BLOCK.finditer(text)]


def test_markers_are_known_and_skips_give_a_reason():
    for line, marker, _, _ in blocks():
        assert marker == "" or re.fullmatch(r"file [\w.-]+|skip \(.+\)", marker), f"README.md:{line}: {marker!r}"


def test_readme_python_blocks_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for _, marker, _, code in blocks():
        if marker.startswith("file "):
            (tmp_path / marker.removeprefix("file ")).write_text(code)
    python = [(line, code) for line, marker, lang, code in blocks() if lang == "python" and not marker.startswith("skip")]
    assert len(python) >= 3, "README.md should hold the protocol, hybrid and VLM snippets"
    namespace: dict = {}
    torch.manual_seed(0)
    np.random.seed(0)
    for line, code in python:
        try:
            exec(compile(code, f"README.md:{line}", "exec"), namespace)
        except Exception as error:
            pytest.fail(f"the README.md block at line {line} failed: {type(error).__name__}: {error}")
    assert namespace["tokens"].shape[0] == 2 and len(namespace["answer"]) <= 4
    nbytes, predicted = capsys.readouterr().out.split()[-2:]
    assert nbytes == predicted  # the protocol snippet's last line: measured == predicted
