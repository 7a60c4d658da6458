"""Per-second work each router routed to each pool, as a Redis stream.

Routers publish one entry a second: for every pool, the requests finished
and the prefill and decode tokens its workers did for them, plus the requests
refused for want of a worker, by model. The controller reads the stream to forecast
each pool's demand. An entry is small and the stream is capped (MAXLEN), so
this costs one XADD per router per second.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass

from redis.asyncio import Redis

from shared.state import schema


@dataclass
class PoolWork:
    requests: float = 0.0
    prefill_tokens: float = 0.0
    decode_tokens: float = 0.0


class WorkRecorder:
    """Accumulates work in memory (router hot path: no I/O) and flushes it to Redis."""

    def __init__(self, redis: Redis, router_id: str) -> None:
        self.redis = redis
        self.router_id = router_id
        self._pools: defaultdict[str, PoolWork] = defaultdict(PoolWork)
        self._refused: defaultdict[str, int] = defaultdict(int)

    def record(self, pool: str, requests: float = 0, prefill_tokens: float = 0, decode_tokens: float = 0) -> None:
        work = self._pools[pool]
        work.requests += requests
        work.prefill_tokens += prefill_tokens
        work.decode_tokens += decode_tokens

    def refused(self, model: str) -> None:
        self._refused[model] += 1

    async def flush(self) -> None:
        pools, self._pools = self._pools, defaultdict(PoolWork)
        refused, self._refused = self._refused, defaultdict(int)
        if not pools and not refused:
            return
        entry = {
            "t": time.time(),
            "refused": refused,
            "pools": {name: [w.requests, w.prefill_tokens, w.decode_tokens] for name, w in pools.items()},
        }
        await self.redis.xadd(
            schema.ROUTER_METRICS,
            {"router": self.router_id, "data": json.dumps(entry)},
            maxlen=schema.METRICS_MAXLEN,
            approximate=True,
        )


@dataclass(frozen=True)
class WorkEntry:
    t: float
    # Requests refused for want of a worker, by model.
    refused: dict[str, int]
    pools: dict[str, PoolWork]


async def read_work(redis: Redis, after: str) -> tuple[list[WorkEntry], str]:
    """Entries newer than stream id `after` ("0-0" for all), and the last id read."""
    raw = await redis.xrange(schema.ROUTER_METRICS, min=f"({after}" if after != "0-0" else "-", count=10_000)
    entries: list[WorkEntry] = []
    last = after
    for entry_id, fields in raw:
        data = json.loads(fields[b"data"])
        pools = {name: PoolWork(*values) for name, values in data["pools"].items()}
        refused = {str(model): int(n) for model, n in data["refused"].items()}
        entries.append(WorkEntry(float(data["t"]), refused, pools))
        last = entry_id.decode()
    return entries, last
