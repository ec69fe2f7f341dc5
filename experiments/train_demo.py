"""End-to-end distillation demo on CPU: train a tiny full-attention VLM teacher on visual recall,
convert it to InfiniteVL's layout (SWA + Gated DeltaNet), run the training stages, and compare the
student's accuracy with the teacher's and with the same student trained from scratch for the
same number of steps.

    python experiments/train_demo.py                  # writes results/train-demo/
    python experiments/train_demo.py --scale 0.1      # a quick pass through the pipeline

Writes summary.json, summary.md (the table) and losses.png (one curve per run) under --out, and
each stage's metrics.jsonl / model.safetensors under --out/<run>/.
"""

from __future__ import annotations

import argparse
import json
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


def _relocate(value, out: Path):
    """`value` with every path under DEFAULT_ROOT moved under `out` (recursively in dicts)."""
    if isinstance(value, dict):
        return {k: _relocate(v, out) for k, v in value.items()}
    if isinstance(value, str) and value.startswith(DEFAULT_ROOT + "/"):
        return str(out / value[len(DEFAULT_ROOT) + 1:])
    return value


def stage_configs(out: Path, scale: float, examples: int | None = None) -> dict[str, TrainConfig]:
    """The runs, in order: experiments/train/*.yaml (teacher, then the student's stages) with outputs
    under `out`, steps x `scale` (and `examples` training examples, if given), and the scratch
    baseline: the student's recipe trained from random weights on the same data for as many steps
    as all student stages together."""
    configs = {}
    for name in STAGES:
        data = _relocate(yaml.safe_load((CONFIGS / f"{name}.yaml").read_text()), out)
        data["steps"] = max(1, round(data["steps"] * scale))
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


def main(argv: list[str] | None = None) -> dict:
    """Run the demo; returns the summary it writes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/train-demo"))
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every run's steps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--test-examples", type=int, default=512)
    parser.add_argument("--examples", type=int, help="training examples per run (default: each YAML's n_examples)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    configs = stage_configs(args.out, args.scale, args.examples)
    teacher = configs["teacher"]
    processor = vlm_recipe(teacher.student.recipe, teacher.student.size).processor
    test = visual_recall_dataset(teacher.data.task, args.test_examples, TEST_SEED, processor, vocab_size=256)

    rows = []
    for name, config in configs.items():
        began = time.perf_counter()
        summary = train(config)
        rows.append({"run": name, "stage": config.stage, "steps": config.steps, "trains": ",".join(config.train_groups),
                     "accuracy": token_accuracy(load_model(config.out_dir / "model.safetensors"), test),
                     "final_loss": summary["losses"][-1], "seconds": time.perf_counter() - began})
        print(rows[-1], flush=True)
        if name == "teacher":  # the converted student before any training, for reference
            converted = build_model(configs["distill-layers"].student, load_model(config.out_dir / "model.safetensors"))
            rows.append({"run": "converted, untrained", "stage": "-", "steps": 0, "trains": "-",
                         "accuracy": token_accuracy(converted, test), "final_loss": None, "seconds": 0.0})
            print(rows[-1], flush=True)

    table = "| run | stage | steps | trains | test accuracy | final loss | seconds |\n|---|---|---:|---|---:|---:|---:|\n" + "".join(
        f"| {r['run']} | {r['stage']} | {r['steps']} | {r['trains']} | {r['accuracy']:.3f} | "
        f"{'-' if r['final_loss'] is None else format(r['final_loss'], '.4f')} | {r['seconds']:.0f} |\n" for r in rows)
    result = {"task": teacher.data.task, "scale": args.scale, "test_examples": args.test_examples,
              "threads": args.threads, "torch": torch.__version__, "rows": rows}
    atomic_write_bytes(args.out / "summary.json", json.dumps(result, indent=1).encode())
    atomic_write_bytes(args.out / "summary.md", table.encode())
    plot_losses(args.out, list(configs), args.out / "losses.png")
    print(table)
    return result


if __name__ == "__main__":
    main()
