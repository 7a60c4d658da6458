"""One registered tool call in a process of its own, so that stopping it stops it.

The Celery worker runs tasks on threads (jobs mostly wait, and gRPC does not
survive fork), and a thread cannot be stopped from outside: a tool that
overran its timeout, or whose graph was cancelled, would go on computing.
Each call therefore runs in a child interpreter (`python -m
services.controller.agents.sandbox NAME`, arguments as JSON on stdin, the
result as JSON on stdout) that is killed at its deadline or when `cancelled()`
says so. The child caps its own address space and dies with its parent.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import suppress

from shared.processes import die_with_parent

# Address space a tool call may use: plenty for text tools, and a runaway one fails instead of the host.
MEMORY_LIMIT_BYTES = 1 << 30
POLL_S = 0.05


class ToolCancelled(Exception):
    """The call was stopped because its caller gave up on it (a cancelled graph)."""


def run_tool_process(
    name: str,
    args: dict[str, str],
    timeout_s: float,
    cancelled: Callable[[], bool] = lambda: False,
    on_start: Callable[[int], None] = lambda _pid: None,
) -> str:
    """The tool's text; TimeoutError past `timeout_s`, ToolCancelled once `cancelled()`, RuntimeError with the
    tool's own message when it raised. The child is killed in the first two cases."""
    argv = [sys.executable, "-m", "services.controller.agents.sandbox", name]
    child = subprocess.Popen(
        die_with_parent(argv),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    on_start(child.pid)
    deadline = time.monotonic() + timeout_s
    request: bytes | None = json.dumps(args).encode()
    try:
        while True:
            try:
                out, err = child.communicate(request, timeout=POLL_S)
                break
            except subprocess.TimeoutExpired:
                request = None  # written already: later calls only read
            if cancelled():
                raise ToolCancelled(f"tool {name!r} was cancelled")
            if time.monotonic() > deadline:
                raise TimeoutError(f"tool {name!r} took over {timeout_s:g}s; stopped")
    finally:
        if child.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    try:
        reply = json.loads(out)
    except ValueError:
        raise RuntimeError(f"tool {name!r} died: {err.decode(errors='replace')[-300:] or child.returncode}") from None
    if "error" in reply:
        raise RuntimeError(reply["error"])
    return str(reply["text"])


def main() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    from services.controller.agents.tools import TOOLS

    name = sys.argv[1]
    args = json.loads(sys.stdin.read())
    try:
        reply = {"text": TOOLS[name](args)}
    except Exception as exc:  # the tool's failure is the caller's to report
        reply = {"error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(json.dumps(reply))


if __name__ == "__main__":
    main()
