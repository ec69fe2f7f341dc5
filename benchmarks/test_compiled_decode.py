"""Eager against compiled T = 1 decode (ms/token) per recipe on the CPU, one intra-op thread.

    pytest benchmarks/test_compiled_decode.py --benchmark-only --benchmark-group-by=param:name

Each recipe (tiny size, batch 1) decodes from a 64-token prefill, its full-attention caches preallocated
for the steps (a StaticKVCache, as `generate(..., compile=True)` makes them), eager and through
`compiled_step` (torch.compile, fullgraph, static shapes; compiled before timing); a recipe with full
attention also decodes eagerly through the growing KVCache, the eager default. The contenders of a
recipe alternate round by round, so load from other jobs falls on all of them alike.
"""

from __future__ import annotations

import time

import pytest
import torch

from mixerzoo.blocks import Decoder, compiled_step
from mixerzoo.registry import recipe

RECIPES = ("transformer", "infinitevl", "gdn", "swa", "mamba2")
ROUNDS, PROMPT = 40, 64


@pytest.mark.parametrize("name", RECIPES)
def test_eager_vs_compiled_decode(benchmark, name):
    torch.manual_seed(0)
    model = Decoder(recipe(name, "tiny")).eval()
    token = torch.randint(model.spec.vocab_size, (1, 1))
    with torch.inference_mode():
        _, state = model(torch.randint(model.spec.vocab_size, (1, PROMPT)))
        capacity = PROMPT + 3 * ROUNDS
        states = {"eager": state.clone().with_capacity(capacity), "compiled": state.clone().with_capacity(capacity)}
        steps = {"eager": model, "compiled": compiled_step(model)}
        if any(layer.mixer.type == "attention" and layer.mixer.window is None for layer in model.spec.layers):
            states["eager, growing cache"], steps["eager, growing cache"] = state, model  # the eager default
        steps["compiled"](token, states["compiled"].clone())  # compile outside the timing
    times: dict[str, list[float]] = {k: [] for k in steps}

    def one_round() -> None:
        with torch.inference_mode():
            for kind, step in steps.items():
                start = time.perf_counter()
                _, states[kind] = step(token, states[kind])
                times[kind].append(time.perf_counter() - start)

    benchmark.group = f"decode {name} (tiny)"
    benchmark.pedantic(one_round, rounds=ROUNDS, warmup_rounds=2, iterations=1)
    medians = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
    benchmark.extra_info.update(medians_ms=medians, speedup=medians["eager"] / medians["compiled"])
    print(f"{name}: " + ", ".join(f"{k} {ms:.3f} ms" for k, ms in medians.items())
          + f"; compiled {medians['eager'] / medians['compiled']:.2f}x faster than eager")
