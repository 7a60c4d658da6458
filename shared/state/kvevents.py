"""KV block events: which blocks each worker or kvstore holds, as a Redis stream.

Publishers (workers' prefix caches, the kvstore) append batches of
"add"/"remove" events for block hashes to one stream, each batch numbered by a
per-publisher sequence within an *epoch* (a random id per process start).
Every few seconds a publisher also writes a snapshot of its whole block set
and the sequence it reflects. The snapshot may run slightly ahead of the
stream (it is read after the events were taken); applying an event twice is
harmless, so readers stay correct.

A follower (the router's KV index) applies batches in order. A sequence gap
(a trimmed stream, a follower that started late, a lost write) or a new
epoch is detected and repaired from the snapshot: the follower keeps applying
new events, and as soon as a snapshot at least as recent as what it has
applied exists, replaces that publisher's set with it. A publisher that
stops cleanly publishes `clear`. A publisher that goes quiet after entries a
follower missed shows no gap, so once per resync interval the follower also
reads each publisher's snapshot mark (epoch and sequence, not the hashes): a
publisher writes the mark only after the entries it covers, so a mark still
ahead of what the follower applied one interval later (the follower read the
stream to its end meanwhile) means those entries are gone, and the snapshot
replaces the publisher's set.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.hashing import HASH_BYTES, BlockHash
from shared.state import schema
from shared.telemetry.logging import get_logger

log = get_logger("shoal.state.kvevents")

ADD = "add"
REMOVE = "remove"
_OPS = {ADD: b"a", REMOVE: b"r"}
SNAPSHOT_INTERVAL_S = 2.0


def _split(blob: bytes) -> list[BlockHash]:
    return [blob[i : i + HASH_BYTES] for i in range(0, len(blob), HASH_BYTES)]


def _runs(ops: bytes, hashes: list[BlockHash]) -> list[tuple[int, list[BlockHash]]]:
    """Consecutive hashes with the same operation, in order."""
    runs: list[tuple[int, list[BlockHash]]] = []
    for op, block_hash in zip(ops, hashes, strict=True):
        if runs and runs[-1][0] == op:
            runs[-1][1].append(block_hash)
        else:
            runs.append((op, [block_hash]))
    return runs


class KVEventPublisher:
    """Publishes one process's block events and snapshots (see module doc)."""

    def __init__(self, redis: Redis, publisher: str, maxlen: int = schema.KV_EVENTS_MAXLEN) -> None:
        self.redis = redis
        self.publisher = publisher
        self.epoch = uuid.uuid4().hex[:12]
        self.seq = 0
        self.maxlen = maxlen
        self._last_snapshot = 0.0

    async def tick(
        self,
        events: list[tuple[str, BlockHash]],
        held: Callable[[], Iterable[BlockHash]],
        snapshot_interval_s: float = SNAPSHOT_INTERVAL_S,
    ) -> None:
        """One round of a publisher's loop: the new events, and a snapshot of `held()` every interval.

        A Redis failure is logged, not raised: followers detect the lost batch
        by its sequence gap and resynchronise from the next snapshot.
        """
        try:
            await self.publish(events)
            now = time.monotonic()
            if now - self._last_snapshot >= snapshot_interval_s:
                await self.snapshot(held())
                self._last_snapshot = now
        except (RedisError, OSError) as exc:
            log.warning("kv event publish failed", publisher=self.publisher, error=str(exc))

    async def publish(self, events: list[tuple[str, BlockHash]]) -> None:
        """Append one batch (order kept). Raises RedisError if Redis is down."""
        if not events:
            return
        self.seq += 1
        await self.redis.xadd(
            schema.KV_EVENTS,
            {
                "pub": self.publisher,
                "epoch": self.epoch,
                "seq": str(self.seq),
                "ops": b"".join(_OPS[op] for op, _ in events),
                "hashes": b"".join(h for _, h in events),
            },
            maxlen=self.maxlen,
            approximate=True,
        )

    async def snapshot(self, hashes: Iterable[BlockHash]) -> None:
        key = schema.kv_snapshot(self.publisher)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"epoch": self.epoch, "seq": str(self.seq), "hashes": b"".join(hashes)})
            pipe.expire(key, schema.SNAPSHOT_TTL_S)
            await pipe.execute()

    async def clear(self) -> None:
        """Tell followers this publisher holds nothing any more (clean stop)."""
        self.seq += 1
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(
                schema.KV_EVENTS,
                {"pub": self.publisher, "epoch": self.epoch, "seq": str(self.seq), "clear": "1"},
                maxlen=self.maxlen,
                approximate=True,
            )
            pipe.delete(schema.kv_snapshot(self.publisher))
            await pipe.execute()


class KVIndexSink(Protocol):
    """Where a follower applies what it reads (the router's KV index)."""

    def add(self, publisher: str, hashes: list[BlockHash]) -> None: ...

    def remove(self, publisher: str, hashes: list[BlockHash]) -> None: ...

    def replace(self, publisher: str, hashes: list[BlockHash]) -> None: ...

    def drop(self, publisher: str) -> None: ...


@dataclass
class _PublisherState:
    epoch: str
    seq: int
    resync: bool = False
    last_attempt: float = field(default=0.0)


