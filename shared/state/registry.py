"""The worker registry: registration with a lease, heartbeats, listing.

A worker's entry is one hash, `worker:{id}`, whose TTL is its lease. Each
heartbeat rewrites the entry and renews the TTL in one transaction, so an entry
is always whole. A worker that stops heartbeating disappears when its lease
lapses, without anyone deleting it; a clean stop deletes it at once and
leaves a `left:{id}` mark for one lease. Readers (router, controller) list
entries with `list_workers`; ids whose entry has lapsed are pruned from the
index then. An entry can also vanish because Redis lost its data (wiped, or
restarted without its file): the mark tells the two apart, so the router
keeps serving a vanished worker until its last lease would have lapsed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.state import schema
from shared.telemetry.logging import get_logger
from shared.ticker import Ticker
from shared.types.workers import WorkerInfo, WorkerLoad, WorkerRecord

log = get_logger("shoal.state.registry")

# Remove index entries whose hash lapsed; atomic so a worker re-registering
# in between is never dropped from the index.
_PRUNE = """
local removed = 0
for i, id in ipairs(ARGV) do
  if redis.call('EXISTS', KEYS[2] .. id) == 0 then
    redis.call('SREM', KEYS[1], id)
    removed = removed + 1
  end
end
return removed
"""


class WorkerRegistry:
    """Registry operations over one Redis client. Safe to share across tasks."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._prune = redis.register_script(_PRUNE)

    async def heartbeat(self, info: WorkerInfo, load: WorkerLoad, lease_ttl_s: float) -> None:
        """Write the entry and (re)start its lease. Also how a worker registers."""
        key = schema.worker(info.worker_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                key,
                mapping={
                    "info": info.model_dump_json(),
                    "load": load.model_dump_json(),
                    "updated_at": repr(time.time()),
                },
            )
            pipe.pexpire(key, int(lease_ttl_s * 1000))
            pipe.sadd(schema.WORKERS, info.worker_id)
            await pipe.execute()

    async def deregister(self, worker_id: str, lease_ttl_s: float = 0.0) -> None:
        """Remove the entry, and say for one lease that the worker left on purpose (readers that keep a
        vanished entry until its lease lapses, in case Redis lost it, drop this one at once)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(schema.worker(worker_id))
            pipe.srem(schema.WORKERS, worker_id)
            pipe.srem(schema.CORDONED, worker_id)
            if lease_ttl_s > 0:
                pipe.set(schema.worker_left(worker_id), "1", px=int(lease_ttl_s * 1000))
            await pipe.execute()

    async def left(self, worker_ids: Sequence[str]) -> set[str]:
        """Those of `worker_ids` that deregistered within their last lease."""
        if not worker_ids:
            return set()
        marks = await self.redis.mget([schema.worker_left(w) for w in worker_ids])
        return {w for w, mark in zip(worker_ids, marks, strict=True) if mark is not None}

    async def list_workers(self) -> list[WorkerRecord]:
        """Every worker whose lease is live, sorted by id."""
        members: set[bytes] = await self.redis.smembers(schema.WORKERS)
        ids = sorted(member.decode() for member in members)
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for worker_id in ids:
                pipe.hgetall(schema.worker(worker_id))
            pipe.smembers(schema.CORDONED)
            *entries, cordoned_raw = await pipe.execute()
        cordoned = {member.decode() for member in cordoned_raw}
        records: list[WorkerRecord] = []
        lapsed: list[str] = []
        for worker_id, entry in zip(ids, entries, strict=True):
            if not entry:
                lapsed.append(worker_id)
                continue
            records.append(
                WorkerRecord(
                    info=WorkerInfo.model_validate_json(entry[b"info"]),
                    load=WorkerLoad.model_validate_json(entry[b"load"]),
                    updated_at=float(entry[b"updated_at"]),
                    cordoned=worker_id in cordoned,
                )
            )
        if lapsed:
            await self._prune(keys=[schema.WORKERS, schema.WORKER_KEY_PREFIX], args=lapsed)
        return records

    async def get(self, worker_id: str) -> WorkerRecord | None:
        for record in await self.list_workers():
            if record.worker_id == worker_id:
                return record
        return None

    async def set_cordoned(self, worker_id: str, cordoned: bool) -> None:
        if cordoned:
            await self.redis.sadd(schema.CORDONED, worker_id)
        else:
            await self.redis.srem(schema.CORDONED, worker_id)


class Heartbeat:
    """Renews a worker's lease every `interval_s` with its current load.

    Runs as a Ticker. A Redis outage is logged and retried on the next
    tick; the worker keeps serving meanwhile (its entry lapses if the outage
    outlasts the lease, and comes back with the next successful heartbeat).
    """

    def __init__(
        self,
        registry: WorkerRegistry,
        info: WorkerInfo,
        load: Callable[[], WorkerLoad],
        interval_s: float,
        lease_ttl_s: float,
    ) -> None:
        self.registry = registry
        self.info = info
        self.load = load
        self.interval_s = interval_s
        self.lease_ttl_s = lease_ttl_s
        self._ticker = Ticker(f"heartbeat-{info.worker_id}", interval_s, self.beat)
        self.failures = 0

    async def beat(self) -> bool:
        try:
            await self.registry.heartbeat(self.info, self.load(), self.lease_ttl_s)
        except (RedisError, OSError) as exc:
            self.failures += 1
            log.warning("heartbeat failed", worker_id=self.info.worker_id, error=str(exc))
            return False
        return True

    async def start(self) -> None:
        """Register at once (raising if Redis is unreachable), then renew in the background."""
        await self.registry.heartbeat(self.info, self.load(), self.lease_ttl_s)
        self._ticker.start()

    async def stop(self, deregister: bool = True) -> None:
        await self._ticker.stop()
        if deregister:
            try:
                await self.registry.deregister(self.info.worker_id, self.lease_ttl_s)
            except (RedisError, OSError) as exc:
                log.warning("deregister failed; the lease will lapse", error=str(exc))
