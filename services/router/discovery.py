"""The router's in-memory view of the workers of every model, refreshed from the Redis registry.

Polled every `interval_s` (a new worker takes traffic within one poll; one
whose lease lapses, that deregisters, drains or is cordoned, stops receiving
new requests at the next). Requests never wait for Redis: they read this
view, which outlives a Redis outage, and an entry that vanished without its
worker deregistering (Redis wiped, or restarted empty) stays until the lease
it last announced lapses, by which time the worker has registered again.
A worker that fails a call is also benched locally for a few seconds, so
retries go elsewhere before its lease has time to lapse.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from redis.exceptions import RedisError

from shared.errors import ErrorCode, ShoalError
from shared.state.registry import WorkerRegistry
from shared.telemetry.logging import get_logger
from shared.types.workers import WorkerRecord

log = get_logger("shoal.router.discovery")

BENCH_S = 3.0


class WorkerDirectory:
    def __init__(self, registry: WorkerRegistry, on_gone: Callable[[str], None]) -> None:
        self.registry = registry
        self._on_gone = on_gone
        self.records: dict[str, WorkerRecord] = {}
        self._benched: dict[str, float] = {}
        self.refreshes = 0

    async def refresh(self) -> None:
        try:
            records = await self.registry.list_workers()
        except (RedisError, OSError) as exc:
            # Keep serving with the last view; leases are re-read next time.
            log.warning("worker registry unreachable; keeping the last view", error=str(exc))
            return
        fresh = {r.worker_id: r for r in records}
        vanished = sorted(set(self.records) - set(fresh))
        if vanished:
            try:
                left = await self.registry.left(vanished)
            except (RedisError, OSError) as exc:
                log.warning("worker registry unreachable; keeping the last view", error=str(exc))
                return
            now = time.time()
            for worker_id in vanished:
                record = self.records[worker_id]
                if worker_id not in left and record.updated_at + record.info.lease_ttl_s > now:
                    fresh[worker_id] = record  # Redis lost the entry (wiped or restarted); its lease still holds
                else:
                    self._on_gone(worker_id)
        self.records = fresh
        self.refreshes += 1

    def bench(self, worker_id: str, error: ShoalError) -> None:
        """Keep a worker that just failed out of new decisions for a few seconds. One that refused because
        it is full (RESOURCE_EXHAUSTED) has not failed: it stays in, and its load steers the policy."""
        if error.code is not ErrorCode.RESOURCE_EXHAUSTED:
            self._benched[worker_id] = time.monotonic() + BENCH_S

    def serving(self, model: str | None = None) -> list[WorkerRecord]:
        """Workers (of `model`, or of every model) that may take new requests now."""
        now = time.monotonic()
        return [
            record
            for record in self.records.values()
            if record.schedulable
            and self._benched.get(record.worker_id, 0.0) <= now
            and (model is None or record.info.model == model)
        ]

    def pool(self, worker_id: str) -> str | None:
        record = self.records.get(worker_id)
        return record.info.pool if record else None

    def address(self, worker_id: str) -> str | None:
        """The worker's gRPC address (control calls, P/D prefill, KV fetches)."""
        record = self.records.get(worker_id)
        return record.info.address if record else None

    def data_address(self, worker_id: str) -> str | None:
        """The worker's data address (its `serve` channel)."""
        record = self.records.get(worker_id)
        return record.info.data_address or None if record else None