class KVEventFollower:
    """Follows the event stream into a KVIndexSink (see module doc).

    `run` loops until cancelled; a Redis outage is logged and retried.
    Counters `gaps` and `resyncs` say how often repair was needed.
    """

    def __init__(self, redis: Redis, sink: KVIndexSink, resync_interval_s: float = 1.0) -> None:
        self.redis = redis
        self.sink = sink
        self.resync_interval_s = resync_interval_s
        self.publishers: dict[str, _PublisherState] = {}
        self.last_id = "0-0"
        self.gaps = 0
        self.resyncs = 0
        # Publishers found behind their snapshot mark for a whole interval (their lost entries not gaps).
        self.losses = 0
        self.ready = asyncio.Event()
        self._last_check = 0.0
        # Publishers whose mark was ahead of what was applied at the last check, and that mark.
        self._suspects: dict[str, tuple[str, int]] = {}

    async def bootstrap(self) -> None:
        """Load every snapshot, then start after the stream's current end."""
        last: list[tuple[bytes, dict[bytes, bytes]]] = await self.redis.xrevrange(schema.KV_EVENTS, count=1)
        self.last_id = last[0][0].decode() if last else "0-0"
        prefix = schema.KV_SNAPSHOT_PREFIX
        async for key in self.redis.scan_iter(match=prefix + "*"):
            publisher = bytes(key).decode()[len(prefix) :]
            await self._load_snapshot(publisher, force=True)
        self.ready.set()

    async def _load_snapshot(self, publisher: str, force: bool = False) -> bool:
        raw: dict[bytes, bytes] = await self.redis.hgetall(schema.kv_snapshot(publisher))
        if not raw:
            return False
        epoch, seq = raw[b"epoch"].decode(), int(raw[b"seq"])
        state = self.publishers.get(publisher)
        if not force and state is not None and (state.epoch != epoch or seq < state.seq):
            return False  # older than what was applied: wait for the next one
        self.sink.replace(publisher, _split(raw.get(b"hashes", b"")))
        self.publishers[publisher] = _PublisherState(epoch, seq)
        self.resyncs += 1
        return True

    def apply(self, fields: dict[bytes, bytes]) -> list[str]:
        """Apply one stream entry; returns publishers that need a resync."""
        publisher = fields[b"pub"].decode()
        epoch = fields[b"epoch"].decode()
        seq = int(fields[b"seq"])
        state = self.publishers.get(publisher)
        if state is not None and state.epoch == epoch and seq <= state.seq:
            return []  # already reflected (a snapshot ran ahead)
        if b"clear" in fields:
            self.sink.drop(publisher)
            self.publishers[publisher] = _PublisherState(epoch, seq)
            return []
        needs: list[str] = []
        if state is None or state.epoch != epoch:
            if state is not None:
                self.sink.drop(publisher)  # the publisher restarted with an empty cache
            gap = seq != 1
            state = self.publishers[publisher] = _PublisherState(epoch, 0)
        else:
            gap = seq != state.seq + 1
        if gap:
            self.gaps += 1
            state.resync = True
            needs.append(publisher)
        for op, run in _runs(fields.get(b"ops", b""), _split(fields.get(b"hashes", b""))):
            (self.sink.add if op == _OPS[ADD][0] else self.sink.remove)(publisher, run)
        state.seq = seq
        return needs

    async def _check_marks(self) -> None:
        """Resync publishers whose entries were lost while they went quiet (module doc)."""
        names = list(self.publishers)
        if not names:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for publisher in names:
                pipe.hmget(schema.kv_snapshot(publisher), ["epoch", "seq"])
            marks = await pipe.execute()
        suspects: dict[str, tuple[str, int]] = {}
        for publisher, (epoch_raw, seq_raw) in zip(names, marks, strict=True):
            state = self.publishers.get(publisher)
            if state is None or epoch_raw is None:
                continue
            mark = (epoch_raw.decode(), int(seq_raw))
            if mark[0] == state.epoch and mark[1] <= state.seq:
                continue  # caught up
            if self._suspects.get(publisher) == mark:
                # Ahead a whole interval ago and still: the entries in between are lost.
                self.losses += 1
                log.warning("kv events of a quiet publisher were lost; resyncing", publisher=publisher)
                await self._load_snapshot(publisher, force=True)
            else:
                suspects[publisher] = mark
        self._suspects = suspects

    async def _repair(self) -> None:
        now = time.monotonic()
        if now - self._last_check >= self.resync_interval_s:
            self._last_check = now
            await self._check_marks()
        for publisher, state in list(self.publishers.items()):
            if state.resync and now - state.last_attempt >= self.resync_interval_s:
                state.last_attempt = now
                if await self._load_snapshot(publisher):
                    log.info("kv index resynchronised from snapshot", publisher=publisher)

    async def poll(self, block_ms: int = 1000) -> int:
        """Read and apply what arrived (waiting up to block_ms); returns entries applied."""
        response: list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]] = await self.redis.xread(
            {schema.KV_EVENTS: self.last_id}, count=1000, block=block_ms
        )
        applied = 0
        for _stream, entries in response or []:
            for entry_id, fields in entries:
                self.apply(fields)
                self.last_id = entry_id.decode()
                applied += 1
        await self._repair()
        return applied

    async def run(self) -> None:
        while True:
            try:
                if not self.ready.is_set():
                    await self.bootstrap()
                await self.poll()
            except (RedisError, OSError) as exc:
                log.warning("kv event stream unreachable; retrying", error=str(exc))
                await asyncio.sleep(1.0)
