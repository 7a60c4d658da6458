"""The memory tier: blocks in the shared-memory arena, within its byte budget.

Same-host clients read these blocks straight from the arena (see
shared/kvlocal); everyone else gets them over gRPC.
"""

from __future__ import annotations

from services.kvstore.arena import Arena, slot_class
from shared.hashing import BlockHash
from shared.types.kv import KVBlock


class MemoryTier:
    def __init__(self, arena: Arena) -> None:
        self.arena = arena
        self.used_bytes = 0
        self.evictions = 0

    @property
    def capacity_bytes(self) -> int:
        return self.arena.capacity_bytes

    def __contains__(self, block: BlockHash) -> bool:
        return block in self.arena

    def __len__(self) -> int:
        return len(self.arena)

    def get(self, block: BlockHash) -> KVBlock | None:
        return self.arena.get(block)

    def fits(self, size: int) -> bool:
        """A slot for a block of `size` bytes (header + payload) is free now."""
        return self.arena.fits(size)

    def same_class(self, block: BlockHash, size: int) -> bool:
        """Evicting `block` frees a slot a block of `size` bytes can use."""
        return self.arena.slot_bytes(block) == slot_class(size)

    def put(self, block: KVBlock) -> bool:
        """Store a block (the caller made room); False if no slot is free."""
        if block.hash in self.arena:
            return True
        if not self.arena.put(block, block.checksum()):
            return False
        self.used_bytes += self.arena.slot_bytes(block.hash)
        return True

    def pop(self, block: BlockHash) -> bool:
        if block not in self.arena:
            return False
        self.used_bytes -= self.arena.slot_bytes(block)
        return self.arena.remove(block)


def block_cost(block: KVBlock) -> int:
    """Bytes a block occupies: its header and payload."""
    return len(block.payload) + len(block.header)
