"""The block store's budgets, eviction, spill, pins and disk recovery (no network)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from services.kvstore.arena import Arena, slot_class
from services.kvstore.store import DISK, MEMORY, BlockStore
from services.kvstore.tiers.disk import DiskTier
from services.kvstore.tiers.memory import MemoryTier, block_cost
from shared.errors import Overloaded
from shared.policies.eviction import SessionLRUPolicy, make_policy
from tests.support.blocks import block, blocks

pytestmark = pytest.mark.unit

SIZE = 4096
SLOT = slot_class(block_cost(block(0, SIZE)))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def store(
    tmp_path: Path, memory_blocks: int, disk_blocks: int = 0, policy: str = "lru", clock: Clock | None = None
) -> BlockStore:
    """A store whose memory holds `memory_blocks` test blocks (and its disk `disk_blocks`)."""
    arena = Arena(tmp_path / f"arena-{next(_ids)}", memory_blocks * SLOT, SIZE + 64)
    disk_tier = DiskTier(tmp_path / "disk", disk_blocks * (SIZE + 200)) if disk_blocks else None
    return BlockStore(MemoryTier(arena), disk_tier, lambda: make_policy(policy), clock or Clock())


_ids = itertools.count()


async def test_memory_budget_evicts_least_recently_used_first(tmp_path: Path) -> None:
    s = store(tmp_path, memory_blocks=3)
    a, b, c, d = blocks(4)
    await s.put([a, b, c])
    assert await s.get(a.hash) == a  # a is now the most recent
    await s.put([d])
    assert s.tier_of(b.hash) is None  # b was least recently used
    assert [s.tier_of(x.hash) for x in (a, c, d)] == [MEMORY] * 3
    assert s.memory.used_bytes <= s.memory.capacity_bytes
    assert ("remove", b.hash) in s.drain_events()


async def test_full_memory_spills_to_disk_and_full_disk_drops(tmp_path: Path) -> None:
    s = store(tmp_path, memory_blocks=2, disk_blocks=2)
    await s.open()
    all_blocks = blocks(6)
    await s.put(all_blocks)
    tiers = [s.tier_of(x.hash) for x in all_blocks]
    assert tiers == [None, None, DISK, DISK, MEMORY, MEMORY]
    assert s.disk is not None and s.disk.used_bytes <= s.disk.capacity_bytes
    assert await s.get(all_blocks[2].hash) == all_blocks[2]
    assert s.lookup([x.hash for x in all_blocks[2:]]) == [DISK, DISK, MEMORY, MEMORY]


async def test_duplicates_are_not_stored_twice(tmp_path: Path) -> None:
    s = store(tmp_path, memory_blocks=4)
    result = await s.put(blocks(2))
    again = await s.put(blocks(3))
    assert (result.stored, again.stored, again.duplicates) == (2, 1, 2)
    assert s.memory.used_bytes == 3 * SLOT


async def test_pins_protect_blocks_until_their_ttl_expires(tmp_path: Path) -> None:
    clock = Clock()
    s = store(tmp_path, memory_blocks=2, clock=clock)
    a, b, c = blocks(3)
    await s.put([a, b], session="agent", pin_ttl_s=30)
    with pytest.raises(Overloaded, match="every block in it is pinned"):
        await s.put([c])
    clock.now += 31
    await s.put([c])
    assert s.tier_of(a.hash) is None and s.tier_of(c.hash) == MEMORY


async def test_unpinning_a_session_releases_its_blocks(tmp_path: Path) -> None:
    s = store(tmp_path, memory_blocks=2)
    a, b, c = blocks(3)
    await s.put([a, b])
    assert s.pin("agent", [a.hash, b.hash, c.hash], ttl_s=60) == 2  # c is not stored
    assert s.pinned_count == 2
    assert s.pin("agent", [], ttl_s=0) == 2
    await s.put([c])
    assert s.pinned_count == 0


async def test_disk_tier_is_found_again_and_corrupt_files_are_dropped(tmp_path: Path) -> None:
    first = store(tmp_path, memory_blocks=1, disk_blocks=10)
    await first.open()
    saved = blocks(5)
    await first.put(saved)  # four spill to disk
    disk = tmp_path / "disk"
    files = sorted(disk.glob("*.blk"))
    assert len(files) == 4
    victim = disk / f"{saved[1].hash.hex()}.blk"
    data = bytearray(victim.read_bytes())
    data[-10] ^= 0xFF
    victim.write_bytes(bytes(data))
    (disk / "leftover.tmp123").write_bytes(b"half a write")
    (disk / "not-a-block.blk").write_bytes(b"x" * 100)

    second = store(tmp_path, memory_blocks=1, disk_blocks=10)
    await second.open()
    # Start-up only lists the folder: what cannot be a block goes at once, a corrupt block when read.
    assert second.disk is not None and len(second.disk) == 4 and second.disk.corrupt_dropped == 1
    assert not (disk / "leftover.tmp123").exists() and not (disk / "not-a-block.blk").exists()
    assert await second.get(saved[1].hash) is None
    assert second.disk.corrupt_dropped == 2 and not victim.exists() and len(second.disk) == 3
    for intact in (saved[0], saved[2], saved[3]):
        assert await second.get(intact.hash) == intact


async def test_corruption_found_on_read_is_never_served(tmp_path: Path) -> None:
    s = store(tmp_path, memory_blocks=1, disk_blocks=10)
    await s.open()
    a, b = blocks(2)
    await s.put([a, b])
    path = tmp_path / "disk" / f"{a.hash.hex()}.blk"
    path.write_bytes(path.read_bytes()[:-100])  # truncated behind the store's back
    assert await s.get(a.hash) is None
    assert s.tier_of(a.hash) is None
    assert ("remove", a.hash) in s.drain_events()


def test_session_lru_evicts_anonymous_blocks_before_session_blocks() -> None:
    policy = SessionLRUPolicy()
    policy.inserted(b"s1", "agent")
    policy.inserted(b"a1", "")
    policy.inserted(b"s2", "agent")
    policy.inserted(b"a2", "")
    policy.accessed(b"a1", "")
    assert list(policy.candidates()) == [b"a2", b"a1", b"s1", b"s2"]
    policy.accessed(b"a2", "agent")  # an agent reused an anonymous block: now a session block
    assert list(policy.candidates()) == [b"a1", b"s1", b"s2", b"a2"]


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="lru, session-lru"):
        make_policy("random")


async def test_a_leased_slot_is_not_reused_until_given_back(tmp_path: Path) -> None:
    s = store(tmp_path, memory_blocks=2)
    a, b, c, d = blocks(4)
    await s.put([a, b])
    lease = s.lease_now(a.hash)
    assert lease is not None and bytes(lease.payload) == a.payload and lease.checksum() == a.checksum()
    await s.put([c])  # b was least recently used (the lease read a)
    await s.put([d])  # a leaves the store, but its slot is leased: c is evicted to make room
    assert [s.tier_of(x.hash) for x in (a, b, c, d)] == [None, None, None, MEMORY]
    assert bytes(lease.payload) == a.payload
    s.unlease(lease)
    await s.put([c])  # a's slot is free again: d stays
    assert [s.tier_of(x.hash) for x in (c, d)] == [MEMORY, MEMORY]
    assert s.lease_now(a.hash) is None
    assert (s.hits, s.misses) == (1, 1)
