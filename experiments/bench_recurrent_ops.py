"""Speed of the recurrent ops' CPU backends: gated_delta_rule (GDN) and ssd (Mamba2), forward, no grad.

    python experiments/bench_recurrent_ops.py [--max-T 4096] [--max-reference-T 8192] [--repeats 5] [--threads 1]
        prints a markdown table: "torch" (chunked) vs "reference" (loop over time) vs fla's
        pure-torch naive chunked functions, for prefill at several T and for one decode step.
    pytest experiments/bench_recurrent_ops.py --benchmark-only
        the same calls as pytest-benchmark tests (T = 1024 and 4096, and decode).

Shapes: B = 1, H = 4, K = V = 64 (GDN); Bt = 1, H = 4, G = 1, P = N = 64 (SSD); float32 on CPU.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time
from collections.abc import Callable
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from mixerzoo.ops.gated_delta_rule import gated_delta_rule
from mixerzoo.ops.ssd import ssd

HEADS, DIM = 4, 64
PREFILL_T = (1024, 2048, 4096, 8192, 16384)


def gdn_inputs(seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """GDN inputs as the mixer makes them (unit-norm keys), with a random initial state."""
    gen = torch.Generator().manual_seed(seed)
    shape = (1, seq_len, HEADS)
    return {
        "q": F.normalize(torch.randn(*shape, DIM, generator=gen), dim=-1),
        "k": F.normalize(torch.randn(*shape, DIM, generator=gen), dim=-1),
        "v": torch.randn(*shape, DIM, generator=gen),
        "g": F.logsigmoid(torch.randn(*shape, generator=gen) + 3),
        "beta": torch.rand(*shape, generator=gen),
        "initial_state": torch.randn(1, HEADS, DIM, DIM, generator=gen) * 0.1,
    }


def ssd_inputs(seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """SSD inputs as Mamba2 makes them (dt through softplus, A < 0), with a random initial state."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(1, seq_len, HEADS, DIM, generator=gen),
        "dt": F.softplus(torch.randn(1, seq_len, HEADS, generator=gen) - 2),
        "A": -torch.rand(HEADS, generator=gen) * 4,
        "B": torch.randn(1, seq_len, 1, DIM, generator=gen) / DIM**0.5,
        "C": torch.randn(1, seq_len, 1, DIM, generator=gen),
        "initial_state": torch.randn(1, HEADS, DIM, DIM, generator=gen) * 0.1,
    }


def gdn_fla_chunk(q, k, v, g, beta, initial_state):
    """fla's pure-torch chunked gated delta rule (chunk 64), with its final state."""
    from fla.ops.gated_delta_rule import naive_chunk_gated_delta_rule

    return naive_chunk_gated_delta_rule(
        q=q, k=k, v=v, g=g, beta=beta, chunk_size=64, initial_state=initial_state, output_final_state=True
    )


def gdn_fla_recurrent(q, k, v, g, beta, initial_state):
    """fla's pure-torch loop over time for the gated delta rule, with its final state."""
    from fla.ops.gated_delta_rule import naive_recurrent_gated_delta_rule

    return naive_recurrent_gated_delta_rule(
        q=q, k=k, v=v, g=g, beta=beta, initial_state=initial_state, output_final_state=True
    )


def ssd_fla_chunk(x, dt, A, B, C, initial_state):
    """SSD through fla's pure-torch chunked simple GLA (q = C, k = B, v = x dt, g = A dt), state in our layout."""
    from fla.ops.simple_gla.naive import naive_chunk_simple_gla

    y, state = naive_chunk_simple_gla(
        q=C.expand(-1, -1, HEADS, -1), k=B.expand(-1, -1, HEADS, -1), v=x * dt[..., None], g=A * dt,
        initial_state=initial_state.transpose(-1, -2), output_final_state=True, scale=1.0,
    )
    return y, state.transpose(-1, -2)


def ssd_fla_recurrent(x, dt, A, B, C, initial_state):
    """SSD through fla's pure-torch simple-GLA loop over time, state in our layout."""
    from fla.ops.simple_gla.naive import naive_recurrent_simple_gla

    y, state = naive_recurrent_simple_gla(
        q=C.expand(-1, -1, HEADS, -1), k=B.expand(-1, -1, HEADS, -1), v=x * dt[..., None], g=A * dt,
        initial_state=initial_state.transpose(-1, -2), output_final_state=True, scale=1.0,
    )
    return y, state.transpose(-1, -2)


