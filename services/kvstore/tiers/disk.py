"""The disk tier: one file per block in a folder, found again after a restart.

A block file is a fixed frame — magic, header length, payload length, a
CRC-32C of the hash, header and payload, the hash — followed by the header and
payload. Files written before CRC-32C (magic SHKVBLK1, zlib's CRC-32) are
still read. Files are written to a temporary name, synced, and renamed into
place (the folder synced too), so a reader never sees a partial block and a
crash leaves at most a stray temporary file (removed at the next start). A write the
disk refuses (full, or failing) removes its temporary file and raises
DiskFull; the tier then takes no more blocks for a while (the store drops
evicted blocks instead of retrying the same spill). At start the folder is
only listed (names and sizes), after the service is already serving: the
blocks found join the index when the listing ends, and until then read as
absent (a cache may miss). Every read verifies its block's checksum, and a corrupt or truncated file is
deleted, never served. Methods block (file I/O): the store calls them from
worker threads; the index is updated on the store's loop.
"""

from __future__ import annotations

import os
import struct
import time
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path

from shared.hashing import HASH_BYTES, BlockHash
from shared.telemetry.logging import get_logger
from shared.types.kv import KVBlock, checksum

log = get_logger("shoal.kvstore.disk")

MAGIC = b"SHKVBLK2"
_CHECKSUMS: dict[bytes, Callable[[bytes], int]] = {MAGIC: checksum, b"SHKVBLK1": zlib.crc32}
_FRAME = struct.Struct(f"<8sIQI{HASH_BYTES}s")
SUFFIX = ".blk"


def encode(block: KVBlock) -> bytes:
    body = block.hash + block.header + block.payload
    frame = _FRAME.pack(MAGIC, len(block.header), len(block.payload), checksum(body), block.hash)
    return frame + block.header + block.payload


def decode(data: bytes) -> KVBlock | None:
    """The block in a file's bytes, or None if they are not an intact block."""
    if len(data) < _FRAME.size:
        return None
    magic, header_len, payload_len, crc, block_hash = _FRAME.unpack_from(data)
    algorithm = _CHECKSUMS.get(magic)
    if algorithm is None or len(data) != _FRAME.size + header_len + payload_len:
        return None
    header = data[_FRAME.size : _FRAME.size + header_len]
    payload = data[_FRAME.size + header_len :]
    if algorithm(block_hash + header + payload) != crc:
        return None
    return KVBlock(block_hash, header, payload)


# After the disk refused a write, the tier takes no more blocks for this long.
FULL_BACKOFF_S = 30.0


class DiskFull(OSError):
    """The disk refused a block (no space, or an I/O error); nothing of it was left behind."""


class DiskTier:
    def __init__(self, folder: Path, capacity_bytes: int) -> None:
        self.folder = folder
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self.evictions = 0
        self.corrupt_dropped = 0
        self.write_failures = 0
        self._sizes: dict[BlockHash, int] = {}
        self._refusing_until = 0.0
        # Names this run's temporary files, so a listing made while it writes leaves them be.
        self._run = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def __contains__(self, block: BlockHash) -> bool:
        return block in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def _path(self, block: BlockHash) -> Path:
        return self.folder / f"{block.hex()}{SUFFIX}"

    def listing(self) -> list[tuple[BlockHash, int]]:
        """The blocks in the folder and their file sizes, from its listing alone (blocking; no block is
        read: reads verify them). Removes temporary files left by earlier runs and files that are no block.
        Safe while this tier writes: its own temporary files carry this run's token."""
        self.folder.mkdir(parents=True, exist_ok=True)
        found: list[tuple[BlockHash, int]] = []
        with os.scandir(self.folder) as entries:
            for entry in entries:
                name, _, suffix = entry.name.partition(".")
                if f".{suffix}" != SUFFIX:
                    if not suffix.endswith(self._run):
                        os.unlink(entry.path)  # a temporary file from an interrupted write
                    continue
                try:
                    block = bytes.fromhex(name)
                    size = entry.stat().st_size
                except (ValueError, OSError):
                    block, size = b"", 0
                if len(block) != HASH_BYTES or size < _FRAME.size:
                    log.warning("dropping a file that is no block", path=entry.path)
                    self.corrupt_dropped += 1
                    os.unlink(entry.path)
                    continue
                found.append((block, size))
        return found

    def adopt(self, found: list[tuple[BlockHash, int]]) -> list[BlockHash]:
        """Index what `listing` found (on the loop); returns the blocks new to the index."""
        new = [(block, size) for block, size in found if block not in self._sizes]
        for block, size in new:
            self._sizes[block] = size
            self.used_bytes += size
        return [block for block, _ in new]

    def file_size(self, block: KVBlock) -> int:
        return _FRAME.size + len(block.header) + len(block.payload)

    def fits(self, size: int) -> bool:
        if time.monotonic() < self._refusing_until:
            return False
        return self.used_bytes + size <= self.capacity_bytes

    def write(self, block: KVBlock) -> None:
        """Write a block file durably and atomically (blocking); DiskFull when the disk refuses it.
        Call `added` on the loop after."""
        path = self._path(block.hash)
        temporary = path.with_suffix(f".tmp{self._run}")
        try:
            with open(temporary, "wb") as handle:
                handle.write(encode(block))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
            directory = os.open(self.folder, os.O_RDONLY)
            try:
                os.fsync(directory)  # the rename itself survives a power loss
            finally:
                os.close(directory)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            self.write_failures += 1
            self._refusing_until = time.monotonic() + FULL_BACKOFF_S
            log.warning("the disk tier refused a block; it takes none for a while", error=str(exc))
            raise DiskFull(exc.errno, f"disk tier: {exc.strerror or exc}") from exc

    def added(self, block: KVBlock) -> None:
        size = self.file_size(block)
        self.used_bytes += size - self._sizes.get(block.hash, 0)
        self._sizes[block.hash] = size

    def read(self, block: BlockHash) -> KVBlock | None:
        """Read and verify a block (blocking); a corrupt file is deleted and reads as absent."""
        path = self._path(block)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        decoded = decode(data)
        if decoded is None or decoded.hash != block:
            log.warning("dropping corrupt block file on read", path=str(path))
            self.corrupt_dropped += 1
            path.unlink(missing_ok=True)
            return None
        return decoded

    def forget(self, block: BlockHash) -> bool:
        """Drop a block from the index (on the loop); `unlink` removes the file."""
        size = self._sizes.pop(block, None)
        if size is None:
            return False
        self.used_bytes -= size
        return True

    def unlink(self, block: BlockHash) -> None:
        self._path(block).unlink(missing_ok=True)
