"""The server side of the shared-memory arena: slot allocation and writes.

Layout and the reader protocol are in shared/kvlocal/layout.py. A slot's
size class is its block size rounded up to 4 KiB (one model's KV blocks all
share one size, so they share one class and waste under 4 KiB each); the data
region is cut into pages, each page given to one class on demand and split
into that class's slots, and handed back when all its slots are free, so a
change of block sizes does not strand memory for long. Only the store's event loop calls these methods.

The data channel sends a block straight from its slot (`lease`) rather than
copying it out first: a copy of a 256 KiB block took a sixth of the store's
time per remote Get. A leased slot that is removed meanwhile (evicted,
deleted) leaves the index at once, but is not handed out again until every
lease on it is given back (`unlease`), so bytes on their way to a socket are
never overwritten.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

from shared.hashing import BlockHash
from shared.kvlocal.layout import (
    ENTRY,
    FRAME,
    GEN,
    SLOT_OVERHEAD,
    TOMBSTONE,
    TRAILER,
    ArenaGeometry,
    ArenaReader,
    home,
)
from shared.types.kv import KVBlock

MIN_SLOT = 4096
_MADV_POPULATE_WRITE = 23


def slot_class(size: int) -> int:
    """The slot size (a multiple of MIN_SLOT) holding `size` bytes of block."""
    return -(-(size + SLOT_OVERHEAD) // MIN_SLOT) * MIN_SLOT


class SlabAllocator:
    def __init__(self, data_bytes: int, page_bytes: int) -> None:
        self.page_bytes = page_bytes
        self._free_pages = list(range(data_bytes // page_bytes - 1, -1, -1))
        self._free_slots: dict[int, list[int]] = {}
        self._page_class: dict[int, int] = {}
        self._page_used: dict[int, int] = {}

    def allocate(self, size_class: int) -> int | None:
        """Offset (in the data region) of a free slot of `size_class`, or None."""
        free = self._free_slots.setdefault(size_class, [])
        if not free:
            if not self._free_pages or size_class > self.page_bytes:
                return None
            page = self._free_pages.pop()
            self._page_class[page] = size_class
            self._page_used[page] = 0
            base = page * self.page_bytes
            count = self.page_bytes // size_class
            free.extend(base + i * size_class for i in range(count - 1, -1, -1))
        offset = free.pop()
        self._page_used[offset // self.page_bytes] += 1
        return offset

    def release(self, offset: int) -> None:
        page = offset // self.page_bytes
        size_class = self._page_class[page]
        self._page_used[page] -= 1
        if self._page_used[page] == 0:
            # Whole page free: give it back so any class can use it.
            base = page * self.page_bytes
            slots = self._free_slots[size_class]
            self._free_slots[size_class] = [s for s in slots if not base <= s < base + self.page_bytes]
            del self._page_class[page], self._page_used[page]
            self._free_pages.append(page)
        else:
            self._free_slots[size_class].append(offset)

    def can_allocate(self, size_class: int) -> bool:
        return bool(self._free_slots.get(size_class)) or (bool(self._free_pages) and size_class <= self.page_bytes)

    def class_of(self, offset: int) -> int:
        return self._page_class[offset // self.page_bytes]


@dataclass(frozen=True, slots=True)
class SlotLease:
    """A block read in place: `payload` is a view of its slot, valid until `Arena.unlease(offset)`."""

    offset: int
    hash: BlockHash
    header: bytes
    payload: memoryview
    crc32c: int

    def checksum(self) -> int:
        return self.crc32c


class Arena:
    """The arena file, mapped read-write by the server (see module doc)."""

    def __init__(self, path: Path, data_bytes: int, max_block_bytes: int) -> None:
        largest = slot_class(max_block_bytes)
        # Pages of 4 MiB (or one largest slot) keep classes flexible; a small
        # arena uses pages of one largest slot so its budget is not rounded away.
        page_bytes = max(largest, 4 * 2**20) if data_bytes >= 16 * max(largest, 4 * 2**20) else largest
        self.geometry = ArenaGeometry.plan(data_bytes, page_bytes, MIN_SLOT, os.urandom(8))
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        # Only the store's user reads it: other users' processes use the data channel.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # a file a killed store left keeps its mode through O_TRUNC
            os.ftruncate(fd, self.geometry.file_bytes)
            self._map = mmap.mmap(fd, self.geometry.file_bytes)
        finally:
            os.close(fd)
        # Back every page now: first writes to fresh tmpfs pages are several
        # times slower than writes to populated ones.
        with contextlib.suppress(OSError, AttributeError, ValueError):
            self._map.madvise(_MADV_POPULATE_WRITE)
        self._view = memoryview(self._map)
        self._view[: len(self.geometry.pack())] = self.geometry.pack()
        self.reader = ArenaReader(self._map)
        self.allocator = SlabAllocator(self.geometry.data_bytes, self.geometry.page_bytes)
        self._slot_gen: dict[int, int] = {}
        self._where: dict[BlockHash, tuple[int, int]] = {}  # hash -> (index entry, slot offset)
        self._leases: dict[int, int] = {}  # slot offset -> leases not given back
        self._free_when_unleased: set[int] = set()

    @property
    def capacity_bytes(self) -> int:
        return self.geometry.data_bytes

    def __contains__(self, block: BlockHash) -> bool:
        return block in self._where

    def __len__(self) -> int:
        return len(self._where)

    def fits(self, block_size: int) -> bool:
        return self.allocator.can_allocate(slot_class(block_size))

    def slot_bytes(self, block: BlockHash) -> int:
        return self.allocator.class_of(self._where[block][1])

    def put(self, block: KVBlock, crc: int) -> bool:
        """Write a block into a new slot and index it; False if no slot is free."""
        size_class = slot_class(len(block.header) + len(block.payload))
        offset = self.allocator.allocate(size_class)
        if offset is None:
            return False
        view = self._view
        start = self.geometry.data_offset + offset
        gen = self._slot_gen.get(offset, 0) + 1  # odd: being written
        FRAME.pack_into(view, start, gen, block.hash, len(block.header), len(block.payload), crc, 0)
        body = start + FRAME.size
        view[body : body + len(block.header)] = block.header
        end = body + len(block.header) + len(block.payload)
        view[body + len(block.header) : end] = block.payload
        TRAILER.pack_into(view, end, gen + 1)
        FRAME.pack_into(view, start, gen + 1, block.hash, len(block.header), len(block.payload), crc, 0)
        self._slot_gen[offset] = gen + 1
        self._where[block.hash] = (self._index_insert(block.hash, offset, size_class), offset)
        return True

    def get(self, block: BlockHash) -> KVBlock | None:
        where = self._where.get(block)
        return None if where is None else self.reader.read_slot(where[1], block)

    def lease(self, block: BlockHash) -> SlotLease | None:
        """The block as a view of its slot, which stays unused by other blocks until `unlease`."""
        where = self._where.get(block)
        if where is None:
            return None
        offset = where[1]
        start = self.geometry.data_offset + offset
        _gen, _hash, header_len, payload_len, crc, _pad = FRAME.unpack_from(self._view, start)
        body = start + FRAME.size
        header = bytes(self._view[body : body + header_len])
        payload = self._view[body + header_len : body + header_len + payload_len]
        self._leases[offset] = self._leases.get(offset, 0) + 1
        return SlotLease(offset, block, header, payload, crc)

    def unlease(self, offset: int) -> None:
        left = self._leases[offset] - 1
        if left:
            self._leases[offset] = left
            return
        del self._leases[offset]
        if offset in self._free_when_unleased:
            self._free_when_unleased.discard(offset)
            self.allocator.release(offset)

    def remove(self, block: BlockHash) -> bool:
        where = self._where.pop(block, None)
        if where is None:
            return False
        entry, offset = where
        self._write_entry(entry, block, 0, TOMBSTONE)
        self._trim_tombstones(entry)
        gen = self._slot_gen[offset] + 1  # odd: readers holding the old location give up
        GEN.pack_into(self._view, self.geometry.data_offset + offset, gen)
        self._slot_gen[offset] = gen + 1
        if offset in self._leases:
            self._free_when_unleased.add(offset)
        else:
            self.allocator.release(offset)
        return True

    def _index_insert(self, block: BlockHash, offset: int, length: int) -> int:
        entries = self.geometry.index_entries
        index = home(block, entries)
        for _ in range(entries):
            slot_length = self._length_at(index)
            if slot_length in (0, TOMBSTONE):
                self._write_entry(index, block, offset, length)
                return index
            index = (index + 1) % entries
        raise RuntimeError("arena index is full")  # sized at twice the slots: cannot happen

    def _length_at(self, index: int) -> int:
        return int(ENTRY.unpack_from(self._view, self._entry_offset(index))[3])

    def _trim_tombstones(self, index: int) -> None:
        """Empty a run of tombstones that ends at an empty entry (no probe passes through it)."""
        entries = self.geometry.index_entries
        if self._length_at((index + 1) % entries) != 0:
            return
        while self._length_at(index) == TOMBSTONE:
            self._write_entry(index, bytes(16), 0, 0)
            index = (index - 1) % entries

    def _entry_offset(self, index: int) -> int:
        return self.geometry.index_offset + index * ENTRY.size

    def _write_entry(self, index: int, block: BlockHash, offset: int, length: int) -> None:
        position = self._entry_offset(index)
        _hash, _slot, gen, _length = ENTRY.unpack_from(self._view, position)
        ENTRY.pack_into(self._view, position, block, offset, gen + 1 if gen % 2 == 0 else gen, length)
        ENTRY.pack_into(self._view, position, block, offset, (gen | 1) + 1, length)

    def close(self) -> None:
        self.reader.view.release()
        self._view.release()
        # A reply still on its way out of a closing connection can hold a view of a slot; the
        # mapping then goes when that view does, and the file is unlinked below either way.
        with contextlib.suppress(BufferError):
            self._map.close()
        self.path.unlink(missing_ok=True)
