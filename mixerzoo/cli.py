"""The `mixerzoo` command.

A user error (bad YAML, an unknown name, a missing or damaged file, a bad value) prints one
line, `mixerzoo: error: ...`, and exits with status 1 (2 for a bad command line); `--debug`
shows the traceback instead. Every command takes `--threads` (torch intra-op threads); the
default is 1 for models under 100M parameters (SMALL_MODEL_PARAMETERS), where more threads on a
shared machine only add contention, and torch's own default above that.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch

from mixerzoo.blocks.costs import BYTE_UNITS, FLOP_UNITS, flops_per_token, in_units, parameter_count, state_nbytes
from mixerzoo.errors import describe, read_yaml
from mixerzoo.registry import SIZES, build_mixer, list_recipes, recipe
from mixerzoo.train.config import STAGES, TrainConfig

_CONTEXTS = {"8K": 8192, "128K": 131072, "1M": 1048576}
SMALL_MODEL_PARAMETERS = 100_000_000  # tiny (~0.3M) and small (~30M) recipes run fastest on one thread
_TORCH_DEFAULT_THREADS = torch.get_num_threads()
# What a user can fix: bad values, names, files, YAML. Anything else is reported as an internal error.
_USER_ERRORS = (ValueError, KeyError, OSError, ImportError)


def default_threads(parameters: int) -> int:
    """Threads for a model of `parameters` parameters: 1 below SMALL_MODEL_PARAMETERS, else torch's default."""
    return 1 if parameters < SMALL_MODEL_PARAMETERS else _TORCH_DEFAULT_THREADS


def use_threads(requested: int | None, parameters: int) -> int:
    """Set torch's intra-op threads to `requested`, or to `default_threads(parameters)`; returns the count."""
    torch.set_num_threads(requested or default_threads(parameters))
    return torch.get_num_threads()


