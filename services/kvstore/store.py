"""The block store: a memory tier that spills to a disk tier, with pins.

Writes (`put`, `delete`, making room) are serialized by one asyncio lock so
budgets are never overrun; reads never take it. A block becomes visible only
once whole (the memory tier holds immutable bytes; disk files are renamed
into place), so a read racing a write of the same block sees it complete or
not at all. When memory is full the eviction policy names victims: each is
moved to disk if the disk tier has (or can make) room, otherwise dropped. A
pinned block is never dropped; if room can only be made by dropping pinned
blocks, the write fails with RESOURCE_EXHAUSTED. Every block that enters or
leaves the store (not a tier move) is recorded as an event for the KV index.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import TypeVar

from services.kvstore.arena import SlotLease
from services.kvstore.tiers.disk import DiskFull, DiskTier
from services.kvstore.tiers.memory import MemoryTier, block_cost
from shared.errors import Overloaded
from shared.hashing import BlockHash
from shared.policies.eviction import EvictionPolicy
from shared.rpc.shoal.v1 import kvstore_pb2
from shared.telemetry.logging import get_logger
from shared.types.kv import KVBlock

log = get_logger("shoal.kvstore.store")

# Victims considered per look at the eviction order (a full scan per write would be O(blocks)).
EVICTION_SCAN = 64
T = TypeVar("T")
MEMORY = kvstore_pb2.TIER_MEMORY
DISK = kvstore_pb2.TIER_DISK


@dataclass
class PutResult:
    stored: int = 0
    duplicates: int = 0


class BlockStore:
    def __init__(
        self,
        memory: MemoryTier,
        disk: DiskTier | None,
        policy: Callable[[], EvictionPolicy],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.memory = memory
        self.disk = disk
        self._memory_policy = policy()
        self._disk_policy = policy()
        self._clock = clock
        self._lock = asyncio.Lock()
        self._pins: dict[BlockHash, float] = {}
        self._sessions: dict[str, set[BlockHash]] = {}
        self.events: list[tuple[str, BlockHash]] = []
        self.hits = 0
        self.misses = 0
        # True until `open` has indexed what the disk tier held before a restart.
        self.disk_loading = disk is not None

    async def open(self) -> None:
        """Index the disk tier's blocks from its folder (after a restart). The store serves meanwhile:
        blocks written or evicted during the listing keep their own state."""
        disk = self.disk
        if disk is None:
            return
        found = await asyncio.to_thread(disk.listing)
        adopted = disk.adopt(found)
        self.disk_loading = False
        for block in adopted:
            self._disk_policy.inserted(block, "")
            self.events.append(("add", block))
        log.info("disk tier loaded", blocks=len(adopted), corrupt_dropped=disk.corrupt_dropped)

    # -- queries --------------------------------------------------------------

    def tier_of(self, block: BlockHash) -> int | None:
        if block in self.memory:
            return MEMORY
        if self.disk is not None and block in self.disk:
            return DISK
        return None

    def lookup(self, hashes: Sequence[BlockHash]) -> list[int]:
        """Tiers of the longest stored prefix of `hashes`."""
        tiers: list[int] = []
        for block in hashes:
            tier = self.tier_of(block)
            if tier is None:
                break
            tiers.append(tier)
        return tiers

    def only_on_disk(self, block: BlockHash) -> bool:
        """Reading `block` waits for the disk (see `get_now`)."""
        return self.disk is not None and block not in self.memory and block in self.disk

    def get_now(self, block: BlockHash) -> KVBlock | None:
        """`get` for a block that is not only on disk: answered without leaving the event loop's turn."""
        return self._counted(block, self.memory.get(block))

    def lease_now(self, block: BlockHash) -> SlotLease | None:
        """`get_now` without the copy: the block in place in memory, until `unlease` (see Arena.lease)."""
        return self._counted(block, self.memory.arena.lease(block))

    def unlease(self, lease: SlotLease) -> None:
        self.memory.arena.unlease(lease.offset)

    def _counted(self, block: BlockHash, found: T | None) -> T | None:
        if found is not None:
            self._memory_policy.accessed(block, "")
            self.hits += 1
        else:
            self.misses += 1
        return found

    async def get(self, block: BlockHash) -> KVBlock | None:
        if not self.only_on_disk(block):
            return self.get_now(block)
        disk = self.disk
        if disk is not None:
            stored = await asyncio.to_thread(disk.read, block)
            if stored is not None:
                self._disk_policy.accessed(block, "")
                self.hits += 1
                return stored
            if disk.forget(block):  # corrupt on disk: never served, gone from the index
                self._disk_policy.removed(block)
                self._forget_everywhere(block)
        self.misses += 1
        return None

    def record_access(self, hits: Sequence[BlockHash], misses: int) -> None:
        """Reads that same-host clients served themselves from the arena."""
        for block in hits:
            if block in self.memory:
                self._memory_policy.accessed(block, "")
        self.hits += len(hits)
        self.misses += misses

    def pinned(self, block: BlockHash) -> bool:
        expiry = self._pins.get(block)
        if expiry is None:
            return False
        if expiry > self._clock():
            return True
        del self._pins[block]
        return False

    @property
    def pinned_count(self) -> int:
        return sum(1 for block in list(self._pins) if self.pinned(block))

    def stored_hashes(self) -> list[BlockHash]:
        hashes = [h for h in self._memory_policy.candidates()]
        hashes += [h for h in self._disk_policy.candidates() if h not in self.memory]
        return hashes

    # -- writes ---------------------------------------------------------------

    async def put(self, blocks: Sequence[KVBlock], session: str = "", pin_ttl_s: float = 0) -> PutResult:
        result = PutResult()
        async with self._lock:
            for block in blocks:
                if self.tier_of(block.hash) is not None:
                    result.duplicates += 1
                    self._touch(block.hash, session)
                else:
                    await self._make_room(block_cost(block))
                    if not self.memory.put(block):
                        raise Overloaded("kvstore memory is fragmented; retry shortly", retry_after_s=1.0)
                    self._memory_policy.inserted(block.hash, session)
                    self.events.append(("add", block.hash))
                    result.stored += 1
                if pin_ttl_s > 0:
                    self._pin(session, block.hash, pin_ttl_s)
        return result

    def _touch(self, block: BlockHash, session: str) -> None:
        if block in self.memory:
            self._memory_policy.accessed(block, session)
        else:
            self._disk_policy.accessed(block, session)

    async def _make_room(self, size: int) -> None:
        while not self.memory.fits(size):
            if not await self._evict_from_memory(size):
                raise Overloaded(
                    "kvstore memory is full and every block in it is pinned; retry when pins expire",
                    retry_after_s=5.0,
                )

    async def _evict_from_memory(self, size: int) -> bool:
        """Move or drop one block, preferring, among the next few victims, one whose slot a block of `size`
        can reuse. Takes what it considers up front: reads reorder the policy while a move awaits the disk."""
        considered = 0
        while True:
            batch = list(islice(self._memory_policy.candidates(), considered, considered + EVICTION_SCAN))
            if not batch:
                return False
            in_memory = [h for h in batch if h in self.memory]
            same = [h for h in in_memory if self.memory.same_class(h, size)] if considered == 0 else []
            chosen = set(same)
            for victim in same + [h for h in in_memory if h not in chosen]:
                if await self._evict(victim):
                    return True
            considered += len(batch)

    async def _evict(self, victim: BlockHash) -> bool:
        """Move `victim` to disk if there is room, else drop it unless pinned."""
        block = self.memory.get(victim)
        if block is None:
            return False
        if await self._spill(block):
            self._disk_policy.inserted(victim, "")
        elif self.pinned(victim):
            return False
        else:
            self.events.append(("remove", victim))
        self.memory.pop(victim)
        self._memory_policy.removed(victim)
        self.memory.evictions += 1
        return True

    async def _spill(self, block: KVBlock) -> bool:
        """Move a block's bytes to the disk tier; False when there is none, it is full or it refuses."""
        disk = self.disk
        if disk is None or not await self._room_on_disk(disk.file_size(block)):
            return False
        try:
            await asyncio.to_thread(disk.write, block)
        except DiskFull:
            return False  # dropped instead (or kept, if pinned); the tier rests before the next try
        disk.added(block)
        return True

    async def _room_on_disk(self, size: int) -> bool:
        disk = self.disk
        assert disk is not None
        if size > disk.capacity_bytes:
            return False
        while not disk.fits(size):
            victim = next((h for h in self._disk_policy.candidates() if not self.pinned(h)), None)
            if victim is None:
                return False
            disk.forget(victim)
            self._disk_policy.removed(victim)
            await asyncio.to_thread(disk.unlink, victim)
            disk.evictions += 1
            self.events.append(("remove", victim))
        return True

    async def delete(self, hashes: Sequence[BlockHash]) -> int:
        deleted = 0
        async with self._lock:
            for block in hashes:
                in_memory = self.memory.pop(block)
                on_disk = self.disk is not None and self.disk.forget(block)
                if on_disk:
                    assert self.disk is not None
                    await asyncio.to_thread(self.disk.unlink, block)
                if in_memory or on_disk:
                    self._forget_everywhere(block)
                    deleted += 1
        return deleted

    def _forget_everywhere(self, block: BlockHash) -> None:
        self._memory_policy.removed(block)
        self._disk_policy.removed(block)
        self._pins.pop(block, None)
        self.events.append(("remove", block))

    # -- pins -----------------------------------------------------------------

    def _pin(self, session: str, block: BlockHash, ttl_s: float) -> None:
        self._pins[block] = max(self._pins.get(block, 0.0), self._clock() + ttl_s)
        if session:
            self._sessions.setdefault(session, set()).add(block)

    def pin(self, session: str, hashes: Sequence[BlockHash], ttl_s: float) -> int:
        """Pin the stored ones of `hashes` for ttl_s; ttl_s 0 unpins the session. Returns the count."""
        if ttl_s <= 0:
            released = self._sessions.pop(session, set())
            for block in released:
                self._pins.pop(block, None)
            return len(released)
        count = 0
        for block in hashes:
            if self.tier_of(block) is not None:
                self._pin(session, block, ttl_s)
                self._touch(block, session)
                count += 1
        return count

    def drain_events(self) -> list[tuple[str, BlockHash]]:
        events, self.events = self.events, []
        return events
