"""Where a sweep's runs execute: local worker processes, or Ray tasks on a cluster.

Both take one run at a time (`submit`), say when it is done (`ready`), give its rows back to the
driver (`result`), which alone writes the results folder, and stop everything at once (`stop`).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path
from typing import Any, Callable

RunOne = Callable[..., list]  # (study, run, scratch root or None) -> rows


def gpu_slots(jobs: int, gpus: int) -> list[int]:
    """The GPU of each of `jobs` workers, spread over `gpus` devices in turn (jobs // gpus per device)."""
    return [worker % gpus for worker in range(jobs)]


def _worker_init(gpus=None) -> None:
    """A pool worker: one torch thread; its own GPU when `gpus` (a queue of device indices) is given
    ("cuda" in its runs then means that device); Ctrl-C is its parent's to handle (it stops the
    workers); and it exits within a second if its parent dies, so a worker never outlives the sweep."""
    import signal
    import threading

    if gpus is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpus.get())  # before CUDA starts in this process
    import torch

    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def visible_gpus() -> int:
    """CUDA devices this process sees (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


class ProcessPool:
    """`jobs` spawned worker processes on this machine, one torch thread each; with `gpus`, each
    worker pinned to one of them in turn."""

    def __init__(self, run_one: RunOne, jobs: int, gpus: int = 0):
        context = multiprocessing.get_context("spawn")
        slots = None
        if gpus:
            slots = context.Queue()
            for index in gpu_slots(jobs, gpus):
                slots.put(index)
        self.run_one = run_one
        self.pool = context.Pool(jobs, initializer=_worker_init, initargs=(slots,))

    def submit(self, study, run, scratch_root: Path) -> Any:
        """Start one run; its handle."""
        return self.pool.apply_async(self.run_one, (study, run, scratch_root))

    def ready(self, handle) -> bool:
        """Whether the run has finished (or failed)."""
        return handle.ready()

    def result(self, handle) -> list:
        """The run's rows (raises the run's error)."""
        return handle.get()

    def stop(self) -> None:
        """Kill every worker now."""
        self.pool.terminate()

    def close(self) -> None:
        """Let the workers exit and wait for them."""
        self.pool.close()
        self.pool.join()


def _ray_task(run_one: RunOne, study, run) -> list:
    import torch

    torch.set_num_threads(1)
    return run_one(study, run, None)  # scratch in the worker's own temporary folder


class RayCluster:
    """Runs as Ray tasks: on the cluster RAY_ADDRESS names, else on a local one started here. A task
    asks for one GPU when its run is on cuda, else one CPU; its rows come back to the driver."""

    def __init__(self, run_one: RunOne):
        try:
            import ray
        except ImportError:
            raise ValueError("backend ray needs Ray: pip install -e '.[ray]'") from None
        self.ray, self.run_one = ray, run_one
        self.started = not ray.is_initialized()
        if self.started:
            ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
        self.task = ray.remote(_ray_task)
        self.pending: list = []

    def submit(self, study, run, scratch_root: Path) -> Any:
        """Submit one run as a task; its object reference."""
        on_gpu = (run.device or "cpu").startswith("cuda")
        ref = self.task.options(num_cpus=1, num_gpus=1 if on_gpu else 0).remote(self.run_one, study, run)
        self.pending.append(ref)
        return ref

    def ready(self, handle) -> bool:
        """Whether the task has finished (or failed)."""
        done, _ = self.ray.wait([handle], timeout=0)
        return bool(done)

    def result(self, handle) -> list:
        """The run's rows (raises the task's error)."""
        self.pending.remove(handle)
        return self.ray.get(handle)

    def stop(self) -> None:
        """Cancel every unfinished task, killing its worker."""
        for ref in self.pending:
            self.ray.cancel(ref, force=True)
        self.pending.clear()

    def close(self) -> None:
        """Shut down the local cluster this executor started (a running cluster stays)."""
        if self.started:
            self.ray.shutdown()