# op -> (inputs, {column: function of the inputs}); the fla columns are the prefill / decode oracles.
OPS: dict[str, tuple[Callable[..., dict], dict[str, Callable]]] = {
    "gated_delta_rule": (
        gdn_inputs,
        {
            "torch": lambda **kw: gated_delta_rule(**kw, backend="torch"),
            "reference": lambda **kw: gated_delta_rule(**kw, backend="reference"),
            "fla naive chunk": gdn_fla_chunk,
            "fla naive recurrent": gdn_fla_recurrent,
        },
    ),
    "ssd": (
        ssd_inputs,
        {
            "torch": lambda **kw: ssd(**kw, backend="torch"),
            "reference": lambda **kw: ssd(**kw, backend="reference"),
            "fla naive chunk": ssd_fla_chunk,
            "fla naive recurrent": ssd_fla_recurrent,
        },
    ),
}


def median_seconds(fns: dict[str, Callable[[], object]], repeats: dict[str, int]) -> dict[str, float]:
    """Median wall time of each function over its number of repeats, after one warmup call each.

    The functions take turns (round robin), so load from other processes falls on all of them alike.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()
        for turn in range(max(repeats.values())):
            for name, fn in fns.items():
                if turn < repeats[name]:
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def fla_available() -> bool:
    """Whether fla's pure-torch references can be imported."""
    try:
        for module in ("fla.ops.gated_delta_rule", "fla.ops.simple_gla.naive"):
            importlib.import_module(module)
    except ImportError:
        return False
    return True


def table(max_t: int, max_reference_t: int, repeats: int) -> str:
    """Markdown table of prefill and decode times (ms) and speed-ups of the "torch" backend."""
    have_fla = fla_available()
    lines = [
        "| op | T | torch (ms) | reference (ms) | fla naive (ms) | reference / torch | fla naive / torch |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(seconds: float | None) -> str:
        return "-" if seconds is None else f"{seconds * 1e3:.3f}"

    def ratio(seconds: float | None, base: float) -> str:
        return "-" if seconds is None else f"{seconds / base:.1f}x"

    for op, (make, fns) in OPS.items():
        rows = [(t, "fla naive chunk") for t in PREFILL_T if t <= max_t] + [(1, "fla naive recurrent")]
        for seq_len, fla_column in rows:
            inputs = make(seq_len)
            columns = {"torch": repeats}
            if seq_len <= max_reference_t:
                columns["reference"] = repeats if seq_len <= 4096 else 1
            if have_fla:
                columns[fla_column] = repeats
            seconds = median_seconds({name: partial(fns[name], **inputs) for name in columns}, columns)
            torch_s, ref_s, fla_s = seconds["torch"], seconds.get("reference"), seconds.get(fla_column)
            label = f"{seq_len} (decode; fla recurrent)" if seq_len == 1 else str(seq_len)
            lines.append(
                f"| {op} | {label} | {cell(torch_s)} | {cell(ref_s)} | {cell(fla_s)} "
                f"| {ratio(ref_s, torch_s)} | {ratio(fla_s, torch_s)} |"
            )
    return "\n".join(lines)


@pytest.mark.parametrize("column", ["torch", "reference", "fla naive"])
@pytest.mark.parametrize("seq_len", [1, 1024, 4096])
@pytest.mark.parametrize("op", list(OPS))
def test_speed(benchmark, op, seq_len, column):
    """pytest-benchmark: one forward call of `op` (no grad); T = 1 compares with fla's naive recurrence."""
    make, fns = OPS[op]
    if column == "fla naive":
        pytest.importorskip("fla", reason="fla-core is not installed")
        column = "fla naive recurrent" if seq_len == 1 else "fla naive chunk"
    inputs = make(seq_len)
    with torch.no_grad():
        benchmark(lambda: fns[column](**inputs))


def main() -> None:
    """Print the markdown table (see the module docstring for the flags)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-T", type=int, default=max(PREFILL_T), help="largest prefill T to time")
    parser.add_argument("--max-reference-T", type=int, default=8192, help="largest T to time the reference loop at")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per cell (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, forward under no_grad, "
        f"median of {args.repeats} after 1 warmup (1 for the reference above T = 4096), columns timed in turn\n"
    )
    print(table(args.max_T, args.max_reference_T, args.repeats))


if __name__ == "__main__":
    main()
