"""The training loop shared by every stage: AdamW, warmup + cosine schedule, gradient clipping and
accumulation, bf16 autocast, progress bar, JSONL metrics, atomic checkpoints and exact resume.

Data order is a function of (seed, step) alone, so a resumed run sees the batches the
uninterrupted run would have seen, and its losses are bit-identical.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from tqdm import tqdm

from mixerzoo.errors import describe, read_yaml
from mixerzoo.mixers.base import atomic_write_bytes
from mixerzoo.optim import weight_decay_groups
from mixerzoo.train import distributed
from mixerzoo.train.config import TrainConfig, check_checkpoints_exist
from mixerzoo.train.data import Dataset, build_dataset, collate
from mixerzoo.train.models import build_model, decoder_of, save_model
from mixerzoo.train.params import apply_freezing, apply_lora, fold_lora
from mixerzoo.train.stages import StageLoss, total_loss

_CHECKPOINT_FORMAT = "mixerzoo.train_checkpoint/1"
# Fields a resumed run must share with the run that wrote the checkpoint (steps may grow; logging may change).
_RESUME_MUST_MATCH = ("stage", "student", "teacher", "data", "optim", "micro_batch_size", "grad_accum", "dtype",
                      "train", "lora", "temperature", "kl_direction", "layer_mse_weight", "seed")


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of the base lr at `step`: linear warmup, then cosine down to min_lr_ratio."""
    warmup, floor = config.optim.warmup_steps, config.optim.min_lr_ratio
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, config.steps - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def example_indices(step: int, n_examples: int, global_batch: int, seed: int) -> list[int]:
    """Dataset indices of the global batch at `step`: epochs of seeded permutations, read in order."""
    indices, position = [], step * global_batch
    while len(indices) < global_batch:
        epoch, offset = divmod(position, n_examples)
        order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        take = min(global_batch - len(indices), n_examples - offset)
        indices += order[offset:offset + take].tolist()
        position += take
    return indices


def _checkpoints(out_dir: Path) -> list[Path]:
    return sorted((out_dir / "checkpoints").glob("step_[0-9]*[0-9]"))


def _save_checkpoint(out_dir: Path, step: int, module, optimizer, scheduler, config: TrainConfig,
                     world: distributed.World) -> None:
    """Checkpoint after `step` steps: model, optimiser, scheduler, RNG and data position, in a
    temporary folder renamed into place (a crash never leaves a half-written checkpoint)."""
    model_state, optim_state = get_state_dict(module, optimizer,
                                              options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not world.is_main:
        return
    root = out_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".staging-"))
    torch.save({"format": _CHECKPOINT_FORMAT, "step": step, "examples_seen": step * global_batch_size(config, world),
                "model": model_state, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state(), "config": config.model_dump(mode="json")}, staging / "trainer.pt")
    digests = {path.name: _sha256(path) for path in sorted(staging.iterdir())}
    (staging / _DIGESTS).write_text(json.dumps(digests, indent=1))
    final = root / f"step_{step:06d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    for old in _checkpoints(out_dir)[:-config.keep_checkpoints]:
        shutil.rmtree(old)


_DIGESTS = "digests.json"  # sha256 of every other file of a checkpoint, written last


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _DamagedCheckpoint(Exception):
    """A checkpoint whose files are missing, unreadable or not what was written."""


def _verify(path: Path) -> None:
    """Raise _DamagedCheckpoint unless every file of checkpoint `path` matches the digest written with it."""
    try:
        digests = json.loads((path / _DIGESTS).read_text())
    except (OSError, ValueError) as error:
        raise _DamagedCheckpoint(f"its {_DIGESTS} is missing or unreadable ({describe(error)})") from None
    for name, expected in digests.items():
        if not (path / name).is_file():
            raise _DamagedCheckpoint(f"{name} is missing")
        if _sha256(path / name) != expected:
            raise _DamagedCheckpoint(f"{name} does not match its digest (its bytes changed after it was written)")


