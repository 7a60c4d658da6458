"""Run an async function periodically, and stop without cancelling it mid-call.

Cancelling a task in the middle of a Redis pipeline or a gRPC call can leave
the client's connection in an undefined state (and, with redis-py, hang the
cancelling task). A Ticker instead finishes the call in progress, then exits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import suppress

from shared.telemetry.logging import get_logger

log = get_logger("shoal.ticker")


class Ticker:
    def __init__(self, name: str, interval_s: float, tick: Callable[[], Awaitable[object]]) -> None:
        self.name = name
        self.interval_s = interval_s
        self._tick = tick
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start ticking (again, after a stop)."""
        self._stop.clear()
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def _run(self) -> None:
        while not self._stop.is_set():
            with suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval_s)
            if self._stop.is_set():
                return
            try:
                await self._tick()
            except Exception:
                log.exception("periodic task failed; it runs again next tick", task=self.name)

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Let the call in progress finish (up to timeout_s, then cancel), and stop."""
        self._stop.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
        except TimeoutError:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._task = None
