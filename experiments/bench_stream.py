"""Streaming video on CPU: frames per second, state bytes and process memory over a long stream.

    python experiments/bench_stream.py                       # FPS table + 2,000-frame memory run
    python experiments/bench_stream.py --frames 200 --memory-frames 500

FPS: `infinitevl` VLMs (tiny, small) at 64 (224 px) and 256 (448 px) visual tokens per frame,
each frame prefilled into one running state (random weights and random frames). Memory:
a tiny `infinitevl` session over --memory-frames frames, and a tiny `qwen2.5-vl` (all full
attention) session for contrast, sampling state bytes and the process's resident memory.
Writes results/bench_stream/{table.md, results.json, memory.png}.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch

from mixerzoo.mixers.base import atomic_path, atomic_write_bytes
from mixerzoo.vlm import VLM, StreamSession, vlm_recipe

OUT = Path("results/bench_stream")


def resident_mib() -> float:
    """Resident memory of this process now, MiB (Linux /proc)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def frames(count: int, seed: int = 0) -> np.ndarray:
    """Random 480 x 640 RGB frames [count, H, W, 3]."""
    return np.random.default_rng(seed).integers(0, 256, (count, 480, 640, 3), dtype=np.uint8)


def fps_run(recipe: str, size: str, frame_size: int, count: int) -> dict:
    """Stream `count` frames (after 3 warm-up frames) and report the session's FPS."""
    torch.manual_seed(0)
    session = StreamSession(VLM(vlm_recipe(recipe, size)).eval(), frame_size=frame_size)
    session.push_frames(frames(3, seed=1))
    warm = session.stats.frames
    session.push_frames(frames(count))
    seconds = session.stats.frame_seconds[warm:]
    return dict(recipe=recipe, size=size, tokens_per_frame=session.tokens_per_frame, frames=count,
                fps=len(seconds) / sum(seconds), median_ms=float(np.median(seconds)) * 1e3,
                state_bytes=session.stats.state_nbytes[-1])


def memory_run(recipe: str, count: int, every: int) -> dict:
    """State bytes and resident memory every `every` frames over a tiny `recipe` stream."""
    torch.manual_seed(0)
    session = StreamSession(VLM(vlm_recipe(recipe, "tiny")).eval(), frame_size=224)
    samples = []
    batch = frames(every)
    for done in range(every, count + 1, every):
        session.push_frames(batch)
        samples.append(dict(frames=done, state_bytes=session.state.nbytes, rss_mib=resident_mib(),
                            ms_per_frame=float(np.mean(session.stats.frame_seconds[-every:])) * 1e3))
    return dict(recipe=recipe, samples=samples)


def plot(memory: list[dict], path: Path) -> None:
    """State MiB and resident MiB against frames, one line per recipe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for run in memory:
        x = [s["frames"] for s in run["samples"]]
        axes[0].plot(x, [s["state_bytes"] / 2**20 for s in run["samples"]], label=run["recipe"])
        axes[1].plot(x, [s["rss_mib"] for s in run["samples"]], label=run["recipe"])
        axes[2].plot(x, [s["ms_per_frame"] for s in run["samples"]], label=run["recipe"])
    for ax, title in zip(axes, ["state MiB", "process resident MiB", "ms per frame"]):
        ax.set_xlabel("frames streamed (64 tokens each)")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=100, help="frames per FPS run")
    parser.add_argument("--memory-frames", type=int, default=2000)
    parser.add_argument("--contrast-frames", type=int, default=600, help="frames of the full-attention contrast run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (2 threads stall when other work shares the cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fps = [fps_run("infinitevl", size, px, args.frames) for size in ("tiny", "small") for px in (224, 448)]
    every = 100 if args.memory_frames >= 500 else 10
    memory = [memory_run("infinitevl", args.memory_frames, every), memory_run("qwen2.5-vl", args.contrast_frames, every)]
    lines = [f"{args.threads} thread(s), torch {torch.__version__}, random weights and frames\n",
             "| VLM | tokens/frame | frames | FPS | median ms/frame | state bytes |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['recipe']}/{r['size']} | {r['tokens_per_frame']} | {r['frames']} | {r['fps']:.1f} | "
              f"{r['median_ms']:.1f} | {r['state_bytes']:,} |" for r in fps]
    lines += ["", "| stream (tiny, 64 tokens/frame) | frames | state bytes first -> last | resident MiB first -> last | "
              "ms/frame first -> last |", "|---|---:|---|---|---|"]
    for run in memory:
        first, last = run["samples"][0], run["samples"][-1]
        lines.append(f"| {run['recipe']} | {last['frames']} | {first['state_bytes']:,} -> {last['state_bytes']:,} | "
                     f"{first['rss_mib']:.0f} -> {last['rss_mib']:.0f} | "
                     f"{first['ms_per_frame']:.1f} -> {last['ms_per_frame']:.1f} |")
    table = "\n".join(lines)
    print(table)
    atomic_write_bytes(OUT / "table.md", (table + "\n").encode())
    atomic_write_bytes(OUT / "results.json", json.dumps(dict(fps=fps, memory=memory), indent=1).encode())
    plot(memory, OUT / "memory.png")


if __name__ == "__main__":
    main()
