"""Seeds folded into mean and spread: the table and plot a reader compares recipes by.

Rows of runs that differ only in `seed` form one group: every column that is not a float
measured by the study (run fields, `settings.*`, and the study's non-float columns such as
seq_len or state bytes) must agree within a group and identifies it. Each float measurement
becomes its mean over the group, with the sample standard deviation (`<column>_std`) and the
number of seeds (`seeds`).
"""

from __future__ import annotations

import statistics
from typing import Any

Row = dict[str, Any]
_NOT_MEASURED = ("run_key", "seed")
_OUTCOMES = ("train_seconds", "threads", "steps")  # what a run reports about itself, not its identity


def _is_measurement(column: str, rows: list[Row]) -> bool:
    if column.startswith("settings.") or column in _NOT_MEASURED:
        return False
    values = [r.get(column) for r in rows if r.get(column) is not None]
    return bool(values) and all(isinstance(v, float) for v in values)


def _row_index(rows: list[Row]) -> list[int]:
    """Each row's index among the rows of its run (a run may return several rows)."""
    seen: dict[Any, int] = {}
    index = []
    for row in rows:
        index.append(seen.get(row.get("run_key"), 0))
        seen[row.get("run_key")] = index[-1] + 1
    return index


def best_over(rows: list[Row], column: str, score: str) -> list[Row]:
    """The rows of the best run (highest mean `score` over its rows) of each group of runs that differ
    only in `column` (e.g. settings.lr), in first-seen order: each model at its best value, as
    Zoology reports a learning-rate sweep."""
    runs: dict[Any, list[Row]] = {}
    for row in rows:
        runs.setdefault(row.get("run_key"), []).append(row)
    identity = [c for c in dict.fromkeys(c for row in rows for c in row)
                if c not in (column, "run_key") and not _is_measurement(c, rows) and c not in _OUTCOMES]
    groups: dict[tuple, list[list[Row]]] = {}
    for members in runs.values():
        groups.setdefault(tuple(repr(members[0].get(c)) for c in identity), []).append(members)

    def mean_score(members: list[Row]) -> float:
        values = [float(m[score]) for m in members if m.get(score) is not None]
        return sum(values) / len(values) if values else float("-inf")

    return [row for candidates in groups.values() for row in max(candidates, key=mean_score)]


def over_seeds(rows: list[Row]) -> list[Row]:
    """One row per group of runs that differ only in seed (in first-seen order): the group's
    identifying columns, `seeds`, and per float measurement its mean and `<column>_std`
    (0.0 for a single seed)."""
    columns = list(dict.fromkeys(c for row in rows for c in row))
    measured = [c for c in columns if _is_measurement(c, rows)]
    keys = [c for c in columns if c not in measured and c not in _NOT_MEASURED]
    groups: dict[tuple, list[Row]] = {}
    for row, index in zip(rows, _row_index(rows)):
        groups.setdefault((index, *(repr(row.get(c)) for c in keys)), []).append(row)
    summary = []
    for members in groups.values():
        out: Row = {c: members[0].get(c) for c in keys}
        out["seeds"] = len(members)
        for column in measured:
            values = [float(m[column]) for m in members if m.get(column) is not None]
            out[column] = statistics.fmean(values) if values else None
            out[f"{column}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary.append(out)
    return summary


def with_spread(summary: list[Row]) -> list[Row]:
    """Summary rows for display: each measured column as "mean ± std" text, its `_std` column folded in."""
    shown = []
    for row in summary:
        out: Row = {}
        for column, value in row.items():
            if column.endswith("_std") and column[: -len("_std")] in row:
                continue
            std = row.get(f"{column}_std")
            out[column] = f"{value:.3g} ± {std:.2g}" if isinstance(value, float) and isinstance(std, float) else value
        shown.append(out)
    return shown


__all__ = ["over_seeds", "with_spread"]
