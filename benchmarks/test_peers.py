"""Every group of cases.py as pytest-benchmark tests, contenders of a group back to back.

    pytest benchmarks/ --benchmark-only --benchmark-json=results/bench.json
    python benchmarks/report.py results/bench.json [more.json ...]     # docs/PERFORMANCE.md's ratio tables

Each group is set up once (its agreement check runs before any timing). `test_case` times each
contender alone (the group's fixed number of calls, benchmark.pedantic, so advancing decode states
end at the same context); `test_interleaved` times one call of every contender per round, round
after round, so load from other jobs falls on all of them alike, and stores each contender's
median and min in extra_info (what report.py reads by default). A contender whose package is not
installed is skipped with the reason printed.
"""

from __future__ import annotations

import os
import platform
import statistics
import time

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
    """One contender of one group: group = the docs/PERFORMANCE.md row, name = the contender."""
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


@pytest.mark.parametrize("group", [pytest.param(g, id=g.name) for g in GROUPS + (CONTEXT_GROUP,)])
def test_interleaved(benchmark, group: Group):
    """Every installed contender of `group`, one call each per round (the round is what pytest-benchmark times)."""
    fns = {}
    for contender, fn in _setup(group).items():
        reason = peer_missing(contender)
        if reason:
            print(f"{group.name}: {reason}; left out")
        else:
            fns[contender] = fn
    times: dict[str, list[float]] = {c: [] for c in fns}

    def one_round() -> None:
        for contender, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[contender].append(time.perf_counter() - start)

    benchmark.group = f"{group.name} (interleaved)"
    benchmark.pedantic(one_round, rounds=group.rounds, warmup_rounds=group.warmup, iterations=1)
    timed = {c: t[group.warmup:] for c, t in times.items()}  # the warm-up rounds are recorded too
    benchmark.extra_info.update(
        row=group.name, scale=SCALE, torch=torch.__version__, machine=platform.machine(),
        threads=torch.get_num_threads(), rounds=group.rounds,
        median={c: statistics.median(t) for c, t in timed.items()}, min={c: min(t) for c, t in timed.items()},
    )
