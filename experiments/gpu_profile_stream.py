"""Where a streaming frame's time goes: the vision tower, the decoder prefill, and the top ops.

    python experiments/gpu_profile_stream.py --out DIR           # paper size, bf16, CUDA
    python experiments/gpu_profile_stream.py --dry-run           # tiny, CPU (automatic without CUDA)

Pushes warm-up frames through a StreamSession, then times one frame's parts (vision tower alone,
whole VLM call) and profiles two frames with torch.profiler: the ops by self CPU time and by
device time, and the count of device syncs. Written to DIR/profile.txt.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mixerzoo.vlm import VLM, StreamSession, vlm_recipe
from mixerzoo.vlm.processor import process_video


def main(argv: list[str] | None = None) -> None:
    """Build the infinitevl VLM, stream frames, and write the timing split and profile."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("results/gpu_profile"))
    parser.add_argument("--frame-size", type=int, default=448)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    device, size = ("cuda", "paper") if cuda else ("cpu", "tiny")
    args.out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    torch.manual_seed(0)
    with torch.device(device):
        model = VLM(vlm_recipe("infinitevl", size)).to(torch.bfloat16).eval()
    session = StreamSession(model, frame_size=args.frame_size)
    frames = np.random.default_rng(0).integers(0, 256, (8, args.frame_size, args.frame_size, 3), dtype=np.uint8)
    session.push_frames(frames[:3])
    say(f"{size} infinitevl on {device}, frame {args.frame_size} ({session.tokens_per_frame} tokens): "
        f"frame ms {[round(s * 1e3, 1) for s in session.stats.frame_seconds]}")

    # the vision tower alone on the same frame
    pixels, grid, _ = process_video(frames[3][None], session.processor, fps=session.fps)
    pixels = pixels.to(device, torch.bfloat16)
    with torch.inference_mode():
        for _ in range(2):
            model.visual(pixels, grid)
        sync()
        start = time.perf_counter()
        for _ in range(3):
            model.visual(pixels, grid)
        sync()
    say(f"vision tower alone: {(time.perf_counter() - start) / 3 * 1e3:.1f} ms per frame")

    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        session.push_frames(frames[4:6])
    say(f"profiled frames ms: {[round(s * 1e3, 1) for s in session.stats.frame_seconds[-2:]]}")
    table = prof.key_averages()
    say(table.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))
    if cuda:
        say(table.table(sort_by="self_cuda_time_total", row_limit=20, max_name_column_width=60))
    syncs = [e for e in table if "synchronize" in e.key.lower() or e.key in ("aten::item", "aten::_local_scalar_dense")]
    say("sync-like ops: " + ", ".join(f"{e.key} x{e.count}" for e in syncs))
    (args.out / "profile.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
