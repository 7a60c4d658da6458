"""The kvstore's unix-socket endpoint for same-host clients (shared/kvlocal).

Each connection may name one staging file (hello), which the store maps
read-only; a put then copies the named blocks out of it, checks each one's
size and bounds, and stores them like a gRPC Put with the CRC-32 the client
computed. The bytes never crossed a wire (the client wrote them into memory
the store reads), so they are not checksummed again here; the CRC protects
them when they are read back on hosts without ordered stores and when they
spill to disk. Errors are answered in the taxonomy's terms and the
connection stays usable.

Only processes of the store's own user get in: the socket is 0600 and each
connection's peer credentials (SO_PEERCRED) are checked, and a staging file
must be one of the clients' own in the arena's folder (a hello cannot make
the store map an arbitrary file).
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import socket
import struct
from pathlib import Path
from typing import Any

from services.kvstore.store import BlockStore
from shared.errors import InvalidArgument, ShoalError
from shared.hashing import HASH_BYTES
from shared.kvlocal import protocol
from shared.kvlocal.client import STAGING_PREFIX
from shared.telemetry.logging import get_logger
from shared.types.kv import KVBlock

log = get_logger("shoal.kvstore.local")

MAX_PIN_TTL_S = 24 * 3600
MAX_HEADER_BYTES = 4096


class LocalEndpoint:
    def __init__(self, store: BlockStore, socket_path: Path, max_block_bytes: int) -> None:
        self.store = store
        self.socket_path = socket_path
        self.max_block_bytes = max_block_bytes
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.socket_path.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._serve, str(self.socket_path), limit=protocol.MAX_MESSAGE)
        os.chmod(self.socket_path, 0o600)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()  # ends each connection's read loop normally
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
        self.socket_path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        staging: mmap.mmap | None = None
        peer = _peer_uid(writer)
        if peer != os.getuid():
            log.warning("local client refused: another user", uid=peer)
            writer.close()
            return
        self._writers.add(writer)
        try:
            while (message := await protocol.read_message(reader)) is not None:
                op = message.get("op")
                try:
                    if op == "hello":
                        staging = _map_staging(self._staging_path(message.get("staging")), staging)
                        reply: dict[str, Any] | None = {"ok": True}
                    elif op == "put":
                        reply = await self._put(message, staging)
                    elif op == "touch":
                        self.store.record_access(
                            [bytes.fromhex(h) for h in message.get("hits", [])], int(message.get("misses", 0))
                        )
                        reply = None
                    else:
                        raise InvalidArgument(f"unknown op {op!r}", param="op")
                except ShoalError as exc:
                    reply = {"error": {"code": exc.code.value, "message": exc.message}}
                except (ValueError, TypeError, KeyError) as exc:
                    reply = {"error": {"code": "invalid_argument", "message": f"malformed {op} message: {exc}"}}
                if reply is not None:
                    writer.write(protocol.encode(reply))
                    await writer.drain()
        except (ValueError, ConnectionError) as exc:
            log.warning("local client dropped", error=str(exc))
        finally:
            self._writers.discard(writer)
            if staging is not None:
                staging.close()
            writer.close()

    async def _put(self, message: dict[str, Any], staging: mmap.mmap | None) -> dict[str, Any]:
        if staging is None:
            raise InvalidArgument("put before hello: no staging file mapped", param="staging")
        pin_ttl = int(message.get("pin_ttl", 0))
        if not 0 <= pin_ttl <= MAX_PIN_TTL_S:
            raise InvalidArgument(f"pin_ttl must be within [0, {MAX_PIN_TTL_S}]", param="pin_ttl")
        blocks = [self._block(entry, staging) for entry in message["blocks"]]
        result = await self.store.put(blocks, str(message.get("session", "")), pin_ttl)
        return {"stored": result.stored, "duplicates": result.duplicates}

    def _block(self, entry: list[Any], staging: mmap.mmap) -> KVBlock:
        offset, hash_hex, header_len, payload_len, crc = entry
        block_hash = bytes.fromhex(hash_hex)
        if len(block_hash) != HASH_BYTES:
            raise InvalidArgument(f"block hash must be {HASH_BYTES} bytes", param="hash")
        if header_len > MAX_HEADER_BYTES or payload_len > self.max_block_bytes:
            raise InvalidArgument(f"block exceeds the limits ({self.max_block_bytes} bytes)", param="size")
        end = offset + header_len + payload_len
        if offset < 0 or end > len(staging):
            raise InvalidArgument("block lies outside the staging file", param="offset")
        if not 0 <= crc <= 0xFFFFFFFF:
            raise InvalidArgument("crc32c out of range", param="crc32c")
        return KVBlock(block_hash, staging[offset : offset + header_len], staging[offset + header_len : end], crc)

    def _staging_path(self, named: object) -> str:
        path = Path(str(named or ""))
        if path.parent != self.socket_path.parent or not path.name.startswith(STAGING_PREFIX):
            raise InvalidArgument(
                f"a staging file must be {self.socket_path.parent}/{STAGING_PREFIX}*", param="staging"
            )
        return str(path)


def _peer_uid(writer: asyncio.StreamWriter) -> int | None:
    sock = writer.get_extra_info("socket")
    try:
        _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    except (OSError, AttributeError):
        return None
    return int(uid)


def _map_staging(path: str, previous: mmap.mmap | None) -> mmap.mmap:
    if previous is not None:
        previous.close()
    try:
        with open(path, "rb") as handle:
            return mmap.mmap(handle.fileno(), 0, prot=mmap.PROT_READ)
    except OSError as exc:
        raise InvalidArgument(f"cannot map staging file {path!r}: {exc.strerror}", param="staging") from None
