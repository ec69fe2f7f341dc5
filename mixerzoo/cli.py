"""The `mixerzoo` command."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from mixerzoo.blocks import flops_per_token, parameter_count, state_nbytes
from mixerzoo.registry import SIZES, build_mixer, list_recipes, recipe
from mixerzoo.train.config import STAGES

_CONTEXTS = {"8K": 8192, "128K": 131072, "1M": 1048576}


def demo(context: int, window: int, d_model: int) -> None:
    """Stream `context` tokens through full and sliding-window attention in ragged chunks,
    then fork, save / load and decode, printing state sizes and decode latency."""
    torch.manual_seed(0)
    specs = {
        "full attention": {"type": "attention", "d_model": d_model, "n_heads": 4},
        f"sliding window {window}": {"type": "attention", "d_model": d_model, "n_heads": 4, "window": window},
    }
    print(f"streaming {context} tokens (d_model {d_model}) in chunks of 1..512, then 32 decode steps\n")
    print("| mixer | state bytes | predicted by config | fork == replay | save/load bit-exact | decode ms/token |")
    print("|---|---:|---:|:---:|:---:|---:|")
    for name, spec in specs.items():
        mixer = build_mixer(spec).eval()
        tokens = torch.randn(1, context + 1, d_model)
        state, start = None, 0
        with torch.inference_mode():
            while start < context:  # chunked prefill with ragged chunk sizes: same call as decode
                end = min(context, start + int(torch.randint(1, 513, ())))
                _, state = mixer(tokens[:, start:end], state)
                start = end
            fork = state.clone()
            y_fork, _ = mixer(tokens[:, context:], fork)
            y_replay, _ = mixer(tokens, None)
            with tempfile.TemporaryDirectory() as tmp:
                state.save(Path(tmp) / "state.safetensors", mixer.config)
                loaded = mixer.load_state(Path(tmp) / "state.safetensors")
            exact = torch.equal(mixer(tokens[:, context:], loaded)[0], y_fork)
            step = tokens[:, context:]
            begin = time.perf_counter()
            for _ in range(32):
                step, state = mixer(step, state)
            ms = (time.perf_counter() - begin) / 32 * 1e3
        replay_ok = torch.allclose(y_fork, y_replay[:, context:], atol=1e-4, rtol=1e-4)
        predicted = mixer.config.state_nbytes(context + 32)
        print(f"| {name} | {state.nbytes:,} | {predicted:,} | {replay_ok} | {exact} | {ms:.3f} |")


def recipes(size: str) -> None:
    """Print every recipe's parameters, state bytes (bf16 activations, float32 recurrent
    states) and decode FLOPs per token at 8K / 128K / 1M context, from the config alone."""
    header = " | ".join(f"state @{k}" for k in _CONTEXTS) + " | " + " | ".join(f"GFLOP/token @{k}" for k in _CONTEXTS)
    print(f"recipes at size {size!r} (computed from the spec on the meta device; nothing runs)\n")
    print(f"| recipe | layers | parameters | {header} |")
    print("|---|---|---:|" + "---:|" * (2 * len(_CONTEXTS)))
    for name in list_recipes():
        spec = recipe(name, size)
        letters = "".join(_letter(layer.mixer) for layer in spec.layers)
        states = " | ".join(_mib(state_nbytes(spec, n)) for n in _CONTEXTS.values())
        flops = " | ".join(f"{flops_per_token(spec, n) / 1e9:.2f}" for n in _CONTEXTS.values())
        print(f"| {name} | {letters} | {parameter_count(spec):,} | {states} | {flops} |")


def _letter(mixer) -> str:
    if mixer.type == "attention":
        return "F" if mixer.window is None else "S"
    return {"gated_deltanet": "G", "mamba2": "M"}.get(mixer.type, "?")


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.1f} MiB"


def stream(video: str, recipe_name: str, size: str, frame_size: int, fps: float, checkpoint: str | None) -> None:
    """Stream a video file through a VLM session frame by frame, with a progress bar, then
    print per-frame latency, FPS and state bytes."""
    from tqdm import tqdm

    from mixerzoo.vlm import VLM, StreamSession, load_vlm, read_video, vlm_recipe

    torch.manual_seed(0)
    model = load_vlm(checkpoint) if checkpoint else VLM(vlm_recipe(recipe_name, size)).eval()
    frames, _ = read_video(video, fps=fps)
    session = StreamSession(model, frame_size=frame_size, fps=fps)
    for frame in tqdm(frames, desc=f"{recipe_name}/{size}", unit="frame"):
        session.push_frames(frame[None])
    stats = session.stats
    latencies = sorted(stats.frame_seconds)
    print("\n| model | frames | tokens/frame | FPS | median ms/frame | p95 ms/frame | state bytes first | last |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {checkpoint or recipe_name + '/' + size} | {stats.frames} | {session.tokens_per_frame} | {stats.fps:.1f} | "
          f"{latencies[len(latencies) // 2] * 1e3:.1f} | {latencies[int(len(latencies) * 0.95)] * 1e3:.1f} | "
          f"{stats.state_nbytes[0]:,} | {stats.state_nbytes[-1]:,} |")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `mixerzoo` command."""
    parser = argparse.ArgumentParser(prog="mixerzoo", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="a small demo of the recurrent-state protocol")
    demo_parser.add_argument("--context", type=int, default=4096)
    demo_parser.add_argument("--window", type=int, default=256)
    demo_parser.add_argument("--d-model", type=int, default=128)
    recipes_parser = commands.add_parser("recipes", help="every recipe with its costs, without building it")
    recipes_parser.add_argument("--size", choices=SIZES, default="paper")
    stream_parser = commands.add_parser("stream", help="stream a video file through a VLM session")
    stream_parser.add_argument("video")
    stream_parser.add_argument("--recipe", default="infinitevl")
    stream_parser.add_argument("--size", choices=SIZES, default="tiny")
    stream_parser.add_argument("--frame-size", type=int, default=448, help="frames are resized to this square")
    stream_parser.add_argument("--fps", type=float, default=2.0, help="frames sampled per second of video")
    stream_parser.add_argument("--checkpoint", help="a VLM saved with mixerzoo.vlm.save_vlm (default: random weights)")
    ablate_parser = commands.add_parser("ablate", help="run an ablation experiment YAML (resumable), print its table(s)")
    ablate_parser.add_argument("experiment", help="experiment YAML (see experiments/efficiency.yaml); several "
                                                  "experiments in one file, separated by ---, run in order")
    ablate_parser.add_argument("--out", default="results", help="results root; writes OUT/<name>/")
    ablate_parser.add_argument("--scale", type=float, help="override the experiment's scale")
    ablate_parser.add_argument("--jobs", type=int, default=1,
                               help="runs at once, each a process with one thread (default 1; 2 on a 2-core machine)")
    for stage in STAGES:
        stage_parser = commands.add_parser(stage, help=f"training stage {stage} (run under torchrun for several processes)")
        stage_parser.add_argument("config", help="a TrainConfig YAML (see experiments/train/)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo(args.context, args.window, args.d_model)
    elif args.command == "recipes":
        recipes(args.size)
    elif args.command == "stream":
        stream(args.video, args.recipe, args.size, args.frame_size, args.fps, args.checkpoint)
    elif args.command in STAGES:
        from mixerzoo.train import run_stage

        summary = run_stage(args.command, args.config)
        if summary["rank"] == 0:
            print(f"{args.command}: steps {summary['start_step']}..{summary['steps']}, final loss "
                  f"{summary['losses'][-1] if summary['losses'] else float('nan'):.4f}, model in {summary['out_dir']}")
    elif args.command == "ablate":
        from mixerzoo.ablate.runner import ablate

        print(ablate(args.experiment, args.out, scale=args.scale, jobs=args.jobs), end="")


if __name__ == "__main__":
    main()
