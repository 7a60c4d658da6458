"""The kvstore's shared-memory arena: its layout, and lock-free reads of it.

The kvstore keeps its memory tier in one file on tmpfs (/dev/shm) that
clients on the same host map read-only, so a local Get is a memory copy with
no network round trip and no server work. Only the server writes.

    header (4 KiB)   magic, version, index entries, offsets, sizes
    index            open-addressing table of 32-byte entries:
                     hash[16] | slot offset u64 | gen u32 | length u32
    data             slots: frame (40 B) | header | payload | trailer gen u64
                     frame = gen u64 | hash[16] | header_len u32 | payload_len u32 | crc32c u32 | pad u32
                     (crc32c is of the payload, as in shoal.v1.BlockMeta)

Both entries and slots are seqlocks: the writer makes `gen` odd, writes, then
makes it even again (the slot's trailer repeats its gen). A reader accepts
what it copied only if `gen` was even and unchanged across the copy and the
hash is the one it asked for; otherwise it retries or reports a miss. This
relies on stores becoming visible in program order (x86-64); elsewhere
readers also verify the CRC. An entry of length 0 is empty and ends a probe;
a deleted one (length TOMBSTONE) keeps it going. A reader may miss a block
that is being written or moved; clients then ask the server over gRPC, so a
local miss is never wrong, only slower.
"""

from __future__ import annotations

import contextlib
import mmap
import platform
import struct
from dataclasses import dataclass

from shared.hashing import HASH_BYTES, BlockHash
from shared.types.kv import KVBlock, checksum

MAGIC = b"SHKVARN1"
VERSION = 2  # 2: the frame's checksum is CRC-32C (1 had zlib's CRC-32)
HEADER_BYTES = 4096
ENTRY = struct.Struct(f"<{HASH_BYTES}sQII")
FRAME = struct.Struct(f"<Q{HASH_BYTES}sIIII")
GEN = struct.Struct("<Q")
TRAILER = GEN
ARENA_HEADER = struct.Struct("<8sIIQQQQ8s")
TOMBSTONE = 0xFFFFFFFF
SLOT_OVERHEAD = FRAME.size + TRAILER.size
_TSO = platform.machine().lower() in {"x86_64", "amd64", "i686", "i386"}
_RETRIES = 3
_MADV_POPULATE_READ = 22


@dataclass(frozen=True)
class ArenaGeometry:
    index_entries: int
    index_offset: int
    data_offset: int
    data_bytes: int
    page_bytes: int
    arena_id: bytes = bytes(8)

    @classmethod
    def plan(cls, data_bytes: int, page_bytes: int, min_slot_bytes: int, arena_id: bytes) -> ArenaGeometry:
        """Room for the data and an index twice as large as the most slots it can hold."""
        pages = max(1, data_bytes // page_bytes)
        entries = max(1024, 2 * pages * (page_bytes // min_slot_bytes))
        index_offset = HEADER_BYTES
        data_offset = _align(index_offset + entries * ENTRY.size, 4096)
        return cls(entries, index_offset, data_offset, pages * page_bytes, page_bytes, arena_id)

    @property
    def file_bytes(self) -> int:
        return self.data_offset + self.data_bytes

    def pack(self) -> bytes:
        return ARENA_HEADER.pack(
            MAGIC,
            VERSION,
            self.index_entries,
            self.index_offset,
            self.data_offset,
            self.data_bytes,
            self.page_bytes,
            self.arena_id,
        )

    @classmethod
    def unpack(cls, raw: bytes) -> ArenaGeometry:
        magic, version, entries, index_offset, data_offset, data_bytes, page_bytes, arena_id = ARENA_HEADER.unpack_from(
            raw
        )
        if magic != MAGIC or version != VERSION:
            raise ValueError("not a shoal kvstore arena (or another version)")
        return cls(entries, index_offset, data_offset, data_bytes, page_bytes, arena_id)


def _align(value: int, to: int) -> int:
    return -(-value // to) * to


def home(block: BlockHash, entries: int) -> int:
    """The index entry where a probe for `block` starts."""
    return int.from_bytes(block[:8], "little") % entries


class ArenaReader:
    """Read-only view of an arena (clients; the server reads through it too)."""

    def __init__(self, buffer: mmap.mmap | memoryview) -> None:
        self._buffer = buffer
        self.view = memoryview(buffer)
        self.geometry = ArenaGeometry.unpack(bytes(self.view[: ARENA_HEADER.size]))

    @classmethod
    def open(cls, path: str) -> ArenaReader:
        with open(path, "rb") as handle:
            mapped = mmap.mmap(handle.fileno(), 0, prot=mmap.PROT_READ)
        # Map every page into this process now (~0.25 s per GiB): faulting
        # them in one by one on first read would cost more than the copies.
        with contextlib.suppress(OSError, ValueError):
            mapped.madvise(_MADV_POPULATE_READ)
        return cls(mapped)

    def _entry_at(self, index: int) -> tuple[bytes, int, int, int]:
        offset = self.geometry.index_offset + index * ENTRY.size
        for _ in range(_RETRIES):
            block_hash, slot, gen, length = ENTRY.unpack_from(self.view, offset)
            if gen % 2 == 0 and ENTRY.unpack_from(self.view, offset)[2] == gen:
                return block_hash, slot, gen, length
        return b"", 0, 1, 0  # kept changing: treated as busy

    def locate(self, block: BlockHash) -> tuple[int, int] | None:
        """(slot offset, slot bytes) of `block`, or None."""
        entries = self.geometry.index_entries
        index = home(block, entries)
        for _ in range(entries):
            block_hash, slot, gen, length = self._entry_at(index)
            if length == 0 and gen % 2 == 0:
                return None
            if gen % 2 == 0 and block_hash == block and length != TOMBSTONE:
                return slot, length
            index = (index + 1) % entries
        return None

    def read_slot(self, slot: int, block: BlockHash) -> KVBlock | None:
        """Copy one slot out, or None if it changed under the copy or holds another block."""
        view = self.view
        start = self.geometry.data_offset + slot
        for _ in range(_RETRIES):
            gen, block_hash, header_len, payload_len, crc, _pad = FRAME.unpack_from(view, start)
            if gen % 2 or block_hash != block:
                return None
            body = start + FRAME.size
            header = bytes(view[body : body + header_len])
            payload = bytes(view[body + header_len : body + header_len + payload_len])
            (trailer,) = TRAILER.unpack_from(view, body + header_len + payload_len)
            if trailer == gen and FRAME.unpack_from(view, start)[0] == gen:
                if not _TSO and checksum(payload) != crc:
                    continue
                return KVBlock(block, header, payload, crc)
        return None

    def get(self, block: BlockHash) -> KVBlock | None:
        found = self.locate(block)
        return None if found is None else self.read_slot(found[0], block)

    def close(self) -> None:
        self.view.release()
        if isinstance(self._buffer, mmap.mmap):
            self._buffer.close()
