"""Versioned JSON documents with atomic compare-and-set.

A document (`doc:{name}`) is a hash of `version` and `body`. `put` bumps the
version by one inside a Lua script, so concurrent writers never lose an
update: with `expected_version` the write succeeds only if nobody wrote in
between (optimistic concurrency), otherwise it raises `VersionConflict`
carrying the current version; `update` retries a read-modify-write until it
wins. Expert maps, pools and models are stored this way.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from shared.errors import FailedPrecondition
from shared.state import schema

_CAS = """
local current = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if ARGV[1] ~= '' and tonumber(ARGV[1]) ~= current then
  return {0, current}
end
local next = current + 1
redis.call('HSET', KEYS[1], 'version', next, 'body', ARGV[2])
return {1, next}
"""


# Puts a document back exactly as it was (same version), unless it exists again meanwhile.
_RESTORE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'body', ARGV[2])
return 1
"""


class VersionConflict(FailedPrecondition):
    """Someone else wrote the document since it was read."""


@dataclass(frozen=True)
class Versioned:
    version: int
    body: Any


class DocumentStore:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._cas = redis.register_script(_CAS)
        self._restore = redis.register_script(_RESTORE)

    async def get(self, name: str) -> Versioned | None:
        raw = await self.redis.hmget(schema.doc(name), ["version", "body"])
        if raw[0] is None:
            return None
        return Versioned(int(raw[0]), json.loads(bytes(raw[1])))

    async def put(self, name: str, body: Any, expected_version: int | None = None) -> int:
        """Write `body` and return the new version (see module doc)."""
        ok, version = await self._cas(
            keys=[schema.doc(name)],
            args=["" if expected_version is None else str(expected_version), json.dumps(body)],
        )
        if not ok:
            raise VersionConflict(
                f"document {name!r} is at version {version}, not {expected_version}",
                name=name,
                current_version=int(version),
            )
        await self._changed(name)
        return int(version)

    async def _changed(self, name: str) -> None:
        if name.startswith(schema.CATALOG_DOCS):
            await self.redis.incr(schema.CATALOG_CHANGES)
        elif name.startswith(schema.API_KEY_DOC):
            await self.redis.incr(schema.API_KEY_CHANGES)

    async def update(self, name: str, change: Callable[[Any], Any], attempts: int = 50) -> Versioned:
        """Apply `change(old_body or None)` atomically, retrying on conflict."""
        for attempt in range(attempts):
            current = await self.get(name)
            body = change(current.body if current else None)
            try:
                version = await self.put(name, body, current.version if current else 0)
            except VersionConflict:
                # Back off a random, growing moment so contending writers spread out.
                await asyncio.sleep(random.uniform(0, 0.001 * (attempt + 1)))
                continue
            return Versioned(version, body)
        raise VersionConflict(f"document {name!r} kept changing; gave up after {attempts} attempts", name=name)

    async def delete(self, name: str) -> bool:
        deleted = bool(await self.redis.delete(schema.doc(name)))
        await self._changed(name)
        return deleted

    async def snapshot(self, prefixes: tuple[str, ...] = ("",)) -> dict[str, Versioned]:
        """Every document (or those whose names start with one of `prefixes`), as it is now."""
        names = [name for name in await self.names("") if name.startswith(prefixes)]
        if not names:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hmget(schema.doc(name), ["version", "body"])
            raws = await pipe.execute()
        return {
            name: Versioned(int(raw[0]), json.loads(bytes(raw[1])))
            for name, raw in zip(names, raws, strict=True)
            if raw[0] is not None
        }

    async def restore(self, documents: dict[str, Versioned]) -> int:
        """Write back documents Redis lost, each at its old version; returns how many were missing."""
        restored = 0
        for name, doc in documents.items():
            restored += int(await self._restore(keys=[schema.doc(name)], args=[doc.version, json.dumps(doc.body)]))
            await self._changed(name)
        return restored

    async def names(self, prefix: str) -> list[str]:
        """Names of documents starting with `prefix`."""
        start = len(schema.DOC_KEY_PREFIX)
        pattern = schema.DOC_KEY_PREFIX + prefix + "*"
        return sorted([key.decode()[start:] async for key in self.redis.scan_iter(match=pattern)])
