"""This router's requests in flight, per worker: how many, and the prompt tokens not yet prefilled.

Routing adds them to the load each worker last reported, so a burst spreads
before the workers' next heartbeats say they are busy; the prompt tokens an
attempt has yet to prefill are the queue the `work` scorer weighs (Dynamo's
router tracks its requests' prefill the same way). `track` owns both for the
length of one attempt, and the attempt's `prefilled()` gives its tokens back
at its first token. A worker that leaves the directory mid-request is
forgotten, and the attempts still running on it end without error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class Tracked:
    """One attempt's share of a worker's counts."""

    __slots__ = ("_owner", "_tokens", "_worker_id")

    def __init__(self, owner: InflightCounts, worker_id: str, prefill_tokens: int) -> None:
        self._owner = owner
        self._worker_id = worker_id
        self._tokens = prefill_tokens

    def prefilled(self) -> None:
        """The prompt is computed (the first token came): its tokens leave the worker's prefill queue."""
        if self._tokens:
            self._owner.release_prefill(self._worker_id, self._tokens)
            self._tokens = 0


class InflightCounts:
    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._prefill: dict[str, int] = {}

    def get(self, worker_id: str) -> int:
        return self._counts.get(worker_id, 0)

    def prefill_tokens(self, worker_id: str) -> int:
        return self._prefill.get(worker_id, 0)

    @property
    def total(self) -> int:
        return sum(self._counts.values())

    @contextmanager
    def track(self, worker_id: str, prefill_tokens: int = 0) -> Iterator[Tracked]:
        self._counts[worker_id] = self._counts.get(worker_id, 0) + 1
        if prefill_tokens:
            self._prefill[worker_id] = self._prefill.get(worker_id, 0) + prefill_tokens
        tracked = Tracked(self, worker_id, prefill_tokens)
        try:
            yield tracked
        finally:
            tracked.prefilled()
            _take(self._counts, worker_id, 1)

    def release_prefill(self, worker_id: str, tokens: int) -> None:
        """`tokens` of a worker's queued prompts are computed."""
        _take(self._prefill, worker_id, tokens)

    def forget(self, worker_id: str) -> None:
        self._counts.pop(worker_id, None)
        self._prefill.pop(worker_id, None)


def _take(counts: dict[str, int], worker_id: str, amount: int) -> None:
    left = counts.get(worker_id, 0) - amount
    if left > 0:
        counts[worker_id] = left
    else:
        counts.pop(worker_id, None)
