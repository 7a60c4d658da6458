"""Paged KV-cache blocks with a prefix cache, as bookkeeping (no tensors).

A block holds `block_size` tokens of KV. Requests hold blocks by reference
count. A full block is *registered* under its block-hash chain name so later
requests with the same prefix reuse it; when its last holder releases it, it
stays cached and becomes *evictable* (least recently used first). Allocation
takes a never-used block first, then evicts. Every registration and eviction
is recorded as an event for the router's KV index.

Used by both engines (the reference engine owns the tensors the ids index).
Not thread-safe: the engine loop is its only user.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from shared.hashing import BlockHash


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._refs = [0] * num_blocks
        self._hash_of: list[BlockHash | None] = [None] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._cached: dict[BlockHash, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self.events: list[tuple[str, BlockHash]] = []
        self.evictions = 0

    @property
    def num_available(self) -> int:
        """Blocks an allocation can get now (free or evictable)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Blocks held by at least one request."""
        return self.num_blocks - self.num_available

    def match_prefix(self, hashes: list[BlockHash]) -> list[int]:
        """Block ids of the longest cached prefix of `hashes` (not yet held)."""
        ids: list[int] = []
        for h in hashes:
            block = self._cached.get(h)
            if block is None:
                break
            ids.append(block)
        return ids

    def lookup(self, block_hash: BlockHash) -> int | None:
        return self._cached.get(block_hash)

    def hold(self, block_ids: list[int]) -> None:
        """Take a reference on cached blocks (a prefix hit)."""
        for block in block_ids:
            if self._refs[block] == 0:
                self._evictable.pop(block, None)
            self._refs[block] += 1

    def allocate(self) -> int | None:
        """A block held once by the caller, or None when every block is held."""
        if self._free:
            block = self._free.popleft()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            self._forget(block)
            self.evictions += 1
        else:
            return None
        self._refs[block] = 1
        return block

    def release(self, block_ids: list[int]) -> None:
        """Drop one reference on each block; tail blocks first, so prefixes are evicted last."""
        for block in reversed(block_ids):
            self._refs[block] -= 1
            if self._refs[block] < 0:
                raise RuntimeError(f"block {block} released more often than held")
            if self._refs[block] == 0:
                if self._hash_of[block] is None:
                    self._free.append(block)
                else:
                    self._evictable[block] = None

    def register(self, block: int, block_hash: BlockHash) -> int:
        """Name a full block. Returns the cached block for that name.

        If another block already holds the same prefix (two requests computed
        it at once) the existing one stays cached and this one stays unnamed.
        """
        existing = self._cached.get(block_hash)
        if existing is not None:
            return existing
        self._hash_of[block] = block_hash
        self._cached[block_hash] = block
        self.events.append(("add", block_hash))
        return block

    def in_use(self) -> list[int]:
        """Blocks whose content matters: held by a request, or cached for a prefix."""
        return [b for b in range(self.num_blocks) if self._refs[b] or self._hash_of[b] is not None]

    def cached_hashes(self) -> list[BlockHash]:
        return list(self._cached)

    def drain_events(self) -> list[tuple[str, BlockHash]]:
        events, self.events = self.events, []
        return events

    def _forget(self, block: int) -> None:
        block_hash = self._hash_of[block]
        if block_hash is not None:
            del self._cached[block_hash]
            self._hash_of[block] = None
            self.events.append(("remove", block_hash))


def cache_slots(block_ids: list[int], block_size: int, start: int, end: int) -> list[int]:
    """Cache slots of positions [start, end) under block table `block_ids` (block b holds slots
    [b * block_size, (b + 1) * block_size))."""
    return [block_ids[p // block_size] * block_size + p % block_size for p in range(start, end)]
