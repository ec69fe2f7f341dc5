"""Eager against compiled stream frames (ms/frame) on the CPU, one intra-op thread.

    pytest benchmarks/test_compiled_frame.py --benchmark-only -s

A tiny VLM of each streaming recipe takes 224 x 224 frames (64 visual tokens each) through
`StreamSession.push_frames`, eagerly and with `compile=True` (one graph for every frame, compiled
before timing; the first compile takes minutes on a CPU). The two sessions alternate frame by frame,
so load from other jobs falls on both alike; the time is the session's own per-frame figure
(processing the pixels included).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixerzoo.vlm import VLM, StreamSession, vlm_recipe

RECIPES = ("infinitevl", "swa")
ROUNDS, SIZE = 20, 224


@pytest.mark.parametrize("name", RECIPES)
def test_eager_vs_compiled_frame(benchmark, name):
    torch.manual_seed(0)
    model = VLM(vlm_recipe(name, size="tiny")).eval()
    frames = np.random.default_rng(0).integers(0, 256, (ROUNDS + 1, SIZE, SIZE, 3), dtype=np.uint8)
    sessions = {"eager": StreamSession(model, frame_size=SIZE),
                "compiled": StreamSession(model, frame_size=SIZE, compile=True)}
    for session in sessions.values():  # compile (and warm) outside the timing
        session.push_frames(frames[:1])
    frame = iter(frames[1:])

    def one_round() -> None:
        pushed = next(frame)
        for session in sessions.values():
            session.push_frames([pushed])

    benchmark.group = f"stream frame {name} (tiny, {SIZE} px)"
    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    medians = {k: sorted(s.stats.frame_seconds[1:])[ROUNDS // 2] * 1e3 for k, s in sessions.items()}
    benchmark.extra_info.update(medians_ms=medians, speedup=medians["eager"] / medians["compiled"])
    print(f"{name}: " + ", ".join(f"{k} {ms:.2f} ms/frame" for k, ms in medians.items())
          + f"; compiled {medians['eager'] / medians['compiled']:.2f}x faster than eager")
