"""The local stack as real processes, as `make run` starts it."""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cli.localstack import Endpoints, LocalStack, StackConfig
from cli.supervisor import Supervisor
from shared.processes import free_port


def worker_pid(worker_id: str) -> int:
    """The pid of the local worker process with this id (the controller started it, not us)."""
    marker = f"SHOAL_WORKER_WORKER_ID={worker_id}".encode()
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit() and marker in (proc / "environ").read_bytes().split(b"\0"):
                return int(proc.name)
    raise LookupError(f"no process for worker {worker_id}")


@contextmanager
def local_stack(model: Path, workers: list[tuple[str, str]], **env: str) -> Iterator[tuple[Endpoints, Supervisor]]:
    supervisor = Supervisor(grace_s=5)
    stack = LocalStack(
        StackConfig(model_path=model, router_port=free_port(), controller_port=free_port(), workers=workers, env=env),
        supervisor,
    )
    captured = io.StringIO()
    real_stdout, sys.stdout = sys.stdout, captured  # keep the services' logs out of the test report
    try:
        endpoints = stack.start()
        sys.stdout = real_stdout
        yield endpoints, supervisor
    finally:
        sys.stdout = real_stdout
        supervisor.stop_all()