def demo(context: int, window: int, d_model: int, threads: int | None = None) -> None:
    """Stream `context` tokens through full and sliding-window attention in ragged chunks,
    then fork, save / load and decode, printing state sizes and decode latency."""
    torch.manual_seed(0)
    specs = {
        "full attention": {"type": "attention", "d_model": d_model, "n_heads": 4},
        f"sliding window {window}": {"type": "attention", "d_model": d_model, "n_heads": 4, "window": window},
    }
    mixers = {name: build_mixer(spec).eval() for name, spec in specs.items()}
    count = use_threads(threads, max(sum(p.numel() for p in m.parameters()) for m in mixers.values()))
    print(f"streaming {context} tokens (d_model {d_model}) in chunks of 1..512, then 32 decode steps; "
          f"{count} thread(s)\n")
    print("| mixer | state bytes | predicted by config | fork == replay | save/load bit-exact | decode ms/token |")
    print("|---|---:|---:|:---:|:---:|---:|")
    for name, mixer in mixers.items():
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
    states) and decode FLOPs per token at 8K / 128K / 1M context, from the config alone,
    each cell in the unit that suits its value."""
    header = " | ".join(f"state @{k}" for k in _CONTEXTS) + " | " + " | ".join(f"FLOPs/token @{k}" for k in _CONTEXTS)
    print(f"recipes at size {size!r} (computed from the spec on the meta device; nothing runs)\n")
    print(f"| recipe | layers | parameters | {header} |")
    print("|---|---|---:|" + "---:|" * (2 * len(_CONTEXTS)))
    for name in list_recipes():
        spec = recipe(name, size)
        letters = "".join(_letter(layer.mixer) for layer in spec.layers)
        states = [in_units(state_nbytes(spec, n, dtype=torch.bfloat16), BYTE_UNITS) for n in _CONTEXTS.values()]
        flops = [in_units(flops_per_token(spec, n), FLOP_UNITS) for n in _CONTEXTS.values()]
        print(f"| {name} | {letters} | {parameter_count(spec):,} | " + " | ".join(states + flops) + " |")


def _letter(mixer) -> str:
    if mixer.type == "attention":
        return "F" if mixer.window is None else "S"
    return {"gated_deltanet": "G", "mamba2": "M"}.get(mixer.type, "?")


def peak_rss_mib() -> float:
    """The peak resident memory of this process so far, MiB (getrusage; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stream(video: str, recipe_name: str, size: str, frame_size: int, fps: float, checkpoint: str | None,
           threads: int | None = None, compile: bool = False) -> None:
    """Stream a video file through a VLM session, decoding and prefilling one frame at a time
    (memory stays flat with the video's length), with a progress bar; then print frames,
    per-frame prefill latency, FPS over the wall time (what the progress bar shows), state bytes, peak
    resident memory and the thread count. compile=True runs each frame as one compiled program (the
    first frame compiles it; full-attention caches are sized for the whole video)."""
    from tqdm import tqdm

    from mixerzoo.vlm import VLM, StreamSession, VideoFrames, load_vlm, vlm_recipe

    torch.manual_seed(0)
    frames = VideoFrames(video, fps=fps)
    model = load_vlm(checkpoint) if checkpoint else VLM(vlm_recipe(recipe_name, size)).eval()
    count = use_threads(threads, sum(p.numel() for p in model.parameters()))
    factor = model.spec.processor.patch_size * model.spec.processor.merge_size
    most = (frame_size // factor) ** 2 + 2  # tokens a frame adds at most (start and end included)
    capacity = frames.frames * most if compile and frames.frames else None
    session = StreamSession(model, frame_size=frame_size, fps=frames.fps, compile=compile, capacity=capacity)
    start = time.perf_counter()
    for frame in tqdm(frames, total=frames.frames, desc=f"{recipe_name}/{size}", unit="frame"):
        session.push_frames([frame])
    wall = time.perf_counter() - start  # decoding the video included, as the progress bar counts
    stats = session.stats
    if not stats.frames:
        raise ValueError(f"{video}: no frames decoded")
    latencies = sorted(stats.frame_seconds)
    print("\n| model | frames | tokens/frame | FPS (wall, as the bar) | median prefill ms/frame | p95 | state bytes first | last "
          "| peak RSS MiB | threads |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {checkpoint or recipe_name + '/' + size} | {stats.frames} | {session.tokens_per_frame} | "
          f"{stats.frames / wall:.1f} | "
          f"{latencies[len(latencies) // 2] * 1e3:.1f} | {latencies[int(len(latencies) * 0.95)] * 1e3:.1f} | "
          f"{stats.state_nbytes[0]:,} | {stats.state_nbytes[-1]:,} | {peak_rss_mib():.0f} | {count} |")


def train_stage(stage: str, config: str, threads: int | None = None) -> None:
    """Run a training stage from its YAML and print what it did: steps, final loss, threads, where the model is."""
    from mixerzoo.train import run_stage

    count = use_threads(threads, _stage_parameters(config, stage))
    summary = run_stage(stage, config)
    if summary["rank"] != 0:
        return
    loss = "none logged" if summary["final_loss"] is None else f"{summary['final_loss']:.4f}"
    if summary["start_step"] >= summary["steps"]:
        print(f"{stage}: already trained to step {summary['steps']}, nothing to do (final loss {loss}); "
              f"model in {summary['out_dir']}")
    else:
        print(f"{stage}: steps {summary['start_step']}..{summary['steps']}, final loss {loss}, {count} thread(s), "
              f"model in {summary['out_dir']}")


def _stage_parameters(path: str, stage: str) -> int:
    """About how many parameters the stage's largest model has (0 if the YAML does not validate:
    run_stage then reports why): recipes counted from their spec, checkpoints from their float32 bytes."""
    try:
        config = TrainConfig.model_validate({"stage": stage, **read_yaml(path)})
    except (ValueError, OSError, TypeError):
        return 0
    counts = [0]
    for source in (config.student, config.teacher):
        if source is not None and source.checkpoint is not None and source.checkpoint.is_file():
            counts.append(source.checkpoint.stat().st_size // 4)
        elif source is not None and source.recipe in list_recipes():
            counts.append(parameter_count(recipe(source.recipe, source.size)))
    return max(counts)


def ablate(path: str, out: str, scale: float | None, dry: bool, threads: int | None = None, jobs: int | None = None,
           device: str | None = None, dtype: str | None = None, jobs_per_gpu: int = 1, backend: str = "local",
           only: list[str] | None = None) -> None:
    """Run (or with `dry` list) the experiments of an ablation YAML (those named in `only`, if given) and print
    their tables; `jobs` runs at once, each in its own process with one thread (by default one, or one per
    GPU on cuda)."""
    from mixerzoo.ablate.runner import ablate as run_ablation, dry_run, expand, load_experiments
    from mixerzoo.ablate.studies import build_spec

    experiments = load_experiments(path, scale=scale, device=device, dtype=dtype, only=only)  # every run validated first
    largest = max(parameter_count(build_spec(run)) for e in experiments for run in expand(e))
    count = use_threads(threads, largest)
    if dry:
        print(dry_run(path, out, scale=scale, device=device, dtype=dtype, only=only), end="")
        return
    print(f"{count} thread(s)" if jobs in (None, 1) else f"{jobs} jobs of 1 thread each", file=sys.stderr)
    print(run_ablation(path, out, scale=scale, jobs=jobs, device=device, dtype=dtype, jobs_per_gpu=jobs_per_gpu,
                       backend=backend, only=only), end="")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def thread_count(text: str) -> int:
    """argparse type: an integer from 1 to this machine's logical CPUs (more only oversubscribes, and a
    huge count crashes torch's thread pool)."""
    value = positive_int(text)
    cpus = os.cpu_count() or 1
    if value > cpus:
        raise argparse.ArgumentTypeError(f"must be at most {cpus} (this machine's logical CPUs), got {value}")
    return value


def device_name(text: str) -> str:
    """argparse type: cpu, cuda or cuda:N."""
    from mixerzoo.ablate.studies import DEVICE_PATTERN

    if not re.fullmatch(DEVICE_PATTERN, text):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}")
    return text


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line: `mixerzoo: error: ...` (exit status 2)."""

    def error(self, message: str):
        command = self.prog.removeprefix("mixerzoo").strip()
        self.exit(2, f"mixerzoo: error: {command + ': ' if command else ''}{message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The `mixerzoo` argument parser: one subcommand per task, each with --threads and --debug."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--threads", type=thread_count, help="torch intra-op threads (default: 1 for models under "
                        f"{SMALL_MODEL_PARAMETERS // 10**6}M parameters, else torch's default); printed with each run")
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser = _Parser(prog="mixerzoo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", parents=[common], help="a small demo of the recurrent-state protocol")
    demo_parser.add_argument("--context", type=positive_int, default=4096,
                             help="tokens streamed through each mixer before the fork and decode (default 4096)")
    demo_parser.add_argument("--window", type=positive_int, default=256,
                             help="the sliding-window mixer's window in tokens (default 256)")
    demo_parser.add_argument("--d-model", type=positive_int, default=128, help="width of both mixers (default 128)")
    recipes_parser = commands.add_parser("recipes", parents=[common], help="every recipe with its costs, without building it")
    recipes_parser.add_argument("--size", choices=SIZES, default="paper")
    commands.add_parser("mixers", parents=[common],
                        help="the config reference: every mixer type's fields (plugins included), layouts, experiments, "
                             "training configs")
    stream_parser = commands.add_parser("stream", parents=[common], help="stream a video file through a VLM session")
    stream_parser.add_argument("video")
    stream_parser.add_argument("--recipe", default="infinitevl")
    stream_parser.add_argument("--size", choices=SIZES, default="tiny")
    stream_parser.add_argument("--frame-size", type=positive_int, default=224,
                               help="frames are resized to this square (224: 64 visual tokens per frame)")
    stream_parser.add_argument("--fps", type=positive_float, default=2.0, help="frames sampled per second of video")
    stream_parser.add_argument("--checkpoint", help="a VLM saved with mixerzoo.vlm.save_vlm (default: random weights)")
    stream_parser.add_argument("--compile", action="store_true",
                               help="run each frame as one compiled program (torch.compile; the first frame compiles)")
    ablate_parser = commands.add_parser("ablate", parents=[common],
                                        help="run an ablation experiment YAML (resumable), print its table(s)")
    ablate_parser.add_argument("experiment", help="experiment YAML (see experiments/efficiency.yaml); several "
                                                  "experiments in one file, separated by ---, run in order")
    ablate_parser.add_argument("--out", default="results", help="results root; writes OUT/<name>/")
    ablate_parser.add_argument("--scale", type=positive_float, help="override the experiment's scale")
    ablate_parser.add_argument("--only", nargs="+", metavar="NAME",
                               help="run (or cost) only the experiments of these names (every document still validated)")
    ablate_parser.add_argument("--jobs", type=positive_int,
                               help="runs at once, each a process with one thread (default 1: one run using "
                                    "--threads; set it to your core count to fill the machine with independent runs; "
                                    "on cuda, default one per visible GPU)")
    ablate_parser.add_argument("--jobs-per-gpu", type=positive_int, default=1,
                               help="on cuda without --jobs: runs sharing each GPU (small models; default 1)")
    ablate_parser.add_argument("--device", type=device_name,
                               help="every run's device (default: the experiment's, else cpu); runs on cuda spread "
                                    "over the visible GPUs, one per worker")
    ablate_parser.add_argument("--backend", choices=["local", "ray"], default="local",
                               help="local: this machine's processes (default); ray: each run a Ray task on the "
                                    "cluster RAY_ADDRESS names, else on a local one (pip install -e '.[ray]')")
    ablate_parser.add_argument("--dtype", choices=["float32", "bfloat16"],
                               help="every run's precision: float32 (default) or bfloat16 autocast, recurrent "
                                    "states float32")
    ablate_parser.add_argument("--dry-run", action="store_true",
                               help="print the expanded runs, which are done, and the estimated cost; run nothing")
    for stage in STAGES:
        stage_parser = commands.add_parser(stage, parents=[common],
                                           help=f"training stage {stage} (run under torchrun for several processes)")
        stage_parser.add_argument("config", help="a TrainConfig YAML (see experiments/train/)")
    return parser


def run(args: argparse.Namespace) -> None:
    """Run the parsed command."""
    if args.command == "demo":
        demo(args.context, args.window, args.d_model, args.threads)
    elif args.command == "recipes":
        use_threads(args.threads, 0)
        recipes(args.size)
    elif args.command == "mixers":
        from mixerzoo.reference import config_reference

        print(config_reference(), end="")
    elif args.command == "stream":
        stream(args.video, args.recipe, args.size, args.frame_size, args.fps, args.checkpoint, args.threads,
               args.compile)
    elif args.command in STAGES:
        train_stage(args.command, args.config, args.threads)
    elif args.command == "ablate":
        ablate(args.experiment, args.out, args.scale, args.dry_run, args.threads, args.jobs, args.device, args.dtype,
               args.jobs_per_gpu, args.backend, args.only)


def _is_user_error(error: BaseException | None) -> bool:
    """True if the error, or one it was raised from (e.g. a failed ablation run), is a user error."""
    while error is not None:
        if isinstance(error, _USER_ERRORS):
            return True
        error = error.__cause__
    return False


def _terminated(signum, frame) -> None:
    raise KeyboardInterrupt("terminated (SIGTERM)")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `mixerzoo` command."""
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminated)  # SIGTERM stops as Ctrl-C does: cleanly
    try:
        run(args)
    except KeyboardInterrupt as stop:
        if args.debug:
            raise
        print(f"mixerzoo: {stop.args[0] if stop.args else 'interrupted'}; finished results are kept",
              file=sys.stderr)
        sys.exit(143 if stop.args else 130)
    except Exception as error:
        if args.debug:
            raise
        if _is_user_error(error):
            sys.exit(f"mixerzoo: error: {describe(error)}")
        sys.exit(f"mixerzoo: error: internal error, {type(error).__name__}: {describe(error)} "
                 f"(rerun with --debug for the traceback)")
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    main()