def _load_checkpoint(path: Path, module, optimizer, scheduler, config: TrainConfig) -> int:
    """Restore a checkpoint into the (wrapped) module, optimiser and scheduler, once its files match
    their digests; returns its step."""
    _verify(path)
    try:
        saved = torch.load(path / "trainer.pt", weights_only=True)
    except Exception as error:  # a truncated or overwritten file fails in pickle, zipfile or torch alike
        raise _DamagedCheckpoint(f"trainer.pt is unreadable ({type(error).__name__}: {describe(error)})") from error
    if not isinstance(saved, dict) or saved.get("format") != _CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a mixerzoo training checkpoint")
    differs = sorted(k for k in _RESUME_MUST_MATCH if saved["config"].get(k) != config.model_dump(mode="json").get(k))
    if differs:
        raise ValueError(f"{path}: the checkpoint was written by a run whose {differs} differ from this config's; "
                         "resume with the same config or train into a new out_dir")
    set_state_dict(module, optimizer, model_state_dict=saved["model"], optim_state_dict=saved["optimizer"],
                   options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"])
    return saved["step"]


def _resume(out_dir: Path, module, optimizer, scheduler, config: TrainConfig) -> int:
    """Restore the newest intact checkpoint in out_dir and return its step (0 without one).
    A damaged checkpoint (a file missing, unreadable or not matching its digest) is skipped with a
    warning naming it and why, and the next older one is tried; when every one is damaged, training
    stops with an error unless `restart_if_damaged` (then it starts again from step 0, saying so).
    A checkpoint of another config is an error. Staging folders a crash left are removed."""
    for staging in (out_dir / "checkpoints").glob(".staging-*"):
        shutil.rmtree(staging, ignore_errors=True)
    found = _checkpoints(out_dir)
    damaged = []
    for path in reversed(found):
        try:
            return _load_checkpoint(path, module, optimizer, scheduler, config)
        except _DamagedCheckpoint as error:
            damaged.append(f"{path.name}: {error}")
            warnings.warn(f"skipped checkpoint {path}: {error}; trying an older one", stacklevel=2)
    if found and not config.restart_if_damaged:
        raise ValueError(f"{out_dir / 'checkpoints'}: every checkpoint is damaged ({'; '.join(damaged)}); "
                         f"set restart_if_damaged: true to train again from step 0")
    if found:
        warnings.warn(f"every checkpoint in {out_dir / 'checkpoints'} is damaged: restarting from step 0 "
                      f"(restart_if_damaged)", stacklevel=2)
    return 0


def global_batch_size(config: TrainConfig, world: distributed.World) -> int:
    """Examples per optimiser step over all processes."""
    return config.micro_batch_size * config.grad_accum * world.size


def _micro_batches(dataset: Dataset, step: int, config: TrainConfig, world: distributed.World) -> list[dict]:
    """This process's collated micro-batches of the global batch at `step`."""
    indices = example_indices(step, len(dataset), global_batch_size(config, world), config.data.seed + config.seed)
    per_rank = config.micro_batch_size * config.grad_accum
    mine = indices[world.rank * per_rank:(world.rank + 1) * per_rank]
    pack = config.data.max_length if config.data.pack else None
    return [collate([dataset[i] for i in mine[k:k + config.micro_batch_size]], pack_length=pack)
            for k in range(0, per_rank, config.micro_batch_size)]


def _keep_metrics_until(path: Path, step: int) -> None:
    """Drop metric rows past `step` (written after the checkpoint a resume starts from)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = []
    for line in rows:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError):
            break  # a line cut by a crash ends the readable log
    atomic_write_bytes(path, "".join(f"{line}\n" for line in kept).encode())


def train(config: TrainConfig) -> dict[str, Any]:
    """Run one stage as `config` says, resuming from the newest checkpoint in out_dir if there is
    one; writes metrics.jsonl, checkpoints/ and the final model.safetensors. Returns a summary
    with the per-step losses of this run."""
    world = distributed.init_world(config.distributed)
    device = world.device
    out_dir = config.out_dir
    teacher = build_model(config.teacher) if config.teacher is not None else None
    if teacher is not None:
        teacher = teacher.to(device).eval().requires_grad_(False)
    student = build_model(config.student, teacher).to(device)
    if config.lora is not None:
        apply_lora(student, config.lora)
    trainable = apply_freezing(student, config.train_groups, teacher)
    processor = student.spec.processor if hasattr(student, "visual") else None
    dataset = build_dataset(config.data, vocab_size=decoder_of(student).spec.vocab_size, processor=processor)
    loss_module = StageLoss(config, student, teacher)
    module = distributed.wrap(loss_module, world, shard_units=list(decoder_of(student).layers))
    trained_parameters = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(weight_decay_groups(module, config.optim.weight_decay), lr=config.optim.lr,
                                  betas=config.optim.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))

    start = _resume(out_dir, module, optimizer, scheduler, config)
    metrics_path = out_dir / "metrics.jsonl"
    if world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _keep_metrics_until(metrics_path, start)

    weights = loss_module.weights
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.dtype == "bfloat16")
    losses: list[float] = []
    bar = tqdm(total=config.steps, initial=start, desc=config.stage, disable=not (config.progress and world.is_main))
    began = time.perf_counter()
    for step in range(start, config.steps):
        tick = time.perf_counter()
        batches = [{k: v.to(device) for k, v in b.items()} for b in _micro_batches(dataset, step, config, world)]
        batch_counts = [loss_module.counts(b) for b in batches]
        local = [sum(c[k] for c in batch_counts) for k in weights]
        counts = dict(zip(weights, distributed.all_sum(local, world)))
        sums = dict.fromkeys(weights, 0.0)
        for k, batch in enumerate(batches):
            with distributed.gradient_sync(module, world, enabled=k == len(batches) - 1), autocast:
                terms = module(batch)
                # DDP and FSDP average gradients over processes: scale by world size to get the global mean
                (total_loss(terms, weights, counts) * world.size).backward()
            for name in weights:
                sums[name] += float(terms[name].detach())
        grad_norm = None
        if config.optim.grad_clip is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trained_parameters, config.optim.grad_clip))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        global_sums = dict(zip(weights, distributed.all_sum([sums[k] for k in weights], world)))
        loss = sum(w * global_sums[k] / max(counts[k], 1) for k, w in weights.items())
        tokens = distributed.all_sum([float(sum(int(b["valid"].sum()) for b in batches))], world)[0]
        losses.append(loss)
        seconds = time.perf_counter() - tick
        if world.is_main:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / seconds:.0f}")
            if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                row = {"step": step + 1, "loss": loss, **{f"loss_{k}": global_sums[k] / max(counts[k], 1) for k in weights},
                       "lr": lr, "grad_norm": grad_norm, "tokens": tokens, "tokens_per_s": tokens / seconds,
                       "elapsed_s": time.perf_counter() - began, "threads": torch.get_num_threads()}
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            _save_checkpoint(out_dir, step + 1, module, optimizer, scheduler, config, world)
    bar.close()

    _save_final_model(student, module, config, world)
    distributed.close_world(world)
    return {"losses": losses, "rank": world.rank, "start_step": start, "steps": config.steps, "trainable": trainable,
            "out_dir": str(out_dir), "seconds": time.perf_counter() - began, "threads": torch.get_num_threads(),
            "final_loss": losses[-1] if losses else _last_logged_loss(metrics_path)}


def _last_logged_loss(path: Path) -> float | None:
    """The loss of the last row of a metrics.jsonl file (None without one)."""
    rows = path.read_text().splitlines() if path.exists() else []
    for line in reversed(rows):
        try:
            return float(json.loads(line)["loss"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    return None


def _save_final_model(student, module, config: TrainConfig, world: distributed.World) -> None:
    """out_dir/model.safetensors: the trained student with LoRA folded in, loadable by load_model."""
    model_state, _ = get_state_dict(module, [], options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not world.is_main:
        return
    state = {k[len("student."):]: v for k, v in model_state.items()}
    if config.lora is not None:
        state = fold_lora(state, config.lora)
    with torch.device("meta"):
        plain = type(student)(student.spec)
    plain.load_state_dict(state, strict=True, assign=True)
    save_model(plain, config.out_dir / "model.safetensors")


def run_stage(stage: str, config: TrainConfig | dict | str | os.PathLike) -> dict[str, Any]:
    """Train `stage` from a TrainConfig, a dict or a YAML path (whose `stage`, if given, must match)."""
    path = None
    if isinstance(config, (str, os.PathLike)):
        path, config = Path(config), read_yaml(config)
        if not isinstance(config, dict):
            raise ValueError(f"{path}: a TrainConfig YAML must be a mapping, got {type(config).__name__}")
    if isinstance(config, dict):
        try:
            config = TrainConfig.model_validate({"stage": stage, **config})
        except ValidationError as error:
            if path is None:
                raise
            raise ValueError(f"{path}: {describe(error)}") from None
    if config.stage != stage:
        raise ValueError(f"the config is for stage {config.stage!r}, not {stage!r}")
    check_checkpoints_exist(config, path.parent if path is not None else None)
    return train(config)


def distill_layers(config: TrainConfig | dict | str | os.PathLike) -> dict[str, Any]:
    """Stage 1a: per-layer teacher forcing, MSE of each created layer's output to the teacher's."""
    return run_stage("distill-layers", config)


def distill_logits(config: TrainConfig | dict | str | os.PathLike) -> dict[str, Any]:
    """Stage 1b: KL between student and teacher logits at temperature T (x T^2), optional layer MSE."""
    return run_stage("distill-logits", config)


def sft(config: TrainConfig | dict | str | os.PathLike) -> dict[str, Any]:
    """Stage 2: cross entropy on answer tokens, with the config's freezing policy."""
    return run_stage("sft", config)


def long_sft(config: TrainConfig | dict | str | os.PathLike) -> dict[str, Any]:
    """Stage 3: sft on packed long sequences (states reset per document), optionally with LoRA."""
    return run_stage("long-sft", config)
