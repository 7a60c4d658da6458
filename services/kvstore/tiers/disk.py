"""The disk tier: one file per block in a folder, found again after a restart.

A block file is a fixed frame — magic, header length, payload length, a
CRC-32C of the hash, header and payload, the hash — followed by the header and
payload. Files written before CRC-32C (magic SHKVBLK1, zlib's CRC-32) are
still read. Files are written to a temporary name and renamed into place, so a
reader never sees a partial block and a crash leaves at most a stray
temporary file (removed at start). At start the folder is scanned, every
file's checksum verified, and corrupt or truncated files deleted, never
served. Reads verify the checksum again. Methods block (file I/O): the store
calls them from worker threads; the index is updated on the store's loop.
"""

from __future__ import annotations

import os
import struct
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


class DiskTier:
    def __init__(self, folder: Path, capacity_bytes: int) -> None:
        self.folder = folder
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self.evictions = 0
        self.corrupt_dropped = 0
        self._sizes: dict[BlockHash, int] = {}

    def __contains__(self, block: BlockHash) -> bool:
        return block in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def _path(self, block: BlockHash) -> Path:
        return self.folder / f"{block.hex()}{SUFFIX}"

    def scan(self) -> list[BlockHash]:
        """Rebuild the index from the folder (blocking); returns the blocks found intact."""
        self.folder.mkdir(parents=True, exist_ok=True)
        found: list[BlockHash] = []
        for path in sorted(self.folder.iterdir()):
            if path.suffix != SUFFIX:
                path.unlink(missing_ok=True)  # a temporary file from an interrupted write
                continue
            block = decode(path.read_bytes())
            if block is None or path.name != f"{block.hash.hex()}{SUFFIX}":
                log.warning("dropping corrupt block file", path=str(path))
                self.corrupt_dropped += 1
                path.unlink(missing_ok=True)
                continue
            self._sizes[block.hash] = path.stat().st_size
            self.used_bytes += self._sizes[block.hash]
            found.append(block.hash)
        return found

    def file_size(self, block: KVBlock) -> int:
        return _FRAME.size + len(block.header) + len(block.payload)

    def fits(self, size: int) -> bool:
        return self.used_bytes + size <= self.capacity_bytes

    def write(self, block: KVBlock) -> None:
        """Write a block file atomically (blocking). Call `added` on the loop after."""
        path = self._path(block.hash)
        temporary = path.with_suffix(f".tmp{os.getpid()}")
        with open(temporary, "wb") as handle:
            handle.write(encode(block))
        os.replace(temporary, path)

    def added(self, block: KVBlock) -> None:
        self._sizes[block.hash] = self.file_size(block)
        self.used_bytes += self._sizes[block.hash]

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
