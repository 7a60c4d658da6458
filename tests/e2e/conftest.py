"""The local stack as real processes, as `make run` starts it."""

from __future__ import annotations

import contextlib
from pathlib import Path

from cli.localstack import local_stack

__all__ = ["local_stack", "worker_pid"]


def worker_pid(worker_id: str) -> int:
    """The pid of the local worker process with this id (the controller started it, not us)."""
    marker = f"SHOAL_WORKER_WORKER_ID={worker_id}".encode()
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit() and marker in (proc / "environ").read_bytes().split(b"\0"):
                return int(proc.name)
    raise LookupError(f"no process for worker {worker_id}")
