"""A same-host client's side of the kvstore fast path.

Reads copy blocks straight out of the store's arena (no round trip); writes
copy blocks into a staging file this client owns (populated once, so writes
run at memory speed) and name them in one small message on the store's unix
socket. Reads are reported to the store in batches so its LRU order and hit
statistics stay true. Any failure of this path disables it for the client,
which then uses gRPC (see shared/rpc/kvstore_client.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shared.errors import ErrorCode, Unavailable, error_for
from shared.hashing import BlockHash
from shared.kvlocal import protocol
from shared.kvlocal.layout import ArenaReader
from shared.types.kv import KVBlock

STAGING_BYTES = 32 * 2**20
STAGING_PREFIX = "shoal-kv-staging-"
_MADV_POPULATE_WRITE = 23
TOUCH_BATCH = 256


class LocalAccess:
    def __init__(
        self, reader: ArenaReader, stream: tuple[asyncio.StreamReader, asyncio.StreamWriter], staging_dir: Path
    ) -> None:
        self.reader = reader
        self._in, self._out = stream
        self._staging_dir = staging_dir
        self._staging: mmap.mmap | None = None
        # A new staging file's name, until the store has mapped it too.
        self._pending_staging: Path | None = None
        self._lock = asyncio.Lock()
        self._hits: list[str] = []
        self._misses = 0
        # Closed (the store failed a call, or the client let go): writes that were waiting for the lock
        # fail Unavailable instead of writing into an unmapped staging file.
        self.closed = False

    @classmethod
    async def connect(cls, arena_path: str, socket_path: str, arena_id_hex: str) -> LocalAccess | None:
        """The fast path if this process shares the store's host and /dev/shm, else None."""
        try:
            reader = ArenaReader.open(arena_path)
        except (OSError, ValueError):
            return None
        if reader.geometry.arena_id.hex() != arena_id_hex:
            reader.close()
            return None
        try:
            stream = await asyncio.open_unix_connection(socket_path, limit=protocol.MAX_MESSAGE)
        except OSError:
            reader.close()
            return None
        return cls(reader, stream, Path(arena_path).parent)

    # -- reads ----------------------------------------------------------------

    def get(self, hashes: Sequence[BlockHash], prefix_only: bool) -> tuple[list[KVBlock], list[int]]:
        """Blocks found in the arena, and the positions (in `hashes`) not found there."""
        found: list[KVBlock] = []
        missing: list[int] = []
        for position, block_hash in enumerate(hashes):
            block = self.reader.get(block_hash)
            if block is None:
                missing.append(position)
                if prefix_only:
                    missing.extend(range(position + 1, len(hashes)))
                    break
                continue
            found.append(block)
            self._hits.append(block_hash.hex())
        self._misses += len(missing)
        return found, missing

    async def flush_touches(self, force: bool = False) -> None:
        if not (self._hits or self._misses) or (not force and len(self._hits) < TOUCH_BATCH):
            return
        hits, self._hits = self._hits, []
        misses, self._misses = self._misses, 0
        async with self._lock:
            self._check_open()
            self._out.write(protocol.encode({"op": "touch", "hits": hits, "misses": misses}))
            await self._out.drain()

    # -- writes ---------------------------------------------------------------

    def _ensure_staging(self, size: int) -> mmap.mmap:
        if self._staging is not None and len(self._staging) >= size:
            return self._staging
        if self._staging is not None:
            self._staging.close()
        size = max(size, STAGING_BYTES)
        path = self._staging_dir / f"{STAGING_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            staging = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        with contextlib.suppress(OSError, ValueError):
            staging.madvise(_MADV_POPULATE_WRITE)
        self._staging = staging
        self._pending_staging = path
        return staging

    async def _call(self, message: dict[str, Any]) -> dict[str, Any]:
        self._out.write(protocol.encode(message))
        await self._out.drain()
        reply = await protocol.read_message(self._in)
        if reply is None:
            raise Unavailable("kvstore closed its unix socket")
        if "error" in reply:
            error = reply["error"]
            raise error_for(ErrorCode(error["code"]), error["message"])
        return reply

    async def put(self, blocks: Sequence[KVBlock], session: str = "", pin_ttl_s: int = 0) -> tuple[int, int]:
        """Store blocks through the staging file; returns (stored, duplicates)."""
        stored = duplicates = 0
        async with self._lock:
            start = 0
            while start < len(blocks):
                self._check_open()
                end, size = start, 0
                while end < len(blocks) and (end == start or size + _size(blocks[end]) <= STAGING_BYTES):
                    size += _size(blocks[end])
                    end += 1
                staging = self._ensure_staging(size)
                if self._pending_staging is not None:
                    await self._call({"op": "hello", "staging": str(self._pending_staging)})
                    # Both sides hold a mapping now; the name is no longer needed.
                    self._pending_staging.unlink(missing_ok=True)
                    self._pending_staging = None
                entries = []
                offset = 0
                for block in blocks[start:end]:
                    staging[offset : offset + len(block.header)] = block.header
                    body = offset + len(block.header)
                    staging[body : body + len(block.payload)] = block.payload
                    crc = block.checksum()
                    entries.append([offset, block.hash.hex(), len(block.header), len(block.payload), crc])
                    offset += _size(block)
                reply = await self._call({"op": "put", "session": session, "pin_ttl": pin_ttl_s, "blocks": entries})
                stored += int(reply["stored"])
                duplicates += int(reply["duplicates"])
                start = end
        return stored, duplicates

    def _check_open(self) -> None:
        if self.closed:
            raise Unavailable("the kvstore's shared-memory path was closed")

    async def close(self) -> None:
        if self.closed:
            return
        with contextlib.suppress(OSError, Unavailable, RuntimeError):
            await self.flush_touches(force=True)
        self.closed = True
        self._out.close()
        with contextlib.suppress(OSError, RuntimeError):
            await self._out.wait_closed()
        if self._staging is not None:
            self._staging.close()
        if self._pending_staging is not None:
            self._pending_staging.unlink(missing_ok=True)
        self.reader.close()


def _size(block: KVBlock) -> int:
    return len(block.header) + len(block.payload)
