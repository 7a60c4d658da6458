"""This router's requests in flight, per worker.

Routing adds them to the load each worker last reported, so a burst spreads
before the workers' next heartbeats say they are busy. `track` owns a count
for the length of one attempt; a worker that leaves the directory mid-request
is forgotten, and the attempts still running on it end without error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class InflightCounts:
    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def get(self, worker_id: str) -> int:
        return self._counts.get(worker_id, 0)

    @property
    def total(self) -> int:
        return sum(self._counts.values())

    @contextmanager
    def track(self, worker_id: str) -> Iterator[None]:
        self._counts[worker_id] = self._counts.get(worker_id, 0) + 1
        try:
            yield
        finally:
            left = self._counts.get(worker_id, 0) - 1
            if left > 0:
                self._counts[worker_id] = left
            else:
                self._counts.pop(worker_id, None)

    def forget(self, worker_id: str) -> None:
        self._counts.pop(worker_id, None)
