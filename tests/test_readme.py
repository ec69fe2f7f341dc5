"""The documentation's code runs as written: README.md and every page under docs/. Each page's
```python blocks are executed, in order, in one namespace per page, in a temporary working
directory (doctest style).

Markers, an HTML comment on the line before a fenced block:

    <!-- readme-test: file NAME -->      the block's text is written to NAME before the page's
                                         Python blocks run (e.g. the hybrid YAML that a snippet reads)
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

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").rglob("*.md"))]
BLOCK = re.compile(r"(?:<!-- readme-test: (?P<marker>[^>]*?) -->\n)?```(?P<lang>\w*)\n(?P<code>.*?)```", re.S)
LINK = re.compile(r"\[[^\]]*\]\((?P<target>[^)#\s]+)(?:#[^)]*)?\)")


def blocks(page: Path = README) -> list[tuple[int, str, str, str]]:
    """(line, marker, language, code) of every fenced block of `page`."""
    text = page.read_text()
    return [(text[:m.start()].count("\n") + 1, m["marker"] or "", m["lang"], m["code"]) for m in BLOCK.finditer(text)]


def _name(page: Path) -> str:
    return str(page.relative_to(REPO))


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_markers_are_known_and_skips_give_a_reason(page):
    for line, marker, _, _ in blocks(page):
        assert marker == "" or re.fullmatch(r"file [\w.-]+|skip \(.+\)", marker), f"{_name(page)}:{line}: {marker!r}"


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_every_relative_link_points_at_a_file(page):
    """Pages moved into docs/ keep their figures and cross-links."""
    text = BLOCK.sub("", page.read_text())
    for match in LINK.finditer(text):
        target = match["target"]
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (page.parent / target).exists(), f"{_name(page)}: broken link {target!r}"


def _run_page(page: Path, tmp_path: Path) -> dict:
    """Run the page's Python blocks in order in one namespace (files written first); the namespace."""
    for _, marker, _, code in blocks(page):
        if marker.startswith("file "):
            (tmp_path / marker.removeprefix("file ")).write_text(code)
    namespace: dict = {}
    torch.manual_seed(0)
    np.random.seed(0)
    for line, marker, lang, code in blocks(page):
        if lang != "python" or marker.startswith("skip"):
            continue
        try:
            # dont_inherit: a block runs as a user's script, without this file's `from __future__ import annotations`
            exec(compile(code, f"{_name(page)}:{line}", "exec", dont_inherit=True), namespace)
        except Exception as error:
            pytest.fail(f"the {_name(page)} block at line {line} failed: {type(error).__name__}: {error}")
    return namespace


@pytest.mark.parametrize("page", PAGES[1:], ids=_name)
def test_docs_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _run_page(page, tmp_path)


def test_readme_python_blocks_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    python = [b for b in blocks() if b[2] == "python" and not b[1].startswith("skip")]
    assert len(python) >= 3, "README.md should hold the protocol, hybrid and VLM snippets"
    namespace = _run_page(README, tmp_path)
    assert namespace["tokens"].shape[0] == 2 and len(namespace["answer"]) <= 4
    nbytes, predicted = capsys.readouterr().out.split()[-2:]
    assert nbytes == predicted  # the protocol snippet's last line: measured == predicted
