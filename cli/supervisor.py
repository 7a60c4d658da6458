"""A small process supervisor: start services in order, prefix their output,
stop them all on Ctrl-C or SIGTERM, and stop everything if one dies.

Children run in their own sessions and die with the supervisor
(shared/processes.py), so no process outlives `make run`.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType

from shared.processes import ManagedProcess, spawn


class StartupError(RuntimeError):
    pass


@dataclass(frozen=True)
class _Spec:
    argv: Sequence[str]
    env: Mapping[str, str] | None
    ready: Callable[[], bool] | None
    timeout_s: float


class Supervisor:
    def __init__(self, grace_s: float = 15.0) -> None:
        self.grace_s = grace_s
        self.processes: list[ManagedProcess] = []
        self._specs: dict[str, _Spec] = {}
        self._stop = threading.Event()

    def start(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        ready: Callable[[], bool] | None = None,
        timeout_s: float = 120.0,
    ) -> ManagedProcess:
        """Start a process and wait until `ready()` is true (or it dies, or time runs out)."""
        process = spawn(name, argv, env)
        self.processes.append(process)
        self._specs[name] = _Spec(argv, env, ready, timeout_s)
        deadline = time.monotonic() + timeout_s
        while ready is not None and not ready():
            if not process.alive():
                raise StartupError(f"{name} exited with code {process.popen.returncode} while starting")
            if time.monotonic() > deadline or self._stop.is_set():
                raise StartupError(f"{name} was not ready within {timeout_s:.0f}s")
            time.sleep(0.2)
        return process

    def restart(self, name: str, grace_s: float = 0.0) -> ManagedProcess:
        """Start the process with this name again as it was first started (stopping it first if it still
        runs: SIGTERM, SIGKILL after `grace_s`) and wait until it is ready. It keeps its place in the stop
        order. Fault tests kill a process their own way, then restart it."""
        old = next(p for p in self.processes if p.name == name)
        old.terminate(grace_s)
        spec = self._specs[name]
        index = self.processes.index(old)
        self.processes.remove(old)  # so pid(name), which a readiness check may ask, is the new process's
        process = self.start(name, spec.argv, spec.env, spec.ready, spec.timeout_s)
        self.processes.remove(process)
        self.processes.insert(index, process)
        return process

    def pid(self, name: str) -> int:
        """The pid of the started process with this name."""
        return next(p.popen.pid for p in self.processes if p.name == name)

    def check_alive(self) -> None:
        """Raise StartupError if a started process has died (or a stop was asked for)."""
        for process in self.processes:
            if not process.alive():
                raise StartupError(f"{process.name} exited with code {process.popen.returncode} while starting")
        if self._stop.is_set():
            raise StartupError("stopped while starting")

    def install_signal_handlers(self) -> None:
        def handler(signum: int, _frame: FrameType | None) -> None:
            self._stop.set()

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)

    def watch(self) -> int:
        """Block until a signal (exit code 0) or a child dies (exit code 1)."""
        while not self._stop.wait(0.5):
            for process in self.processes:
                if not process.alive():
                    print(f"supervisor: {process.name} exited with code {process.popen.returncode}; stopping")
                    return 1
        return 0

    def stop_all(self) -> None:
        """Stop in reverse start order, each with the grace period."""
        for process in reversed(self.processes):
            if process.alive():
                print(f"supervisor: stopping {process.name}")
            process.terminate(self.grace_s)
