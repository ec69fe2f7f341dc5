"""The benchmark suite's cases run once each on tiny shapes, agreement checks included (no timing)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, where benchmarks/ lives
from benchmarks.cases import CONTEXT_GROUP, GROUPS, peer_missing  # noqa: E402


@pytest.mark.parametrize("group", GROUPS + (CONTEXT_GROUP,), ids=lambda g: g.name)
def test_each_case_runs_and_agrees_on_tiny_shapes(group):
    fns, check = group.setup("tiny")
    check()
    for contender in group.contenders:
        if peer_missing(contender):
            print(f"{group.name}: {peer_missing(contender)}; not run")
            continue
        out = fns[contender]()
        tensors = out if isinstance(out, tuple) else (out,)
        assert all(torch.isfinite(t).all() for t in tensors if isinstance(t, torch.Tensor)), contender
