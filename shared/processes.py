"""Child processes that never outlive their parent, with prefixed output.

Used by `make run`'s supervisor and by the controller's local actuator. Each
child runs in its own session (so a terminal's Ctrl-C reaches only the
parent, which then stops children in order) and asks the kernel to SIGTERM it
if the parent dies (PR_SET_PDEATHSIG, set by util-linux's `setpriv` before it
execs the command), so no orphan survives even a SIGKILL of the parent.
Output lines are copied to the parent's stdout behind a `name |` prefix.

No Python code runs between fork and exec: a `preexec_fn` would, and in a
process with gRPC or asyncio threads the child can crash in Python's
after-fork hooks before it ever reaches exec.
"""

from __future__ import annotations

import ctypes
import gc
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import uvloop

from shared.state import acl

_COLORS = ("36", "33", "35", "32", "34", "31", "96", "93", "95", "92")


def die_with_parent(argv: Sequence[str]) -> list[str]:
    """`argv` behind `setpriv --pdeathsig`, where the system has it (Linux)."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return list(argv)  # not Linux: the parent's own shutdown still stops children
    return [setpriv, "--pdeathsig", "TERM", "--", *argv]


# The lowest port free_port draws from; it draws below the kernel's ephemeral range.
_LOWEST_PICK = 20000


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now on `host`, for a process to bind later.

    Drawn at random from below the kernel's ephemeral range, which bind(0) and
    outgoing connections take from: until the process binds it, another
    process's bind(0) (a worker's metrics port) or client socket cannot take it."""
    highest = _ephemeral_low() - 1
    for _ in range(64 if highest > _LOWEST_PICK else 0):
        port = random.randint(_LOWEST_PICK, highest)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # no room below the range: the kernel's pick
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; other systems start higher


@dataclass
class ManagedProcess:
    name: str
    popen: subprocess.Popen[bytes]
    started_at: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def terminate(self, grace_s: float = 10.0) -> int:
        """SIGTERM, wait up to `grace_s`, then SIGKILL the whole session. Returns the exit code."""
        if self.alive():
            self._signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.popen.wait(timeout=5)
        # Grandchildren (a service's own helpers) share the session: clean them up.
        self._signal(signal.SIGKILL)
        return int(self.popen.returncode)

    def _signal(self, sig: signal.Signals) -> None:
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)


_color_index = 0
_print_lock = threading.Lock()


def _pump(name: str, stream: IO[bytes], out: IO[str], color: str) -> None:
    prefix = f"\x1b[{color}m{name:>16} |\x1b[0m " if out.isatty() else f"{name:>16} | "
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace").rstrip("\n")
        with _print_lock:
            out.write(prefix + line + "\n")
            out.flush()
    stream.close()


def spawn(
    name: str,
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    out: IO[str] | None = None,
) -> ManagedProcess:
    """Start `argv` as a managed child whose output is prefixed with `name`."""
    global _color_index
    color = _COLORS[_color_index % len(_COLORS)]
    _color_index += 1
    full_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    popen = subprocess.Popen(
        die_with_parent(argv),
        env=full_env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    assert popen.stdout is not None
    threading.Thread(
        target=_pump, args=(name, popen.stdout, out or sys.stdout, color), daemon=True, name=f"pump-{name}"
    ).start()
    return ManagedProcess(name, popen)


def redis_server_argv(
    port: int,
    data_dir: str,
    persistent: bool = False,
    password: str | None = None,
    users: Mapping[str, str] | None = None,
) -> list[str]:
    """Command line of a loopback-only redis-server on `port`, with data in `data_dir`, asking for `password`
    (the `default` user) and, given `users` (name -> password), with each service's ACL user.

    Passwords go in a config file only the owner can read (written to `data_dir`), not on the command
    line, where every local user would see them in the process list."""
    argv = ["redis-server"]
    if password:
        config = os.path.join(data_dir, "redis-auth.conf")
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(f'requirepass "{password}"\n')
            if users:
                out.write(acl.users_with(users))
        argv.append(config)
    argv += ["--port", str(port), "--bind", "127.0.0.1", "--dir", data_dir]
    argv += ["--save", "", "--appendonly", "yes" if persistent else "no", "--protected-mode", "yes"]
    return argv


def wait_for_port(host: str, port: int, timeout_s: float, process: ManagedProcess | None = None) -> None:
    """Wait until something accepts TCP connections on host:port, or raise TimeoutError."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and not process.alive():
            raise RuntimeError(f"{process.name} exited with code {process.popen.returncode} while starting")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listened on {host}:{port} within {timeout_s}s")


# Young-generation collections every this many net allocations (CPython's default: 700). A server
# allocates in bursts per request; at the default it spends several percent of its time collecting.
GC_YOUNG_THRESHOLD = 50_000


# glibc serves allocations above its threshold with fresh mmap()ed pages, zeroed by the kernel page by
# page, and returns them on free. KV payloads (megabytes, one buffer per block moved) would pay a page
# fault per 4 KiB each time; kept in the heap, freed buffers are reused as they are.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MALLOC_MMAP_THRESHOLD = 64 * 2**20


def keep_big_buffers_in_the_heap() -> None:
    with suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, 4 * MALLOC_MMAP_THRESHOLD)


def run_service(main: Coroutine[Any, Any, None]) -> None:
    """Run a service's main coroutine until it returns, on uvloop, with the garbage collector set
    for a long-lived server: what start-up built (modules, settings, the app) is frozen out of every
    collection, and young collections are rarer. Big buffers are kept in the heap (see above)."""
    keep_big_buffers_in_the_heap()
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    uvloop.run(main)
