"""Records of long operations (jobs, agent graphs): one JSON document per key, indexed, expiring once finished.

Each kind has a key per record, an index (ZSET id -> creation time) for
listing the newest, and a set of the records not finished yet, which the
controller's loops read instead of every record ever made. A finished
record's key expires after FINISHED_TTL_S; the index and the open set forget
ids whose key is gone (or whose record finished) as they meet them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

FINISHED_TTL_S = 7 * 24 * 3600


@dataclass(frozen=True)
class RecordKeys:
    key: Callable[[str], str]
    index: str
    open: str


class RecordIndex:
    """Reads (and plain writes) of one kind of record; `load` parses a stored document."""

    def __init__(self, redis: Redis, keys: RecordKeys) -> None:
        self.redis = redis
        self.keys = keys

    async def get(self, record_id: str) -> bytes | None:
        raw: bytes | None = await self.redis.get(self.keys.key(record_id))
        return raw

    async def recent(self, limit: int) -> list[bytes]:
        """The newest documents first."""
        ids = _names(await self.redis.zrevrange(self.keys.index, 0, limit - 1))
        raws = await self._mget(ids)
        gone = [i for i, raw in zip(ids, raws, strict=True) if raw is None]
        if gone:
            await self.redis.zrem(self.keys.index, *gone)  # expired
        return [raw for raw in raws if raw is not None]

    async def open(self, finished: Callable[[bytes], bool]) -> list[bytes]:
        """Documents of the records not finished (`finished` tells from a document)."""
        ids = _names(await self.redis.smembers(self.keys.open))
        raws = await self._mget(ids)
        done = [i for i, raw in zip(ids, raws, strict=True) if raw is None or finished(raw)]
        if done:
            await self.redis.srem(self.keys.open, *done)
        return [raw for raw in raws if raw is not None and not finished(raw)]

    async def put(self, record_id: str, document: str, created_at: float, finished: bool) -> None:
        """Write a record whose only writer is its caller (no compare-and-set)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            if finished:
                pipe.set(self.keys.key(record_id), document, ex=FINISHED_TTL_S)
                pipe.srem(self.keys.open, record_id)
            else:
                pipe.set(self.keys.key(record_id), document)
                pipe.sadd(self.keys.open, record_id)
            pipe.zadd(self.keys.index, {record_id: created_at})
            await pipe.execute()

    async def _mget(self, ids: list[str]) -> list[Any]:
        if not ids:
            return []
        return list(await self.redis.mget([self.keys.key(i) for i in ids]))


def _names(raw: Any) -> list[str]:
    return [item.decode() if isinstance(item, bytes) else str(item) for item in raw]
