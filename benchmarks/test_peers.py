"""Every group of cases.py as pytest-benchmark tests, contenders of a group back to back.

    pytest benchmarks/ --benchmark-only --benchmark-json=results/bench.json
    python benchmarks/report.py results/bench.json [more.json ...]     # the README's ratio tables

Each group is set up once (its agreement check runs before any timing); each contender gets
the group's fixed number of timed calls (benchmark.pedantic), so advancing decode states end
at the same context. A contender whose package is not installed is skipped with the reason.
"""

from __future__ import annotations

import os
import platform

import pytest
import torch

from benchmarks.cases import CONTEXT_GROUP, CONTEXTS, GROUPS, Group, peer_missing

SCALE = os.environ.get("MIXERZOO_BENCH_SCALE", "full")  # "tiny": every case in seconds, to try the pipeline
_SETUPS: dict[str, tuple[dict, object]] = {}


def _setup(group: Group):
    """The group's contenders, built and checked once (only the latest group is kept in memory)."""
    if group.name not in _SETUPS:
        _SETUPS.clear()
        torch.set_num_threads(1)
        fns, check = group.setup(SCALE)
        check()
        _SETUPS[group.name] = (fns, check)
    return _SETUPS[group.name][0]


def _cases(groups: tuple[Group, ...]):
    return [pytest.param(g, c, id=f"{g.name} | {c}") for g in groups for c in g.contenders]


@pytest.mark.parametrize("group, contender", _cases(GROUPS + (CONTEXT_GROUP,)))
def test_case(benchmark, group: Group, contender: str):
    """One contender of one group: group = the README row, name = the contender."""
    reason = peer_missing(contender)
    if reason:
        print(f"skipped: {reason}")
        pytest.skip(reason)
    fn = _setup(group)[contender]
    benchmark.group = group.name
    benchmark.extra_info.update(contender=contender, scale=SCALE, torch=torch.__version__,
                                machine=platform.machine(), threads=torch.get_num_threads())
    if group is CONTEXT_GROUP:
        benchmark.extra_info["context"] = CONTEXTS[SCALE][contender.split(" @ ")[1]]
    benchmark.pedantic(fn, rounds=group.rounds, warmup_rounds=group.warmup, iterations=1)
