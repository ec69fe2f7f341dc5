"""A results folder shared by processes: one lock around its bookkeeping, and claims on runs.

Several `ablate` processes may run one experiment into one folder: each claims a run before it
starts it (a file `.claims/<run_key>` naming the process), skips runs that are done or claimed by a
live process, and reclaims the run of a claimant that died. Reading, repairing and appending
`runs.jsonl` happen under the folder's lock, so no process ever drops a row another one wrote.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from mixerzoo.mixers.base import atomic_write_bytes


def _alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


class ResultsFolder:
    """The lock and the run claims of one experiment's results folder."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.claims = self.path / ".claims"
        self.claims.mkdir(exist_ok=True)
        self.me = {"pid": os.getpid(), "host": socket.gethostname()}

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the folder's lock (blocking; released on exit, and by the OS if the process dies)."""
        with open(self.path / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def holder(self, key: str) -> dict | None:
        """Who claims run `key`, if a live process (on this machine, or any on another) does."""
        try:
            claim = json.loads((self.claims / key).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        if claim.get("host") == self.me["host"] and not _alive(int(claim.get("pid", -1))):
            return None  # its claimant died: the run is free again
        return claim

    def claim(self, key: str) -> bool:
        """Claim run `key` for this process unless another live process holds it (call under `locked`)."""
        holder = self.holder(key)
        if holder is not None and holder.get("pid") != self.me["pid"]:
            return False
        atomic_write_bytes(self.claims / key, json.dumps({**self.me, "since": time.time()}).encode())
        return True

    def release(self, key: str) -> None:
        """Drop this process's claim on run `key`."""
        holder = self.holder(key)
        if holder is not None and holder.get("pid") == self.me["pid"]:
            (self.claims / key).unlink(missing_ok=True)

    def busy_elsewhere(self, keys: set[str]) -> dict[str, dict]:
        """The runs among `keys` that another live process holds, with their claims."""
        held = {key: self.holder(key) for key in keys}
        return {key: claim for key, claim in held.items() if claim and claim.get("pid") != self.me["pid"]}
