"""GPU benchmarks of the paper-size (3B) models; experiments/gpu_check.sh runs it, --dry-run checks it on CPU.

    python experiments/gpu_bench.py --out DIR [--sections graph decode stream prefill ops]
    python experiments/gpu_bench.py --dry-run          # automatic without CUDA

Sections (in the order given), each appending its rows to DIR/bench.json and DIR/bench.md as
soon as a case finishes, so a run cut off by its time limit keeps what it measured:
  graph    CUDA-graph T = 1 decode (GraphDecoder) of infinitevl and mamba2-swa: greedy tokens equal
           to the eager path's (continue_stream) from the same state, and ms/token of both.
  decode   ms/token at 4K / 16K / 50K / 128K / 300K context, batch 1: infinitevl and the transformer,
           each eager and as a CUDA graph (the transformer's through a StaticKVCache of the context's
           size), with the bytes a step reads (weights + state) per second and as a fraction of the
           device's HBM peak. Each starts from random_state (random values of the size the context
           leaves, not a prefill); eager keeps the state each step returns, so the transformer's KV
           cache grows once (untimed warm-up) and then appends in place. An out-of-memory case is
           recorded as such.
  stream   streaming FPS of the infinitevl VLM (vision tower + decoder) at 64 and 256 visual tokens
           per square frame through StreamSession: end to end, and without the CPU preprocessing.
  stream-compiled  the same at 256 tokens per frame with StreamSession(compile=True), last (compiling
           takes longest).
  prefill  tokens/s of one forward over an 8K and a 32K prompt (logits of every position included).
  ops      chunked gated_delta_rule, ssd, GLA and KDA at paper layer shapes, 8K tokens: fla vs torch backend.
  train    training tokens/s (forward, backward, clipping, AdamW; float32 weights, bf16 autocast, as
           `ablate --dtype bfloat16` trains) of a 2-layer MQAR model at Zoology's scale (d_model 128,
           vocabulary 8,192, 512 x 256 tokens) and of every `small` recipe (16 x 2,048 tokens); the
           all-Gated-DeltaNet ones also built from fla's own layers (GatedDeltaNetForCausalLM of the
           same shape and parameter count, its Triton kernels), side by side.
Every case records peak GPU memory. Weights are random (speed does not depend on them); bf16;
op backends "auto" (on the GPU machine: fla for GDN / SSD, PyTorch SDPA for attention).

The dry run builds every model and input at tiny size on CPU, runs each section's code path once
with small contexts and lengths, and prints the plan with the paper-size sizes and memory, so the
one GPU run cannot fail on a typo.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import importlib.metadata
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from mixerzoo.ablate.studies import RunConfig, build_spec
from mixerzoo.blocks import Decoder, GraphDecoder, LayoutSpec, continue_stream, random_state, state_nbytes
from mixerzoo.blocks.costs import parameter_count
from mixerzoo.mixers.base import atomic_write_bytes
from mixerzoo.ops import gated_delta_rule, gated_linear_attention, ssd
from mixerzoo.ops._backend import module_available
from mixerzoo.registry import recipe
from mixerzoo.vlm import VLM, StreamSession, process_video, vlm_recipe

SECTIONS = ("graph", "decode", "stream", "prefill", "ops", "train", "stream-compiled")  # compiling last: it takes longest
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one run measures, and at which sizes."""

    size: str
    device: str
    dtype: torch.dtype
    contexts: tuple[int, ...]
    prefill_lengths: tuple[int, ...]
    frame_sizes: tuple[int, ...]  # square frames: (side / 28)^2 visual tokens
    frames: int
    decode_steps: int
    graph_tokens: int
    op_length: int
    repeats: int
    warmup: int
    strict: bool  # raise on the first failing case (the dry run) instead of recording it
    compiled_stream: tuple[int, ...] = ()  # frame sizes also streamed with compile=True (a graph per frame size)
    mqar_shape: tuple[int, int, int, int] = (128, 8192, 512, 256)  # d_model, vocabulary, batch, tokens per row
    train_shape: tuple[int, int] = (16, 2048)  # batch, tokens per row of the recipes' training steps


