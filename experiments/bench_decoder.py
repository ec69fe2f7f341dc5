"""Whole-model decode on CPU: per-token latency and state memory vs context, for several recipes.

Recipes transformer, infinitevl, gdn and swa at size "small" (Decoder(recipe(name, "small"))),
float32, batch 1, one token per step (T = 1), under torch.inference_mode.

Two ways to run, same cases:
    pytest experiments/bench_decoder.py --benchmark-only                  # pytest-benchmark, 1 thread
    python experiments/bench_decoder.py [--threads 1] [--contexts 1024 ...] [--repeats 20]
        prints a markdown table with ratios and a summary, and writes
        results/bench_decoder/{table.md, results.json, decode.png}

Decode at context N starts from a state FILLED WITH RANDOM VALUES of the size N tokens
would leave (every tensor's token-dependent dims sized N, counters set to N), not from a
prefill: a 64K full-attention prefill on 2 CPU cores would take minutes per case. Each
timed step runs from the same filled state. Within a recipe the contexts are timed
round-robin (one step of each context per round) so load from other processes affects
them alike.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

from mixerzoo.blocks import Decoder, DecoderState, random_state
from mixerzoo.mixers.base import atomic_write_bytes
from mixerzoo.registry import recipe

RECIPES = ("transformer", "infinitevl", "gdn", "swa")
SIZE = "small"
CONTEXTS = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
PYTEST_CONTEXTS = (1024, 65536)
COUNTER_BYTES = 8  # DecoderState.seen: one int64 per row
OUT_DIR = Path(__file__).resolve().parents[1] / "results" / "bench_decoder"
STATE_NOTE = ("decode starts from a state filled with random values of the size `context` tokens "
              "would leave (not from a prefill)")


def make_model(name: str) -> Decoder:
    """The `small` Decoder of recipe `name`, float32, in eval mode."""
    return Decoder(recipe(name, SIZE)).eval()


def expected_nbytes(model: Decoder, context: int, batch_size: int = 1) -> int:
    """State bytes after `context` tokens as the layer configs report them, plus the model-level counter."""
    layers = sum(layer.mixer.state_nbytes(context, batch_size) for layer in model.spec.layers)
    return layers + COUNTER_BYTES * batch_size


def check_state_nbytes(model: Decoder, state: DecoderState, context: int) -> None:
    """Raise AssertionError unless `state.nbytes` equals the configs' formula at `context`."""
    want = expected_nbytes(model, context, state.batch_size)
    if state.nbytes != want:
        raise AssertionError(f"state.nbytes = {state.nbytes} at context {context}, but the layer configs' "
                             f"state_nbytes sum + counter = {want}")


def decode_step(model: Decoder, state: DecoderState) -> Callable[[], object]:
    """A closure running one decode step (one random token per row) from `state`."""
    ids = torch.randint(model.spec.vocab_size, (state.batch_size, 1))
    return lambda: model(ids, state)


@pytest.fixture(autouse=True)
def one_thread():
    """Run each pytest-benchmark case on one intra-op thread (as `main`'s default), then restore the count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("context", PYTEST_CONTEXTS)
@pytest.mark.parametrize("name", RECIPES)
def test_decode_latency(benchmark, name, context):
    """pytest-benchmark: one decode step of recipe `name` from a random state of `context` tokens."""
    model = make_model(name)
    with torch.inference_mode():
        state = random_state(model, context)
        check_state_nbytes(model, state, context)
        benchmark(decode_step(model, state))


def time_round_robin(steps: dict[int, Callable[[], object]], repeats: int, warmup: int) -> dict[int, list[float]]:
    """Wall seconds of each step over `repeats` rounds (one call of each step per round), after `warmup` rounds."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[int, list[float]] = {key: [] for key in steps}
    for _ in range(repeats):
        for key, step in steps.items():
            start = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - start)
    return times


def context_label(context: int) -> str:
    """1024 -> '1K'; a context that is not a multiple of 1024 stays as is."""
    return f"{context // 1024}K" if context % 1024 == 0 else str(context)


