"""The client side of the kvstore's "kv" data channel (protos: KVChannelRequest).

A `KVChannelClient` keeps up to `connections` connections to one store and
runs one request at a time on each, so that many requests can overlap. A
put's payloads go out as they are (no copy into a message), a get's payloads
land straight in buffers of their own (shared/rpc/channel.py), and each is
checked against its CRC-32C before it is returned. A connection whose
request fails in any way (broken, late, cancelled, refused) is closed and
never reused; the failure is a taxonomy error (UNAVAILABLE, DEADLINE_EXCEEDED,
INVALID_ARGUMENT...), which the kvstore client turns into "not cached" on
request paths.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from shared.errors import DeadlineExceeded, ErrorCode, Unavailable, error_for
from shared.hashing import BlockHash
from shared.rpc.blocks import CorruptBlock
from shared.rpc.channel import ClientConnection, connect, parse
from shared.rpc.security import Role, RpcSecurity
from shared.rpc.shoal.v1 import common_pb2, kvstore_pb2
from shared.types.kv import KVBlock, checksum

CHANNEL = "kv"


class _Exchange:
    """One connection and the request in flight on it: a reply frame, then its payload frames."""

    def __init__(self) -> None:
        self.conn: ClientConnection | None = None
        self._reply: kvstore_pb2.KVChannelReply | None = None
        self._payloads: list[bytes | bytearray] = []
        self._expect = 0
        self._done: asyncio.Future[kvstore_pb2.KVChannelReply] | None = None

    async def open(self, address: str, security: RpcSecurity) -> None:
        self.conn = await connect(address, CHANNEL, Role.KVSTORE, security, self._frame, self._lost)

    def _frame(self, payload: memoryview | bytearray) -> None:
        if self._done is None or self._done.done():
            return  # nothing asked: the connection will be closed as out of step
        if self._reply is None:
            self._reply = parse(kvstore_pb2.KVChannelReply(), payload)
            self._expect = len(self._reply.blocks) if not self._reply.error_code else 0
        else:
            self._payloads.append(payload if isinstance(payload, bytearray) else bytes(payload))
        if len(self._payloads) == self._expect:
            self._done.set_result(self._reply)

    def _lost(self) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_exception(Unavailable("the kvstore closed the data channel"))

    async def call(
        self, request: kvstore_pb2.KVChannelRequest, payloads: Sequence[bytes | bytearray], timeout_s: float
    ) -> tuple[kvstore_pb2.KVChannelReply, list[bytes | bytearray]]:
        assert self.conn is not None
        self._reply, self._payloads = None, []
        loop = asyncio.get_running_loop()
        done = self._done = loop.create_future()
        self.conn.send_parts([request.SerializeToString(), *payloads])
        # A timer on the future rather than asyncio.timeout: it costs a tenth of the Python time of a
        # 256 KiB Get, and the deadline only has to fail this one exchange.
        timer = loop.call_later(timeout_s, _expire, done, timeout_s)
        try:
            reply = await done
        finally:
            timer.cancel()
        if reply.error_code:
            try:
                code = ErrorCode(reply.error_code)
            except ValueError:
                code = ErrorCode.INTERNAL
            raise error_for(code, reply.error_message)
        return reply, self._payloads

    @property
    def usable(self) -> bool:
        return self.conn is not None and not self.conn.is_closed

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def _expire(done: asyncio.Future[kvstore_pb2.KVChannelReply], timeout_s: float) -> None:
    if not done.done():
        done.set_exception(DeadlineExceeded(f"the kvstore did not answer within {timeout_s:g}s"))


class KVChannelClient:
    def __init__(self, address: str, security: RpcSecurity, connections: int = 4) -> None:
        self.address = address
        self.security = security
        self._idle: list[_Exchange] = []
        self._slots = asyncio.Semaphore(connections)

    async def _call(
        self, request: kvstore_pb2.KVChannelRequest, payloads: Sequence[bytes | bytearray], timeout_s: float
    ) -> tuple[kvstore_pb2.KVChannelReply, list[bytes | bytearray]]:
        async with self._slots:
            exchange = self._idle.pop() if self._idle else None
            if exchange is None or not exchange.usable:
                exchange = _Exchange()
                await exchange.open(self.address, self.security)
            try:
                result = await exchange.call(request, payloads, timeout_s)
            except BaseException:
                # Broken, late, cancelled mid-request or refused (the store may be closing it): a
                # connection that failed a request is never reused. Errors are rare; reconnecting is cheap.
                exchange.close()
                raise
            self._idle.append(exchange)
            return result

    async def get(self, hashes: Sequence[BlockHash], prefix_only: bool, timeout_s: float) -> list[KVBlock]:
        request = kvstore_pb2.KVChannelRequest(get=kvstore_pb2.KVChannelGet(hashes=hashes, prefix_only=prefix_only))
        reply, payloads = await self._call(request, [], timeout_s)
        blocks = []
        for meta, payload in zip(reply.blocks, payloads, strict=True):
            if len(payload) != meta.size or checksum(payload) != meta.crc32c:
                raise CorruptBlock(f"block {meta.hash.hex()} arrived damaged (size or checksum)", param="data")
            blocks.append(KVBlock(meta.hash, meta.header, payload, meta.crc32c))
        return blocks

    async def put(
        self, blocks: Sequence[KVBlock], session_id: str, pin_ttl_s: int, timeout_s: float
    ) -> kvstore_pb2.PutResponse:
        metas = [
            common_pb2.BlockMeta(hash=b.hash, size=len(b.payload), crc32c=b.checksum(), header=b.header) for b in blocks
        ]
        request = kvstore_pb2.KVChannelRequest(
            put=kvstore_pb2.KVChannelPut(blocks=metas, session_id=session_id, pin_ttl_s=pin_ttl_s)
        )
        reply, _ = await self._call(request, [b.payload for b in blocks], timeout_s)
        return kvstore_pb2.PutResponse(stored=reply.stored, duplicates=reply.duplicates)

    async def close(self) -> None:
        for exchange in self._idle:
            exchange.close()
        self._idle = []
