"""End-to-end distillation demo on CPU: train a tiny full-attention VLM teacher on visual recall,
convert it to InfiniteVL's layout (SWA + Gated DeltaNet), run the training stages, and compare the
student's accuracy with the teacher's and with the same student trained from scratch for the
same number of steps.

    python experiments/train_demo.py --threads 1 --seeds 0 1 2   # writes results/train-demo/
    python experiments/train_demo.py --scale 0.1                  # a quick pass through the pipeline

Each seed runs every stage again (its own weights, training examples and data order; the test
examples are the same for all). Writes summary.json (every seed's rows, the command, the commit and
the digest of the code that trained them), summary.md (mean +- std over seeds per run) and
losses.png (one curve per run, the first seed) under --out, and each stage's metrics.jsonl /
model.safetensors under --out/seed_<s>/<run>/. docs/TRAINING.md publishes summary.md from
docs/results/train-demo.json, a copy of summary.json; a test checks the two agree and that the
training code has not changed since (CODE: the digest covers those files).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from mixerzoo.ablate.studies import save_figure
from mixerzoo.mixers.base import atomic_path, atomic_write_bytes
from mixerzoo.train import TrainConfig, build_model, load_model, train
from mixerzoo.train.data import visual_recall_dataset
from mixerzoo.train.evaluate import token_accuracy
from mixerzoo.vlm import vlm_recipe

TEST_SEED = 1_000_003  # held-out examples: generated from a seed no training run uses
CONFIGS = Path(__file__).parent / "train"
STAGES = ["teacher", "distill-layers", "distill-logits", "sft", "long-sft"]
DEFAULT_ROOT = "results/train"  # where the YAMLs put their outputs; the demo moves them under --out
ROOT = Path(__file__).resolve().parents[1]
CODE = ("experiments/train_demo.py", "experiments/train/*.yaml", "mixerzoo/train/*.py", "mixerzoo/tasks/visual.py",
        "mixerzoo/vlm/*.py", "mixerzoo/blocks/*.py", "mixerzoo/mixers/*.py", "mixerzoo/ops/*.py")  # what trains the demo


def code_digest() -> str:
    """sha256 over the files that decide the demo's figures (CODE, in path order): a change to any of
    them means the published table must be measured again."""
    digest = hashlib.sha256()
    for path in sorted(f for pattern in CODE for f in ROOT.glob(pattern)):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _relocate(value, out: Path):
    """`value` with every path under DEFAULT_ROOT moved under `out` (recursively in dicts)."""
    if isinstance(value, dict):
        return {k: _relocate(v, out) for k, v in value.items()}
    if isinstance(value, str) and value.startswith(DEFAULT_ROOT + "/"):
        return str(out / value[len(DEFAULT_ROOT) + 1:])
    return value


def stage_configs(out: Path, scale: float, examples: int | None = None, seed: int = 0) -> dict[str, TrainConfig]:
    """The runs, in order: experiments/train/*.yaml (teacher, then the student's stages) with outputs
    under `out`, steps x `scale` (and `examples` training examples, if given), and the scratch
    baseline: the student's recipe trained from random weights on the same data for as many steps
    as all student stages together. `seed` seeds every run's weights, examples and data order."""
    configs = {}
    for name in STAGES:
        data = _relocate(yaml.safe_load((CONFIGS / f"{name}.yaml").read_text()), out)
        data["steps"] = max(1, round(data["steps"] * scale))
        data["seed"] = data["data"]["seed"] = data["student"]["seed"] = seed
        if examples is not None:
            data["data"]["n_examples"] = examples
        configs[name] = TrainConfig.model_validate(data)
    teacher = configs["teacher"]
    student_steps = sum(configs[name].steps for name in STAGES[1:])
    configs["scratch"] = teacher.model_copy(update={
        "out_dir": out / "scratch", "steps": student_steps,
        "student": teacher.student.model_copy(update={"recipe": configs["distill-layers"].student.recipe})})
    return configs


def plot_losses(out: Path, names: list[str], path: Path) -> None:
    """One panel per run: loss per step (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3), squeeze=False)
    for ax, name in zip(axes[0], names):
        rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        for key in sorted(k for k in rows[0] if k.startswith("loss_")):
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=key[5:])
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    with atomic_path(path) as tmp:
        save_figure(fig, tmp)


def run_seed(out: Path, args: argparse.Namespace, seed: int, test) -> list[dict]:
    """Every run of the demo with `seed`, in order: one row each (test accuracy, final loss, seconds)."""
    configs = stage_configs(out, args.scale, args.examples, seed)
    rows = []
    for name, config in configs.items():
        began = time.perf_counter()
        summary = train(config)
        rows.append({"run": name, "seed": seed, "stage": config.stage, "steps": config.steps,
                     "trains": ",".join(config.train_groups),
                     "accuracy": token_accuracy(load_model(config.out_dir / "model.safetensors"), test),
                     "final_loss": summary["losses"][-1], "seconds": time.perf_counter() - began})
        print(rows[-1], flush=True)
        if name == "teacher":  # the converted student before any training, for reference
            converted = build_model(configs["distill-layers"].student, load_model(config.out_dir / "model.safetensors"))
            rows.append({"run": "converted, untrained", "seed": seed, "stage": "-", "steps": 0, "trains": "-",
                         "accuracy": token_accuracy(converted, test), "final_loss": None, "seconds": 0.0})
            print(rows[-1], flush=True)
    return rows


def _spread(values: list[float], digits: int) -> str:
    """'mean +- std' of `values` (the std over seeds; none for one seed)."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def render_table(result: dict) -> str:
    """The summary table of a demo result: per run, mean ± std over its seeds of the test accuracy and
    final loss, and the mean seconds."""
    runs: dict[str, list[dict]] = {}
    for row in result["rows"]:
        runs.setdefault(row["run"], []).append(row)
    lines = ["| run | stage | steps | trains | test accuracy | final loss | seconds |",
             "|---|---|---:|---|---:|---:|---:|"]
    for name, rows in runs.items():
        first, losses = rows[0], [r["final_loss"] for r in rows if r["final_loss"] is not None]
        lines.append(f"| {name} | {first['stage']} | {first['steps']} | {first['trains']} | "
                     f"{_spread([r['accuracy'] for r in rows], 3)} | {_spread(losses, 4) if losses else '-'} | "
                     f"{statistics.mean(r['seconds'] for r in rows):.0f} |")
    return "\n".join(lines) + "\n"


def _commit() -> str | None:
    """The checkout's commit, with '+changes' when files differ from it (None outside git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if dirty else "")


def main(argv: list[str] | None = None) -> dict:
    """Run the demo; returns the summary it writes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/train-demo"))
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every run's steps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="each seed runs every stage again")
    parser.add_argument("--test-examples", type=int, default=512)
    parser.add_argument("--examples", type=int, help="training examples per run (default: each YAML's n_examples)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    teacher = stage_configs(args.out, args.scale)["teacher"]
    processor = vlm_recipe(teacher.student.recipe, teacher.student.size).processor
    test = visual_recall_dataset(teacher.data.task, args.test_examples, TEST_SEED, processor, vocab_size=256)

    began = time.perf_counter()
    rows = [row for seed in args.seeds for row in run_seed(args.out / f"seed_{seed}", args, seed, test)]
    result = {"task": teacher.data.task, "scale": args.scale, "test_examples": args.test_examples, "seeds": args.seeds,
              "threads": args.threads, "torch": torch.__version__, "wall_seconds": time.perf_counter() - began,
              "command": " ".join(["python", "experiments/train_demo.py", *(argv if argv is not None else sys.argv[1:])]),
              "commit": _commit(), "code_digest": code_digest(), "rows": rows}
    table = render_table(result)
    atomic_write_bytes(args.out / "summary.json", json.dumps(result, indent=1).encode())
    atomic_write_bytes(args.out / "summary.md", table.encode())
    first = args.out / f"seed_{args.seeds[0]}"
    plot_losses(first, list(stage_configs(first, args.scale)), args.out / "losses.png")
    print(table)
    return result


if __name__ == "__main__":
    main()
