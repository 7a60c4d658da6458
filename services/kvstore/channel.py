"""The kvstore's "kv" data channel: Get and Put of KV bytes without gRPC.

The protocol is in protos/shoal/v1/kvstore.proto (KVChannelRequest): a
request frame, a put's payload frames after it, a reply frame and a get's
payload frames after that. Payloads never pass through protobuf: a put's
payload arrives in a buffer of its own (shared/rpc/channel.py reads big
frames straight into one), is checked against its size and CRC-32 and
copied once into the arena; a get's payload goes to the socket straight from
its arena slot, leased until the kernel has the bytes (services/kvstore/arena.py),
or copied out first when the connection is still sending an earlier reply
(a client that asks without reading could otherwise hold slots without end)
or the block is read from disk. Requests on one connection are answered in
order, one at a time; clients open several connections to overlap them.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import Literal

from services.kvstore.arena import SlotLease
from services.kvstore.server import KVStoreMetrics, check_hashes, check_pin_ttl
from services.kvstore.store import BlockStore
from shared.errors import Internal, InvalidArgument, ShoalError
from shared.rpc.blocks import MAX_HEADER_BYTES, CorruptBlock
from shared.rpc.channel import ServerConnection, parse
from shared.rpc.shoal.v1 import kvstore_pb2
from shared.telemetry.logging import get_logger
from shared.types.kv import KVBlock, checksum

log = get_logger("shoal.kvstore.channel")

CHANNEL = "kv"


class KVChannel:
    """One client's connection (a ChannelHandler)."""

    def __init__(
        self, store: BlockStore, metrics: KVStoreMetrics, max_block_bytes: int, conn: ServerConnection
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.max_block_bytes = max_block_bytes
        self.conn = conn
        self._put: kvstore_pb2.KVChannelPut | None = None
        self._payloads: list[bytes | bytearray] = []
        self._queue: deque[tuple[kvstore_pb2.KVChannelRequest, list[bytes | bytearray]]] = deque()
        self._runner: asyncio.Task[None] | None = None

    def frame(self, payload: memoryview | bytearray) -> None:
        if self._put is not None:
            self._payloads.append(payload if isinstance(payload, bytearray) else bytes(payload))
            if len(self._payloads) == len(self._put.blocks):
                request = kvstore_pb2.KVChannelRequest(put=self._put)
                self._put = None
                self._enqueue(request, self._payloads)
                self._payloads = []
            return
        try:
            request = parse(kvstore_pb2.KVChannelRequest(), payload)
        except Exception:
            self._refuse(InvalidArgument("the frame is not a KVChannelRequest"))
            return
        op: Literal["get", "put"] | None = request.WhichOneof("op")
        if op == "put" and request.put.blocks:
            try:
                self._check_put(request.put)
            except ShoalError as exc:
                # Its payload frames would follow and be misread as requests: answer, then close.
                self._refuse(exc)
                return
            self._put = request.put
            return
        self._enqueue(request, [])

    def _check_put(self, put: kvstore_pb2.KVChannelPut) -> None:
        check_hashes([meta.hash for meta in put.blocks])
        check_pin_ttl(put.pin_ttl_s)
        for meta in put.blocks:
            if meta.size > self.max_block_bytes:
                raise InvalidArgument(f"block of {meta.size} bytes exceeds the limit of {self.max_block_bytes}")
            if len(meta.header) > MAX_HEADER_BYTES:
                raise InvalidArgument(f"block header of {len(meta.header)} bytes exceeds {MAX_HEADER_BYTES}")

    def _enqueue(self, request: kvstore_pb2.KVChannelRequest, payloads: list[bytes | bytearray]) -> None:
        idle = not self._queue and (self._runner is None or self._runner.done())
        if idle and request.WhichOneof("op") == "get" and self._answer_now(request.get):
            return
        self._queue.append((request, payloads))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while self._queue and not self.conn.is_closed:
            request, payloads = self._queue.popleft()
            try:
                if request.WhichOneof("op") == "get":
                    await self._get(request.get)
                else:
                    await self._store(request.put, payloads)
            except ShoalError as exc:
                self.conn.send(_error(exc))
            except Exception as exc:
                log.exception("kv channel request failed")
                self.conn.send(_error(Internal(f"{type(exc).__name__}: {exc}")))

    def _answer_now(self, get: kvstore_pb2.KVChannelGet) -> bool:
        """Answer a get in this turn of the event loop (no task) when it needs no disk read."""
        hashes = list(get.hashes)
        try:
            check_hashes(hashes)
        except ShoalError as exc:
            self.conn.send(_error(exc))
            return True
        if any(self.store.only_on_disk(block_hash) for block_hash in hashes):
            return False
        read = self.store.get_now if self.conn.sending else self.store.lease_now
        found: list[KVBlock | SlotLease] = []
        for block_hash in hashes:
            block = read(block_hash)
            if block is not None:
                found.append(block)
            elif get.prefix_only:
                break
        self._send_blocks(found)
        leases = [block for block in found if isinstance(block, SlotLease)]
        if leases:
            self.conn.after_sent(lambda: self._unlease(leases))
        return True

    def _unlease(self, leases: list[SlotLease]) -> None:
        for lease in leases:
            self.store.unlease(lease)

    async def _get(self, get: kvstore_pb2.KVChannelGet) -> None:
        hashes = list(get.hashes)
        check_hashes(hashes)
        found: list[KVBlock] = []
        for block_hash in hashes:
            block = await self.store.get(block_hash)
            if block is not None:
                found.append(block)
            elif get.prefix_only:
                break
        self._send_blocks(found)

    def _send_blocks(self, found: Sequence[KVBlock | SlotLease]) -> None:
        reply = kvstore_pb2.KVChannelReply()
        for block in found:
            reply.blocks.add(hash=block.hash, size=len(block.payload), crc32c=block.checksum(), header=block.header)
        self.conn.send_parts([reply.SerializeToString(), *(block.payload for block in found)])
        self.metrics.bytes.labels("out").inc(sum(len(block.payload) for block in found))

    async def _store(self, put: kvstore_pb2.KVChannelPut, payloads: list[bytes | bytearray]) -> None:
        blocks = []
        for meta, payload in zip(put.blocks, payloads, strict=True):
            if len(payload) != meta.size:
                raise CorruptBlock(f"block {meta.hash.hex()} declared {meta.size} bytes and sent {len(payload)}")
            crc = checksum(payload)
            if crc != meta.crc32c:
                raise CorruptBlock(f"block {meta.hash.hex()} failed its checksum")
            blocks.append(KVBlock(meta.hash, meta.header, payload, crc))
        result = await self.store.put(blocks, put.session_id, put.pin_ttl_s)
        self.metrics.bytes.labels("in").inc(sum(len(p) for p in payloads))
        self.conn.send(
            kvstore_pb2.KVChannelReply(stored=result.stored, duplicates=result.duplicates).SerializeToString()
        )

    def _refuse(self, error: ShoalError) -> None:
        self.conn.send(_error(error))
        self.conn.close_after_reply()

    def closed(self, error: Exception | None) -> None:
        if self._runner is not None:
            self._runner.cancel()


def _error(error: ShoalError) -> bytes:
    return kvstore_pb2.KVChannelReply(error_code=error.code.value, error_message=error.message).SerializeToString()