def report(rows: list[dict], contexts: list[int], header: str) -> str:
    """The markdown table (ms/token, ratio vs the first context, state MiB) and the summary lines."""
    lo, hi = contexts[0], contexts[-1]
    lo_label, hi_label = context_label(lo), context_label(hi)
    by = {(r["recipe"], r["context"]): r for r in rows}
    lines = [header, "", f"| recipe | context | decode ms/token | vs {lo_label} | state MiB |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        ratio = r["median_s"] / by[r["recipe"], lo]["median_s"]
        lines.append(f"| {r['recipe']} | {context_label(r['context'])} | {r['median_s'] * 1e3:.3f} | "
                     f"{ratio:.2f}x | {r['state_nbytes'] / 2**20:.2f} |")

    def latency_ratio(name: str) -> float:
        return by[name, hi]["median_s"] / by[name, lo]["median_s"]

    small, large = by["infinitevl", lo]["state_nbytes"], by["infinitevl", hi]["state_nbytes"]
    same = f"yes ({small} bytes)" if small == large else f"no ({small} vs {large} bytes)"
    speedup = by["transformer", hi]["median_s"] / by["infinitevl", hi]["median_s"]
    lines += [
        "",
        f"- infinitevl {hi_label}/{lo_label} latency ratio: {latency_ratio('infinitevl'):.2f}x",
        f"- transformer {hi_label}/{lo_label} latency ratio: {latency_ratio('transformer'):.2f}x",
        f"- infinitevl speedup over transformer at {hi_label}: {speedup:.2f}x",
        f"- infinitevl state bytes identical at {lo_label} and {hi_label}: {same}",
    ]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], title: str) -> bytes:
    """PNG bytes of two panels: decode ms/token vs context (log x) and state MiB vs context (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in RECIPES:
        mine = [r for r in rows if r["recipe"] == name]
        xs = [r["context"] for r in mine]
        left.plot(xs, [r["median_s"] * 1e3 for r in mine], marker="o", label=name)
        right.plot(xs, [r["state_nbytes"] / 2**20 for r in mine], marker="o", label=name)
    for ax, ylabel in ((left, "decode ms/token (median)"), (right, "state MiB")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [context_label(x) for x in xs])
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    right.set_yscale("log")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()


def main() -> None:
    """Time every recipe x context, print the table and write table.md, results.json and decode.png."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=list(CONTEXTS))
    parser.add_argument("--repeats", type=int, default=20, help="timed decode steps per case (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed decode steps per case first")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output directory")
    args = parser.parse_args()
    contexts = sorted(set(args.contexts))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    with torch.inference_mode():
        for name in RECIPES:
            model = make_model(name)
            states = {context: random_state(model, context) for context in contexts}
            for context, state in states.items():
                check_state_nbytes(model, state, context)
            times = time_round_robin({c: decode_step(model, s) for c, s in states.items()}, args.repeats, args.warmup)
            rows += [dict(recipe=name, context=c, median_s=statistics.median(times[c]), times_s=times[c],
                          state_nbytes=states[c].nbytes, expected_state_nbytes=expected_nbytes(model, c))
                     for c in contexts]
            del model, states
    header = (f"Decoder `{SIZE}` recipes, float32, batch 1, T = 1 decode, {args.threads} thread(s), "
              f"median of {args.repeats} steps after {args.warmup} warm-up, torch {torch.__version__}.\n"
              f"Note: {STATE_NOTE}.")
    text = report(rows, contexts, header)
    print(text, end="")
    meta = dict(size=SIZE, recipes=list(RECIPES), contexts=contexts, dtype="float32", batch_size=1,
                threads=args.threads, repeats=args.repeats, warmup=args.warmup, torch=torch.__version__,
                python=platform.python_version(), machine=platform.machine(), state=STATE_NOTE)
    atomic_write_bytes(args.out / "table.md", text.encode())
    atomic_write_bytes(args.out / "results.json", (json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n").encode())
    title = f"Decoder {SIZE}, float32, batch 1, {args.threads} thread(s); {STATE_NOTE}"
    atomic_write_bytes(args.out / "decode.png", plot(rows, title))
    print(f"\nwrote {args.out / 'table.md'}, {args.out / 'results.json'}, {args.out / 'decode.png'}")


if __name__ == "__main__":
    main()