GPU_PLAN = Plan(size="paper", device="cuda", dtype=torch.bfloat16, contexts=(4096, 16384, 51200, 131072, 307200),
                prefill_lengths=(8192, 32768), frame_sizes=(224, 448), frames=20, decode_steps=20, graph_tokens=32,
                op_length=8192, repeats=5, warmup=3, strict=False, compiled_stream=(448,))
DRY_PLAN = Plan(size="tiny", device="cpu", dtype=torch.bfloat16, contexts=(40, 300), prefill_lengths=(32, 80),
                frame_sizes=(224,), frames=1, decode_steps=1, graph_tokens=3, op_length=80, repeats=1, warmup=0,
                strict=True, mqar_shape=(64, 256, 4, 32), train_shape=(2, 48))


def label(n: int) -> str:
    """4096 -> '4K'."""
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def sync(device: str) -> None:
    """Wait for the device's queued work (timings count finished work only)."""
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], plan: Plan, repeats: int | None = None) -> float:
    """Median seconds of fn() over `repeats` synchronised calls after plan.warmup untimed ones."""
    for _ in range(plan.warmup):
        fn()
    times = []
    for _ in range(repeats or plan.repeats):
        sync(plan.device)
        start = time.perf_counter()
        fn()
        sync(plan.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_gib(plan: Plan) -> float | None:
    """Peak GPU memory allocated since the last reset, GiB (None on CPU)."""
    return torch.cuda.max_memory_allocated() / GIB if plan.device == "cuda" else None


def free_memory(plan: Plan, *, collect: bool = False) -> None:
    """Return cached blocks to the device and reset the peak counter; `collect` also runs the garbage
    collector (slow: only after a failure or a model, whose tensors a reference cycle may hold)."""
    if collect:
        gc.collect()
    if plan.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


class Results:
    """Rows per section, rewritten to bench.json and bench.md after every case (appends to an earlier run's file)."""

    def __init__(self, out: Path, meta: dict):
        self.out = out
        path = out / "bench.json"
        self.data = json.loads(path.read_text()) if path.exists() else {"meta": meta, "sections": {}}

    def add(self, section: str, row: dict) -> None:
        """Record one case and write both files."""
        print(f"[{section}] {row}", flush=True)
        self.data["sections"].setdefault(section, []).append(row)
        atomic_write_bytes(self.out / "bench.json", (json.dumps(self.data, indent=1) + "\n").encode())
        atomic_write_bytes(self.out / "bench.md", self.markdown().encode())

    def markdown(self) -> str:
        """Every section as a table (columns from its rows' keys), then the paper's claims where measured."""
        meta = self.data["meta"]
        lines = [f"# GPU benchmark: {meta.get('device_name')}", "", f"`{json.dumps(meta)}`", ""]
        for section, rows in self.data["sections"].items():
            columns = list(dict.fromkeys(key for row in rows for key in row))
            lines += [f"## {section}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
            lines.append("")
        return "\n".join(lines + claims(self.data["sections"])) + "\n"


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else "" if value is None else str(value)


def claims(sections: dict) -> list[str]:
    """The paper's claims against what was measured: decode speedups at 50K and 300K, flat latency,
    streaming FPS at 256 tokens per frame; and our training throughput against fla's own model."""
    decode = {(r["recipe"], r["mode"], r["context"]): r for r in sections.get("decode", []) if "ms_per_token" in r}
    lines = ["## claims", ""]
    for mode in ("eager", "graph"):
        for context, goal in ((51200, 3.6), (307200, 8.0)):
            ours, theirs = decode.get(("infinitevl", mode, context)), decode.get(("transformer", mode, context))
            if ours and theirs:  # like for like: eager against eager, graph against graph
                speedup = theirs["ms_per_token"] / ours["ms_per_token"]
                lines.append(f"- decode at {label(context)}: infinitevl {speedup:.2f}x faster than the SDPA transformer, "
                             f"both {mode} (paper: >= {goal}x): {'holds' if speedup >= goal else 'does not hold'}")
            elif ours and any(r.get("status") == "oom" for r in sections.get("decode", [])
                              if r["recipe"] == "transformer" and r["context"] == context):
                lines.append(f"- decode at {label(context)}: the transformer ran out of memory; infinitevl ({mode}) "
                             f"{ours['ms_per_token']:.2f} ms/token")
        rows = sorted((r for (name, m, _), r in decode.items() if name == "infinitevl" and m == mode),
                      key=lambda r: r["context"])
        if len(rows) > 1:
            ratio = rows[-1]["ms_per_token"] / rows[0]["ms_per_token"]
            lines.append(f"- infinitevl ({mode}) latency {label(rows[-1]['context'])} / {label(rows[0]['context'])}: "
                         f"{ratio:.2f}x (flat means about 1)")
        if mode == "graph" and rows:
            worst = max(r["ms_per_token"] for r in rows)
            lines.append(f"- infinitevl graph decode: at most {worst:.2f} ms/token over every context (target on an "
                         f"H200: <= 2.5): {'met' if worst <= 2.5 else 'not met'}")
    train = {(r["model"], r["implementation"]): r for r in sections.get("train", []) if "tokens_per_s" in r}
    for (model, implementation), row in train.items():
        peer = train.get((model, "fla"))
        if implementation == "mixerzoo" and peer:
            lines.append(f"- training {model}: mixerzoo {row['tokens_per_s'] / peer['tokens_per_s']:.2f}x the tokens/s of "
                         f"fla's GatedDeltaNetForCausalLM ({row['tokens_per_s']:.3g} vs {peer['tokens_per_s']:.3g})")
    for row in sections.get("stream", []):
        if row.get("tokens_per_frame") == 256 and "fps" in row:
            lines.append(f"- streaming at 256 tokens per frame ({row.get('mode', 'eager')}): {row['fps']:.1f} FPS end to end, "
                         f"{row['model_fps']:.1f} FPS without CPU preprocessing (goal on an H100: >= 50)")
    return lines


def build_decoder(name: str, plan: Plan) -> Decoder:
    """Recipe `name` at the plan's size, random weights, on the plan's device and dtype (built outside
    inference mode: ordinary parameters, whose fused-projection caches persist across calls)."""
    torch.manual_seed(0)
    with torch.inference_mode(False), torch.device(plan.device):
        return Decoder(recipe(name, plan.size)).to(plan.dtype).eval()


def run_case(results: Results, section: str, plan: Plan, key: dict, case: Callable[[], dict]) -> None:
    """Run one case and record key + its row, or the out-of-memory / error it hit (re-raised when strict)."""
    free_memory(plan)
    failed = True
    try:
        row, failed = case(), False
    except torch.OutOfMemoryError:
        if plan.strict:
            raise
        row = {"status": "oom"}
    except Exception as error:  # noqa: BLE001 - one failing case must not lose the others' rows
        if plan.strict:
            raise
        traceback.print_exc()
        row = {"status": f"error: {type(error).__name__}: {error}"[:300]}
    results.add(section, {**key, **row, "peak_gib": peak_gib(plan)})
    free_memory(plan, collect=failed)


def graph_section(plan: Plan, results: Results) -> None:
    """GraphDecoder tokens vs eager tokens from a random state, and ms/token of both."""
    for name in ("infinitevl", "mamba2-swa"):
        model = build_decoder(name, plan)
        context, steps = plan.contexts[0], plan.graph_tokens

        def case() -> dict:
            torch.manual_seed(1)
            state = random_state(model, context)
            logits = torch.randn(1, model.spec.vocab_size, device=plan.device)
            start = time.perf_counter()
            eager = torch.stack(list(continue_stream(model, logits, state, max_new_tokens=steps)), dim=1)
            sync(plan.device)
            eager_s = time.perf_counter() - start
            start = time.perf_counter()
            graph = GraphDecoder(model, state)
            sync(plan.device)
            capture_s = time.perf_counter() - start
            start = time.perf_counter()
            tokens = graph.generate(logits, steps)
            sync(plan.device)
            graph_s = time.perf_counter() - start
            differ = (tokens != eager).nonzero()
            return dict(captured=graph.graph is not None, tokens_equal=bool(torch.equal(tokens, eager)),
                        first_mismatch=int(differ[0, 1]) if len(differ) else None, eager_ms=eager_s / steps * 1e3,
                        graph_ms=graph_s / steps * 1e3, capture_s=capture_s)

        run_case(results, "graph", plan, dict(recipe=name, context=context, tokens=steps), case)
        del model
        free_memory(plan, collect=True)


# Peak HBM bandwidth by device name (vendor figures, bytes/s): the roofline a batch-1 decode step is held to.
HBM_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}


def hbm_peak(plan: Plan) -> float | None:
    """The device's peak memory bandwidth in bytes/s, when its name is known."""
    if plan.device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((bw for key, bw in HBM_BYTES_PER_S.items() if key in name), None)


def bandwidth(model: Decoder, context: int, plan: Plan, ms_per_token: float) -> dict:
    """Bytes one decode step must read (every weight, and the state after `context` tokens: the KV cache
    or the recurrent states) over its time, and that rate as a fraction of the device's peak."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    read = weights + state_nbytes(model.spec, context, dtype=plan.dtype)
    rate = read / (ms_per_token / 1e3)
    peak = hbm_peak(plan)
    return dict(read_gb=read / 1e9, gb_per_s=rate / 1e9, hbm_fraction=None if peak is None else rate / peak)


def decode_section(plan: Plan, results: Results) -> None:
    """ms/token per context: infinitevl and the transformer, eager and as a CUDA graph (the transformer's
    KV cache preallocated for the context plus the timed steps: a StaticKVCache), with the bandwidth each
    graph reaches."""
    for name in ("infinitevl", "transformer"):
        model = build_decoder(name, plan)
        spec = model.spec
        for context in plan.contexts:
            key = dict(recipe=name, context=context, state_gib=state_nbytes(spec, context, dtype=plan.dtype) / GIB)

            def eager() -> dict:
                ids = torch.randint(spec.vocab_size, (1, 1), device=plan.device)
                box = [random_state(model, context)]  # each step continues from the last (as a served decode)

                def step() -> None:
                    _, box[0] = model(ids, box[0])  # full attention: the first step grows the cache, the rest append

                return dict(ms_per_token=timed(step, plan, plan.decode_steps) * 1e3)

            run_case(results, "decode", plan, {**key, "mode": "eager"}, eager)

            def graphed() -> dict:
                capacity = context + plan.warmup + plan.decode_steps + 8  # + capture warm-up steps
                graph = GraphDecoder(model, random_state(model, context), capacity=capacity)
                token = torch.randint(spec.vocab_size, (1,), device=plan.device)
                ms = timed(lambda: graph.step(token), plan, plan.decode_steps) * 1e3
                del graph
                return dict(ms_per_token=ms, **bandwidth(model, context, plan, ms))

            run_case(results, "decode", plan, {**key, "mode": "graph"}, graphed)
            free_memory(plan)
        del model
        free_memory(plan, collect=True)


def square_frames(count: int, side: int) -> np.ndarray:
    """Random RGB frames [count, side, side, 3] (square: exactly (side / 28)^2 visual tokens each)."""
    return np.random.default_rng(0).integers(0, 256, (count, side, side, 3), dtype=np.uint8)


def stream_section(plan: Plan, results: Results, *, compile: bool = False) -> None:
    """FPS of a StreamSession at each frame size, and of its CPU preprocessing alone; with `compile`,
    of a compiled session (`StreamSession(compile=True)`: one graph per frame size, compiled in the
    warm-up frames) at plan.compiled_stream's sizes."""
    torch.manual_seed(0)
    with torch.inference_mode(False), torch.device(plan.device):
        model = VLM(vlm_recipe("infinitevl", plan.size)).to(plan.dtype).eval()
    for side in plan.compiled_stream if compile else plan.frame_sizes:
        def case() -> dict:
            session = StreamSession(model, frame_size=side, compile=compile)  # warm-up frames compile
            frames = square_frames(plan.warmup + plan.frames, side)
            session.push_frames(frames[: plan.warmup])
            session.push_frames(frames[plan.warmup :])
            seconds = session.stats.frame_seconds[plan.warmup :]
            start = time.perf_counter()
            for frame in frames[plan.warmup :]:
                process_video(frame[None], session.processor, fps=session.fps)
            preprocess = (time.perf_counter() - start) / plan.frames
            frame_s = statistics.mean(seconds)
            return dict(tokens_per_frame=session.tokens_per_frame, frames=plan.frames, fps=1 / frame_s,
                        frame_ms=frame_s * 1e3, preprocess_ms=preprocess * 1e3,
                        model_fps=1 / max(frame_s - preprocess, 1e-9), state_mib=session.state.nbytes / 2**20)

        run_case(results, "stream", plan, dict(recipe="infinitevl", frame_size=side,
                                               mode="compiled" if compile else "eager"), case)
    del model
    free_memory(plan, collect=True)


def prefill_section(plan: Plan, results: Results) -> None:
    """tokens/s of one forward over each prompt length, after a short warm-up prompt (kernel compiles)."""
    for name in ("infinitevl", "transformer"):
        model = build_decoder(name, plan)
        vocab = model.spec.vocab_size
        with torch.inference_mode():
            model(torch.randint(vocab, (1, min(plan.prefill_lengths)), device=plan.device))
        for length in plan.prefill_lengths:
            def case() -> dict:
                ids = torch.randint(vocab, (1, length), device=plan.device)
                seconds = timed(lambda: model(ids), dataclasses.replace(plan, warmup=0), repeats=2)
                return dict(seconds=seconds, tokens_per_s=length / seconds)

            run_case(results, "prefill", plan, dict(recipe=name, tokens=length), case)
        del model
        free_memory(plan, collect=True)


def ops_section(plan: Plan, results: Results) -> None:
    """Forward time of the chunked recurrent ops at the recipes' layer shapes (paper: GDN H = HV = 16,
    K = 128, V = 256; Mamba2 H = 64, P = 64, N = 128, G = 1), per backend that can run here."""
    layers = recipe("gdn", plan.size).layers + recipe("mamba2", plan.size).layers
    legend = {layer.mixer.type: layer.mixer for layer in layers}
    gdn, mamba = legend["gated_deltanet"], legend["mamba2"]
    length, device, dtype = plan.op_length, plan.device, plan.dtype
    backends = ["torch"] + (["fla"] if device == "cuda" and module_available("fla") else [])
    gen = torch.Generator(device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    h, hv, k, v = gdn.n_heads, gdn.value_heads, gdn.key_dim, gdn.value_dim
    gdn_inputs = (F.normalize(randn(1, length, h, k), dim=-1).to(dtype),
                  F.normalize(randn(1, length, h, k), dim=-1).to(dtype), randn(1, length, hv, v).to(dtype), F.logsigmoid(randn(1, length, hv)).to(dtype),
                  torch.sigmoid(randn(1, length, hv)).to(dtype))
    hm, groups = mamba.n_heads, mamba.n_groups
    ssd_inputs = (randn(1, length, hm, mamba.head_dim).to(dtype), F.softplus(randn(1, length, hm) - 2),
                  -torch.rand(hm, generator=gen, device=device) * 4 - 0.5,
                  randn(1, length, groups, mamba.d_state).to(dtype), randn(1, length, groups, mamba.d_state).to(dtype))
    channel = F.logsigmoid(randn(1, length, hv, k) + 3).to(dtype)  # per-channel decays: GLA, KDA
    gla_inputs = (*gdn_inputs[:3], channel)
    kda_inputs = (*gdn_inputs[:3], channel, gdn_inputs[4])
    for op, fn, inputs, chunk in (("gated_delta_rule", gated_delta_rule, gdn_inputs, gdn.chunk_size),
                                  ("ssd", ssd, ssd_inputs, mamba.chunk_size),
                                  ("gated_linear_attention (GLA)", gated_linear_attention, gla_inputs, 64),
                                  ("gated_delta_rule (KDA)", gated_delta_rule, kda_inputs, 64)):
        for backend in backends:
            def case() -> dict:
                with torch.inference_mode():
                    seconds = timed(lambda: fn(*inputs, backend=backend, chunk_size=chunk), plan)
                return dict(ms=seconds * 1e3, tokens_per_s=length / seconds)

            run_case(results, "ops", plan, dict(op=op, backend=backend, tokens=length, dtype=str(dtype)), case)


def fla_gated_deltanet(spec: LayoutSpec) -> torch.nn.Module:
    """fla's GatedDeltaNetForCausalLM with the shape of an all-Gated-DeltaNet SwiGLU spec: the same
    width, depth, heads, value expansion, short convolutions, MLP width, vocabulary and parameter count."""
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM

    mixers = {layer.mixer.model_dump_json() for layer in spec.layers}
    mlps = {layer.mlp.model_dump_json() for layer in spec.layers}
    first = spec.layers[0]
    if len(mixers) != 1 or first.mixer.type != "gated_deltanet" or len(mlps) != 1 or first.mlp.type != "swiglu":
        raise ValueError("fla_gated_deltanet: the spec's layers must all be one gated_deltanet mixer with one swiglu MLP")
    mixer = first.mixer
    config = GatedDeltaNetConfig(
        hidden_size=spec.d_model, num_hidden_layers=len(spec.layers), num_heads=mixer.n_heads, head_dim=mixer.head_dim,
        num_v_heads=mixer.n_v_heads, expand_v=mixer.expand_v, conv_size=mixer.conv_size, allow_neg_eigval=mixer.allow_neg_eigval,
        intermediate_size=first.mlp.hidden, hidden_ratio=None, norm_eps=spec.norm_eps, vocab_size=spec.vocab_size,
        tie_word_embeddings=spec.tie_embeddings, fuse_cross_entropy=False, use_cache=False)
    return GatedDeltaNetForCausalLM(config)


def training_step(model: torch.nn.Module, logits_of: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor,
                  device: str) -> Callable[[], None]:
    """One training step of `model` on ids [B, T + 1] (next-token loss): bf16-autocast forward, backward,
    gradient clipping at 1 and an AdamW update, as the studies' training loop does."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16):
            logits = logits_of(ids[:, :-1])  # [B, T, V]
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return step


def train_section(plan: Plan, results: Results) -> None:
    """Training tokens/s of the 2-layer MQAR models and the `small` recipes; all-Gated-DeltaNet ones also
    as fla's GatedDeltaNetForCausalLM (on CUDA with fla installed; the dry run checks its shape only)."""
    width, mqar_vocab, mqar_batch, mqar_length = plan.mqar_shape
    batch, length = plan.train_shape
    size = "small" if plan.device == "cuda" else "tiny"
    cases = [("mqar", name, build_spec(RunConfig(study="mqar", recipe=name, size="tiny", n_layers=2, d_model=width)),
              mqar_vocab, mqar_batch, mqar_length) for name in ("transformer", "swa", "gdn", "mamba2", "infinitevl")]
    cases += [(size, name, recipe(name, size), None, batch, length)
              for name in ("transformer", "swa", "gdn", "mamba2", "infinitevl")]
    fla_runs = plan.device == "cuda" and module_available("fla")
    with torch.inference_mode(False):
        for model_size, name, spec, vocab, rows, tokens in cases:
            if vocab is not None:
                spec = LayoutSpec.model_validate({**spec.model_dump(mode="json"), "vocab_size": vocab})
            contenders = {"mixerzoo": lambda spec=spec: _ours(spec)}
            if name == "gdn":
                peer_parameters = sum(p.numel() for p in fla_gated_deltanet(spec).parameters()) if module_available("fla") else None
                if peer_parameters is not None and peer_parameters != parameter_count(spec):
                    raise AssertionError(f"fla's {name} has {peer_parameters} parameters, ours {parameter_count(spec)}")
                if fla_runs:
                    contenders["fla"] = lambda spec=spec: _fla(spec)
            for implementation, build in contenders.items():
                def case() -> dict:
                    torch.manual_seed(0)
                    model, logits_of = build()
                    model.to(plan.device).train()
                    ids = torch.randint(spec.vocab_size, (rows, tokens + 1), device=plan.device)
                    seconds = timed(training_step(model, logits_of, ids, plan.device), plan)
                    return dict(ms_per_step=seconds * 1e3, tokens_per_s=rows * tokens / seconds,
                                parameters=parameter_count(spec))

                run_case(results, "train", plan, dict(model=f"{name} {model_size}", implementation=implementation,
                                                      batch=f"{rows} x {tokens}"), case)
            free_memory(plan, collect=True)


def _ours(spec: LayoutSpec) -> tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    model = Decoder(spec)
    return model, lambda ids: model(ids)[0]


def _fla(spec: LayoutSpec) -> tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    model = fla_gated_deltanet(spec)
    return model, lambda ids: model(input_ids=ids).logits


RUNNERS = {"graph": graph_section, "decode": decode_section, "stream": stream_section, "prefill": prefill_section,
           "ops": ops_section, "train": train_section, "stream-compiled": functools.partial(stream_section, compile=True)}


def describe(plan: Plan) -> str:
    """The plan, with the GPU run's paper-size parameter and state sizes (bf16) and what fits in 80 GB."""
    lines = [f"plan: size={plan.size} device={plan.device} dtype={plan.dtype} "
             f"contexts={[label(c) for c in plan.contexts]} "
             f"prefill={[label(n) for n in plan.prefill_lengths]} frames={plan.frame_sizes} x {plan.frames}",
             "GPU run, paper size, bf16 (weights + state at each decode context, GiB; an 80 GB H100 holds ~74 GiB):"]
    for name in ("infinitevl", "transformer", "mamba2-swa"):
        spec = recipe(name, "paper")
        weights = parameter_count(spec) * 2 / GIB
        states = ", ".join(f"{label(c)}: {state_nbytes(spec, c, dtype=torch.bfloat16) / GIB:.2f}" for c in GPU_PLAN.contexts)
        lines.append(f"  {name}: {parameter_count(spec) / 1e9:.2f}B params = {weights:.1f} GiB; state {states}")
    return "\n".join(lines)


def metadata(plan: Plan) -> dict:
    """Versions and the device, for the JSON header."""
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("triton", "fla-core", "flash-linear-attention", "flash-attn"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    device_name = torch.cuda.get_device_name() if plan.device == "cuda" else f"cpu ({platform.machine()})"
    return dict(device_name=device_name, plan=dataclasses.asdict(plan) | {"dtype": str(plan.dtype)},
                state_note="decode from random_state (not a prefill)", **versions)


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, print the plan and run the chosen sections."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("results/gpu_bench"),
                        help="directory of bench.json / bench.md")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU (automatic without CUDA)")
    args = parser.parse_args(argv)
    dry = args.dry_run or not torch.cuda.is_available()
    plan = DRY_PLAN if dry else GPU_PLAN
    print(("DRY RUN (tiny, CPU): " if dry else "") + describe(plan), flush=True)
    results = Results(args.out, metadata(plan))
    for section in args.sections:
        start = time.perf_counter()
        with torch.inference_mode():
            RUNNERS[section](plan, results)
        print(f"section {section}: {time.perf_counter() - start:.1f} s", flush=True)
    print(f"wrote {args.out / 'bench.json'} and {args.out / 'bench.md'}")


if __name__ == "__main__":
    sys.exit(main())
