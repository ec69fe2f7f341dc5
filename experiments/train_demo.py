"""End-to-end distillation on CPU, two pipelines of experiments/train/*.yaml:

* `visual` (default): a tiny full-attention VLM teacher trained on visual recall, converted to
  InfiniteVL's layout (SWA + Gated DeltaNet) and trained by the four stages (teacher.yaml,
  distill-layers, distill-logits, sft, long-sft); test accuracy on held-out examples.
* `text`: a tiny byte-level transformer teacher trained on the Python standard library's source,
  converted and trained by the three stages on a small fraction of its tokens (text-*.yaml);
  validation loss (nats per byte) overall and by position, on windows of held-out files.

Both compare the student with the teacher and with the same layout trained from scratch on the
same data for as many steps as the student's stages together; the text pipeline also trains that
layout from scratch on the teacher's whole budget (once), what the hybrid reaches without a teacher.

    python experiments/train_demo.py --threads 1 --seeds 0 1 2                   # writes results/train-demo/
    python experiments/train_demo.py --pipeline text --threads 2 --seeds 0 1 2   # results/train-text/
    python experiments/train_demo.py --scale 0.1                                 # a quick pass

Each seed runs every stage again (its own weights, training examples and data order; the test
examples are the same for all); the text pipeline trains one teacher (the first seed's) and
distils it with every seed. Writes summary.json (every seed's rows, the command, the commit and
the digest of the code that trained them), summary.md (mean ± std over seeds per run) and
losses.png (one curve per run, the first seed) under --out, and each stage's metrics.jsonl /
model.safetensors under --out/seed_<s>/<run>/. docs/TRAINING.md publishes summary.md from
docs/results/train-<pipeline>.json, a copy of summary.json; a test checks the two agree and that
the code has not changed since (the digest covers CODE and the pipeline's YAMLs).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from mixerzoo.ablate.studies import save_figure
from mixerzoo.mixers.base import atomic_path, atomic_write_bytes
from mixerzoo.tasks.text import position_losses, stdlib_corpus, text_windows
from mixerzoo.train import TrainConfig, build_model, load_model, train
from mixerzoo.train.data import visual_recall_dataset
from mixerzoo.train.evaluate import token_accuracy
from mixerzoo.vlm import vlm_recipe

TEST_SEED = 1_000_003  # held-out examples: generated from a seed no training run uses
CONFIGS = Path(__file__).parent / "train"
DEFAULT_ROOT = "results/train"  # where the YAMLs put their outputs; the demo moves them under --out
ROOT = Path(__file__).resolve().parents[1]
CODE = ("experiments/train_demo.py", "mixerzoo/train/*.py", "mixerzoo/tasks/loop.py", "mixerzoo/tasks/visual.py",
        "mixerzoo/tasks/text.py", "mixerzoo/vlm/*.py", "mixerzoo/blocks/*.py", "mixerzoo/mixers/*.py",
        "mixerzoo/ops/*.py")  # what trains and scores the demos, with each pipeline's YAMLs
TEXT_BUCKETS = ((0, 16), (16, 32), (32, 64), (64, 128))  # validation positions: inside, then past the 16-token window


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """One distillation demo: its YAMLs (the teacher first), whether every seed shares the first seed's
    teacher, whether the student's layout is also trained from scratch on the teacher's whole budget
    (first seed), and how a trained model is scored (metric name -> (column label, digits))."""

    stages: tuple[str, ...]
    shared_teacher: bool
    full_scratch: bool
    metrics: dict[str, tuple[str, int]]
    scorer: Callable[[argparse.Namespace, TrainConfig], Callable[[torch.nn.Module], dict[str, float]]]


def visual_scorer(args: argparse.Namespace, teacher: TrainConfig) -> Callable[[torch.nn.Module], dict[str, float]]:
    """Test accuracy on held-out visual-recall examples."""
    processor = vlm_recipe(teacher.student.recipe, teacher.student.size).processor
    test = visual_recall_dataset(teacher.data.task, args.test_examples, TEST_SEED, processor, vocab_size=256)
    return lambda model: {"accuracy": token_accuracy(model, test)}


def text_scorer(args: argparse.Namespace, teacher: TrainConfig) -> Callable[[torch.nn.Module], dict[str, float]]:
    """Validation loss (nats per byte) on windows of the held-out files, overall and per TEXT_BUCKETS span."""
    inputs, labels = text_windows(stdlib_corpus("validation"), args.test_examples, teacher.data.task["seq_len"], TEST_SEED)

    def score(model: torch.nn.Module) -> dict[str, float]:
        with torch.no_grad():
            per_position = position_losses(model, inputs, labels)  # [T]
        return {"val_loss": float(per_position.mean()),
                **{f"loss_{a}_{b}": float(per_position[a:b].mean()) for a, b in TEXT_BUCKETS if b <= len(per_position)}}

    return score


PIPELINES = {
    "visual": Pipeline(("teacher", "distill-layers", "distill-logits", "sft", "long-sft"), shared_teacher=False,
                       full_scratch=False, metrics={"accuracy": ("test accuracy", 3)}, scorer=visual_scorer),
    "text": Pipeline(("text-teacher", "text-distill-layers", "text-distill-logits", "text-sft"), shared_teacher=True,
                     full_scratch=True, metrics={"val_loss": ("val loss", 3), **{f"loss_{a}_{b}": (f"pos {a}-{b - 1}", 3) for a, b in TEXT_BUCKETS}},
                     scorer=text_scorer),
}


def code_digest(pipeline: str) -> str:
    """sha256 over the files that decide a pipeline's figures (CODE and its YAMLs, in path order): a
    change to any of them means its published table must be measured again."""
    yamls = [f"experiments/train/{name}.yaml" for name in PIPELINES[pipeline].stages]
    digest = hashlib.sha256()
    for path in sorted(f for pattern in (*CODE, *yamls) for f in ROOT.glob(pattern)):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _relocate(value, out: Path, teacher_out: Path, teacher: str):
    """`value` with every path under DEFAULT_ROOT moved under `out`, the teacher's under `teacher_out`
    (recursively in dicts)."""
    if isinstance(value, dict):
        return {k: _relocate(v, out, teacher_out, teacher) for k, v in value.items()}
    if isinstance(value, str) and value.startswith(DEFAULT_ROOT + "/"):
        rest = value[len(DEFAULT_ROOT) + 1:]
        return str((teacher_out if rest.split("/")[0] == teacher else out) / rest)
    return value


def stage_configs(out: Path, scale: float, examples: int | None = None, seed: int = 0, *,
                  pipeline: Pipeline = PIPELINES["visual"], teacher_out: Path | None = None) -> dict[str, TrainConfig]:
    """The runs, in order: the pipeline's YAMLs (teacher, then the student's stages) with outputs under
    `out` (the teacher's under `teacher_out`, default `out`), steps x `scale` (and `examples` training
    examples, if given), and the scratch baseline: the student's recipe trained from random weights on
    the same data for as many steps as all student stages together. `seed` seeds every run's weights,
    examples and data order."""
    configs = {}
    for name in pipeline.stages:
        data = _relocate(yaml.safe_load((CONFIGS / f"{name}.yaml").read_text()), out, teacher_out or out, pipeline.stages[0])
        data["steps"] = max(1, round(data["steps"] * scale))
        data["seed"] = data["data"]["seed"] = data["student"]["seed"] = seed
        if examples is not None:
            data["data"]["n_examples"] = examples
        configs[name] = TrainConfig.model_validate(data)
    teacher = configs[pipeline.stages[0]]
    student_steps = sum(configs[name].steps for name in pipeline.stages[1:])
    student = teacher.student.model_copy(update={"recipe": configs[pipeline.stages[1]].student.recipe})
    configs["scratch"] = teacher.model_copy(update={
        "out_dir": out / "scratch", "steps": student_steps, "data": configs[pipeline.stages[1]].data, "student": student})
    if pipeline.full_scratch:
        configs["scratch, teacher's tokens"] = teacher.model_copy(update={"out_dir": out / "scratch-full", "student": student})
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


def _tokens(config: TrainConfig) -> int:
    """Training tokens a run reads: steps x examples per step x tokens per example (text windows; 0 if unknown)."""
    return config.steps * config.micro_batch_size * config.grad_accum * int(config.data.task.get("seq_len", 0))


def run_seed(args: argparse.Namespace, pipeline: Pipeline, seed: int, score) -> list[dict]:
    """Every run of the pipeline with `seed`, in order: one row each (the scores, tokens, final loss,
    seconds); with a shared teacher, only the first seed trains it."""
    first = seed == args.seeds[0]
    teacher_out = args.out / "teacher" if pipeline.shared_teacher else None
    configs = stage_configs(args.out / f"seed_{seed}", args.scale, args.examples, seed, pipeline=pipeline,
                            teacher_out=teacher_out)
    teacher_name = pipeline.stages[0]
    rows = []
    for name, config in configs.items():
        if not first and ((name == teacher_name and pipeline.shared_teacher) or name == "scratch, teacher's tokens"):
            continue  # trained once, with the first seed
        if name == pipeline.stages[1]:  # the converted student before any training, for reference
            converted = build_model(config.student, load_model(configs[teacher_name].out_dir / "model.safetensors"))
            rows.append({"run": "converted, untrained", "seed": seed, "stage": "-", "steps": 0, "trains": "-",
                         "tokens": 0, **score(converted), "final_loss": None, "seconds": 0.0})
            print(rows[-1], flush=True)
        began = time.perf_counter()
        summary = train(config)
        rows.append({"run": name, "seed": seed, "stage": config.stage, "steps": config.steps,
                     "trains": ",".join(config.train_groups), "tokens": _tokens(config),
                     **score(load_model(config.out_dir / "model.safetensors")),
                     "final_loss": summary["losses"][-1], "seconds": time.perf_counter() - began})
        print(rows[-1], flush=True)
    return rows


def _spread(values: list[float], digits: int) -> str:
    """'mean ± std' of `values` (the std over seeds; none for one seed)."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def render_table(result: dict) -> str:
    """The summary table of a demo result: per run, its seeds, tokens, mean ± std over seeds of each
    score and of the final loss, and the mean seconds."""
    metrics = PIPELINES[result.get("pipeline", "visual")].metrics
    runs: dict[str, list[dict]] = {}
    for row in result["rows"]:
        runs.setdefault(row["run"], []).append(row)
    lines = ["| run | stage | seeds | steps | tokens | trains | " + " | ".join(label for label, _ in metrics.values())
             + " | final loss | seconds |",
             "|---|---|---:|---:|---:|---|" + "---:|" * len(metrics) + "---:|---:|"]
    for name, rows in runs.items():
        first, losses = rows[0], [r["final_loss"] for r in rows if r["final_loss"] is not None]
        scores = " | ".join(_spread([r[key] for r in rows], digits) for key, (_, digits) in metrics.items())
        lines.append(f"| {name} | {first['stage']} | {len(rows)} | {first['steps']} | {first.get('tokens', 0):,} | "
                     f"{first['trains']} | {scores} | {_spread(losses, 4) if losses else '-'} | "
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
    parser.add_argument("--pipeline", choices=sorted(PIPELINES), default="visual")
    parser.add_argument("--out", type=Path, help="default results/train-demo (visual), results/train-text (text)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every run's steps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="each seed runs every stage again")
    parser.add_argument("--test-examples", type=int, default=512, help="held-out examples (text: windows)")
    parser.add_argument("--examples", type=int, help="training examples per run (default: each YAML's n_examples)")
    args = parser.parse_args(argv)
    args.out = args.out or Path("results/train-demo" if args.pipeline == "visual" else "results/train-text")
    torch.set_num_threads(args.threads)
    pipeline = PIPELINES[args.pipeline]
    score = pipeline.scorer(args, stage_configs(args.out, args.scale, pipeline=pipeline)[pipeline.stages[0]])

    began = time.perf_counter()
    rows = [row for seed in args.seeds for row in run_seed(args, pipeline, seed, score)]
    result = {"pipeline": args.pipeline, "scale": args.scale, "test_examples": args.test_examples, "seeds": args.seeds,
              "threads": args.threads, "torch": torch.__version__, "wall_seconds": time.perf_counter() - began,
              "command": " ".join(["python", "experiments/train_demo.py", *(argv if argv is not None else sys.argv[1:])]),
              "commit": _commit(), "code_digest": code_digest(args.pipeline), "rows": rows}
    table = render_table(result)
    atomic_write_bytes(args.out / "summary.json", json.dumps(result, indent=1).encode())
    atomic_write_bytes(args.out / "summary.md", table.encode())
    first = args.out / f"seed_{args.seeds[0]}"
    names = [config.out_dir.name for name, config in stage_configs(first, args.scale, pipeline=pipeline).items()
             if not (pipeline.shared_teacher and name == pipeline.stages[0])]
    plot_losses(first, names, args.out / "losses.png")
    print(table)
    return result


if __name__ == "__main__":
    main()
