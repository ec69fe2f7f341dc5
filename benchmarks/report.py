"""docs/PERFORMANCE.md's tables from pytest-benchmark JSON files, one file per round of the suite.

    python benchmarks/report.py round1.json round2.json [--out results/bench/report.md]

By default the tables use test_interleaved (contenders in turn, round after round; --separate for
test_case's contender-at-a-time runs). Peer table: per group, each contender's median ms (first
round; --stat min for the fastest call) and mixerzoo's time ratio to
each peer in every round (< 1.00x: mixerzoo is faster). Decode-vs-context table: each recipe's
median ms at the short and the long context, the long / short ratio, and infinitevl's speedup
over the transformer at the long context, per round.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.cases import (  # noqa: E402
    CONTEXT_GROUP, CONTEXTS, FLOOR, GROUPS, MIXERZOO, PEERS, RECIPES_VS_CONTEXT, context_label,
)
from mixerzoo.mixers.base import atomic_write_bytes  # noqa: E402


def seconds(path: Path, stat: str = "median", interleaved: bool = True) -> dict[tuple[str, str], float]:
    """(row, contender) -> seconds from one JSON file: the interleaved runs' median or min (default),
    or with interleaved=False the separate runs' pytest-benchmark statistic `stat`."""
    data = json.loads(path.read_text())
    if interleaved:
        return {(b["extra_info"]["row"], c): s for b in data["benchmarks"] if "row" in b["extra_info"]
                for c, s in b["extra_info"][stat].items()}
    return {(b["group"], b["extra_info"]["contender"]): b["stats"][stat] for b in data["benchmarks"]
            if "contender" in b["extra_info"]}


def peer_table(rounds: list[dict[tuple[str, str], float]]) -> str:
    """Markdown: group | ms per contender (round 1) | mixerzoo / peer per round."""
    columns = (*PEERS, FLOOR)
    peers = [p for p in columns if p != MIXERZOO]
    lines = ["| row | " + " | ".join(f"{c} ms" for c in columns) + " | " +
             " | ".join(f"mixerzoo / {p}" for p in peers) + " |",
             "|---|" + "---:|" * (len(columns) + len(peers))]
    for group in GROUPS:
        first = rounds[0]
        if (group.name, MIXERZOO) not in first:
            continue
        times = [f"{first[group.name, c] * 1e3:.3f}" if (group.name, c) in first else "-" for c in columns]
        ratios = []
        for peer in peers:
            cells = [f"{r[group.name, MIXERZOO] / r[group.name, peer]:.2f}x" for r in rounds if (group.name, peer) in r]
            ratios.append(" / ".join(cells) if cells else "-")
        lines.append(f"| {group.name} | " + " | ".join(times) + " | " + " | ".join(ratios) + " |")
    return "\n".join(lines)


def context_table(rounds: list[dict[tuple[str, str], float]]) -> str:
    """Markdown: recipe | short ms | long ms | long / short, per round; plus infinitevl's speedup."""
    name = CONTEXT_GROUP.name
    short, long = (context_label(CONTEXTS["full"][role]) for role in ("short", "long"))
    lines = [f"| recipe | ms @ {short} | ms @ {long} | {long} / {short} (per round) |", "|---|---:|---:|---:|"]
    for recipe in RECIPES_VS_CONTEXT:
        keys = [(name, f"{recipe} @ short"), (name, f"{recipe} @ long")]
        if any(k not in rounds[0] for k in keys):
            continue
        ratio = " / ".join(f"{r[keys[1]] / r[keys[0]]:.2f}x" for r in rounds if all(k in r for k in keys))
        lines.append(f"| {recipe} | {rounds[0][keys[0]] * 1e3:.3f} | {rounds[0][keys[1]] * 1e3:.3f} | {ratio} |")
    pair = [(name, "transformer @ long"), (name, "infinitevl @ long")]
    speedups = [f"{r[pair[0]] / r[pair[1]]:.2f}x" for r in rounds if all(k in r for k in pair)]
    if speedups:
        lines += ["", f"infinitevl speedup over transformer at {long}: " + " / ".join(speedups) + " (per round)"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rounds", type=Path, nargs="+", help="pytest-benchmark JSON files, one per round")
    parser.add_argument("--stat", default="median", choices=["median", "min"],
                        help="which per-contender statistic the tables use (min: least touched by other jobs)")
    parser.add_argument("--separate", action="store_true",
                        help="use test_case's contender-at-a-time runs instead of the interleaved ones")
    parser.add_argument("--out", type=Path, help="also write the tables to this markdown file")
    args = parser.parse_args()
    rounds = [seconds(path, args.stat, interleaved=not args.separate) for path in args.rounds]
    text = f"{peer_table(rounds)}\n\n{context_table(rounds)}\n"
    print(text, end="")
    if args.out:
        atomic_write_bytes(args.out, text.encode())


if __name__ == "__main__":
    main()
