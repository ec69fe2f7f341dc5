"""torchrun integration: process group from the environment, DDP / FSDP2 wrapping, gradient-sync
control for accumulation, and reductions that are no-ops in a single process."""

from __future__ import annotations

import contextlib
import dataclasses
import os

import torch
import torch.distributed as dist
from torch import nn


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place: rank, world size and the wrapping strategy in use."""

    rank: int = 0
    size: int = 1
    strategy: str = "none"  # "none" | "ddp" | "fsdp"
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and prints."""
        return self.rank == 0


def init_world(strategy: str) -> World:
    """Join torchrun's process group when WORLD_SIZE is set: each process takes the GPU of its
    LOCAL_RANK with nccl when there is one per process, else the CPU with gloo.
    strategy "auto" is "ddp" with several processes and "none" with one."""
    size, local_rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cpu")
    if torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", "1")):
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if strategy == "auto":
        strategy = "ddp" if size > 1 else "none"
    if strategy != "none" and size == 1 and not dist.is_initialized():
        raise ValueError(f"distributed: {strategy!r} needs torchrun (WORLD_SIZE is not set)")
    return World(dist.get_rank() if dist.is_initialized() else 0, size, strategy, device)


def wrap(module: nn.Module, world: World, shard_units: list[nn.Module]) -> nn.Module:
    """`module` under DDP, or sharded with FSDP2's fully_shard (each of `shard_units`, then the
    root), or unchanged."""
    if world.strategy == "ddp":
        return nn.parallel.DistributedDataParallel(module, find_unused_parameters=False)
    if world.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for unit in shard_units:
            fully_shard(unit)
        fully_shard(module)
    return module


@contextlib.contextmanager
def gradient_sync(module: nn.Module, world: World, enabled: bool):
    """Skip the gradient all-reduce inside the context unless `enabled` (accumulation steps)."""
    if world.strategy == "ddp" and not enabled:
        with module.no_sync():
            yield
        return
    if world.strategy == "fsdp":
        module.set_requires_gradient_sync(enabled)
    yield


def all_sum(values: list[float], world: World) -> list[float]:
    """Elementwise sum of `values` over every process (float64)."""
    if world.size == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def close_world(world: World) -> None:
    """Leave the process group."""
    if world.size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
