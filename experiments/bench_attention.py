"""Full vs sliding-window attention on CPU: per-token decode latency and prefill throughput vs context.

Two ways to run, same cases:
    pytest experiments/bench_attention.py --benchmark-only          # pytest-benchmark
    python experiments/bench_attention.py [--contexts 1024 ... ]     # markdown table with ratios

Decode at context N starts from a state filled with random keys and values of the size
N tokens would leave (a 32K full-attention prefill per case would dominate the run);
prefill runs the real chunk through the mixer from an empty state.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import pytest
import torch

from mixerzoo.mixers import Mixer, MixerState
from mixerzoo.registry import build_mixer

D_MODEL, N_HEADS, N_KV_HEADS, WINDOW = 512, 8, 2, 1024
CONTEXTS = [1024, 2048, 4096, 8192, 16384, 32768]
KINDS = {"full": None, f"swa-{WINDOW}": WINDOW}


def make_mixer(window: int | None) -> Mixer:
    """The benchmarked attention layer (GQA 8 / 2 heads of 64, RoPE), in eval mode."""
    spec = {"type": "attention", "d_model": D_MODEL, "n_heads": N_HEADS, "n_kv_heads": N_KV_HEADS, "window": window}
    return build_mixer(spec).eval()


def filled_state(mixer: Mixer, context: int) -> MixerState:
    """A batch-1 state of the size `context` seen tokens leave, holding random keys and values."""
    state = mixer.init_state(1)
    slots = context if mixer.config.window is None else mixer.config.window
    shape = (1, slots, *state.k.shape[2:])
    return dataclasses.replace(state, k=torch.randn(shape), v=torch.randn(shape), seen=torch.tensor([context]))


def decode_step(mixer: Mixer, state: MixerState):
    """A closure running one decode step (T = 1) from `state`."""
    x = torch.randn(1, 1, D_MODEL)
    return lambda: mixer(x, state)


def prefill(mixer: Mixer, context: int):
    """A closure prefilling `context` tokens from an empty state in one call."""
    x = torch.randn(1, context, D_MODEL)
    return lambda: mixer(x)


@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_decode_latency(benchmark, kind, context):
    mixer = make_mixer(KINDS[kind])
    with torch.inference_mode():
        benchmark(decode_step(mixer, filled_state(mixer, context)))


@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_prefill_throughput(benchmark, kind, context):
    mixer = make_mixer(KINDS[kind])
    with torch.inference_mode():
        benchmark.pedantic(prefill(mixer, context), rounds=2, warmup_rounds=1)


def median_seconds(fn, repeats: int, warmup: int = 3) -> float:
    """Median wall time of `fn()` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=CONTEXTS)
    parser.add_argument("--decode-repeats", type=int, default=50)
    parser.add_argument("--prefill-repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = {}
    with torch.inference_mode():
        for kind, window in KINDS.items():
            mixer = make_mixer(window)
            for context in args.contexts:
                decode = median_seconds(decode_step(mixer, filled_state(mixer, context)), args.decode_repeats)
                fill = median_seconds(prefill(mixer, context), args.prefill_repeats, warmup=1)
                rows[kind, context] = (decode, context / fill, mixer.config.state_nbytes(context))
    first = args.contexts[0]
    print(f"d_model {D_MODEL}, {N_HEADS} query / {N_KV_HEADS} KV heads of {D_MODEL // N_HEADS}, float32, batch 1, "
          f"{args.threads} thread(s)\n")
    print("| mixer | context | decode ms/token | vs first context | prefill tokens/s | state MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for (kind, context), (decode, throughput, nbytes) in rows.items():
        ratio = decode / rows[kind, first][0]
        print(f"| {kind} | {context} | {decode * 1e3:.3f} | {ratio:.2f}x | {throughput:,.0f} | {nbytes / 2**20:.1f} |")


if __name__ == "__main__":
    main()
