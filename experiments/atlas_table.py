"""The atlas's table (docs/studies/atlas.md) from an ablation's runs.jsonl: one row per mixer, each seed at its
best learning rate (Zoology's rule), mean ± std over seeds, the seeds' values and chosen lrs, state bytes and
parameters; rows ordered by mean accuracy.

    python experiments/atlas_table.py docs/results/atlas/atlas-mqar.jsonl docs/results/atlas/atlas-mqar-conv.jsonl
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
from pathlib import Path


def model_name(row: dict, widths: set) -> str:
    """The row's mixer, with its width when the rows hold several."""
    return row["recipe"] if len(widths) < 2 else f"{row['recipe']} (d_model {row['d_model']})"


def best_per_seed(rows: list[dict]) -> dict[str, dict[int, dict]]:
    """model (recipe, and width when several) -> seed -> the row of that seed's best accuracy over its lrs."""
    widths = {row.get("d_model") for row in rows}
    best: dict[str, dict[int, dict]] = collections.defaultdict(dict)
    for row in rows:
        kept = best[model_name(row, widths)].get(row["seed"])
        if kept is None or row["accuracy"] > kept["accuracy"]:
            best[model_name(row, widths)][row["seed"]] = row
    return best


def table(rows: list[dict]) -> str:
    """Markdown: mixer | accuracy mean ± std | per seed | lr per seed | lrs tried | state bytes | parameters."""
    widths = {row.get("d_model") for row in rows}
    tried = collections.defaultdict(set)
    for row in rows:
        tried[model_name(row, widths)].add(row["settings.lr"])
    lines = ["| mixer | accuracy (mean ± std) | seeds | best lr per seed | lrs tried | state bytes | parameters |",
             "|---|---:|---|---|---|---:|---:|"]
    best = best_per_seed(rows)
    order = sorted(best, key=lambda name: -statistics.mean(r["accuracy"] for r in best[name].values()))
    for name in order:
        seeds = [best[name][seed] for seed in sorted(best[name])]
        accuracy = [r["accuracy"] for r in seeds]
        spread = statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0
        lrs = " / ".join(f"{r['settings.lr']:.0e}" for r in seeds)
        lines.append(f"| {name} | {statistics.mean(accuracy):.3f} ± {spread:.3f} | "
                     f"{' / '.join(f'{a:.3f}' for a in accuracy)} | {lrs} | "
                     f"{', '.join(f'{lr:.0e}' for lr in sorted(tried[name]))} | {seeds[0]['state_bytes']:,} | "
                     f"{seeds[0]['parameters']:,} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="runs.jsonl files of atlas experiments")
    args = parser.parse_args()
    for path in args.runs:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        name = path.parent.name if path.name == "runs.jsonl" else path.stem  # results/<name>/runs.jsonl or a copy
        print(f"## {name} ({len(rows)} runs)\n\n{table(rows)}")


if __name__ == "__main__":
    main()
