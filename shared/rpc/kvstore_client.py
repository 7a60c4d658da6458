"""Client of the kvstore service.

Contract: the kvstore is a cache. Every method has a deadline and raises a
taxonomy error (`Unavailable`, `DeadlineExceeded`, ...) when the store is down,
slow or refuses. Request paths use the best-effort helpers `fetch_prefix` and
`store_blocks`, which never raise for transport problems: a miss or an outage
reads as "nothing cached" and a failed write as "not stored", and the caller
recomputes the KV. A store that is down therefore slows requests but never
fails them. Only corrupt data is raised (`CorruptBlock`, an InvalidArgument),
because recomputing would hide a bug.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc

from shared.errors import ShoalError, Unavailable
from shared.hashing import BlockHash
from shared.kvlocal.client import LocalAccess
from shared.rpc.blocks import BlockAssembler, CorruptBlock, block_chunks
from shared.rpc.client import CONTROL_TIMEOUT_S, PeerChannel
from shared.rpc.errors import from_rpc_error
from shared.rpc.kvchannel import KVChannelClient
from shared.rpc.security import Role, RpcSecurity
from shared.rpc.shoal.v1 import kvstore_pb2, kvstore_pb2_grpc
from shared.telemetry.logging import get_logger
from shared.telemetry.tracing import tracer
from shared.types.kv import KVBlock

log = get_logger("shoal.kvstore.client")
_tracer = tracer("shoal.kvstore.client")

# Generous: a read of a block larger than anything a worker produces.
MAX_BLOCK_BYTES = 256 * 2**20
# At most this often, a client whose fast paths failed asks the store which it offers now.
RECHECK_S = 1.0


T = TypeVar("T")


@dataclass(frozen=True)
class Lookup:
    matched: int
    tiers: list[int]


class KVStoreClient:
    """Moves KV bytes on the fastest path the store offers this process; gRPC for everything else.

    The first Put or Get asks the store (Stats) which paths it offers. On the
    same host (with `local`, the default) reads and writes go through shared
    memory, and a block not in the arena (on disk, say) comes over the data
    channel. Elsewhere they go over the "kv" data channel
    (shared/rpc/kvchannel.py). gRPC carries the bytes only when the store
    offers neither. A data channel the store closed or refuses fails that call
    (request paths read it as "not cached") and makes the client ask the
    store again, at most once per RECHECK_S, which paths it offers: a
    restarted store has a new arena and data port. A failing shared-memory
    path is turned off for that arena (it is used again only for a new one).
    """

    def __init__(
        self,
        address: str,
        security: RpcSecurity,
        timeout_s: float = 10.0,
        local: bool = True,
        data_channel: bool = True,
    ) -> None:
        self.address = address
        self.security = security
        self._want_data = data_channel
        self.timeout_s = timeout_s
        self._peer = PeerChannel(address, Role.KVSTORE, security, kvstore_pb2_grpc.KVStoreStub)
        self._want_local = local
        self._decided = False
        self._next_check = 0.0
        self._local: LocalAccess | None = None
        self._local_arena = ""
        self._failed_arena = ""
        self._data: KVChannelClient | None = None

    @property
    def uses_local_path(self) -> bool:
        return self._local is not None

    @property
    def uses_data_channel(self) -> bool:
        return self._data is not None

    async def _decide(self) -> None:
        """Ask the store which paths it offers this process (again after they failed, see the class doc)."""
        if self._decided:
            return
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + RECHECK_S
        try:
            stats = await self.stats()
        except ShoalError:
            return  # decided on a later call, once the store answers
        self._decided = True
        if stats.data_address and self._want_data:
            self._data = KVChannelClient(stats.data_address, self.security)
        info = stats.local
        if self._want_local and info.arena_path and info.arena_id != self._failed_arena:
            try:
                self._local = await LocalAccess.connect(info.arena_path, info.socket_path, info.arena_id)
            except ShoalError:
                self._local = None
            if self._local is not None:
                self._local_arena = info.arena_id
                log.info("kvstore fast path in use", address=self.address)

    async def _local_path(self) -> LocalAccess | None:
        if not self._decided:
            await self._decide()
        return self._local

    async def _drop_local(self, error: Exception) -> None:
        log.warning("kvstore fast path failed; using the data channel", address=self.address, error=str(error))
        self._failed_arena = self._local_arena
        await self._forget_paths()

    async def _forget_paths(self) -> None:
        """Drop the fast paths; the next call asks the store which it offers (it may have restarted)."""
        self._decided = False
        local, self._local = self._local, None
        data, self._data = self._data, None
        if local is not None:
            await local.close()
        if data is not None:
            await data.close()

    async def _on_data_channel(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except Unavailable:
            await self._forget_paths()  # closed or refused: the store may have restarted on a new port
            raise

    async def close(self) -> None:
        if self._local is not None:
            await self._local.close()
        if self._data is not None:
            await self._data.close()
        await self._peer.close()

    def _error(self, exc: grpc.RpcError) -> ShoalError:
        return from_rpc_error(exc, self.address)

    async def put(
        self,
        blocks: Sequence[KVBlock],
        session_id: str = "",
        pin_ttl_s: int = 0,
        timeout_s: float | None = None,
    ) -> kvstore_pb2.PutResponse:
        local = await self._local_path()
        if local is not None:
            try:
                with _tracer.start_as_current_span("kvstore.put (shared memory)"):
                    stored, duplicates = await asyncio.wait_for(
                        local.put(blocks, session_id, pin_ttl_s), timeout_s or self.timeout_s
                    )
                return kvstore_pb2.PutResponse(stored=stored, duplicates=duplicates)
            except (Unavailable, OSError, TimeoutError) as exc:
                await self._drop_local(exc)
        if self._data is not None:
            with _tracer.start_span("kvstore.put (data channel)"):
                return await self._on_data_channel(
                    self._data.put(blocks, session_id, pin_ttl_s, timeout_s or self.timeout_s)
                )
        return await self._grpc_put(blocks, session_id, pin_ttl_s, timeout_s)

    async def _grpc_put(
        self, blocks: Sequence[KVBlock], session_id: str, pin_ttl_s: int, timeout_s: float | None
    ) -> kvstore_pb2.PutResponse:
        async def requests() -> AsyncIterator[kvstore_pb2.PutRequest]:
            if session_id:
                yield kvstore_pb2.PutRequest(options=kvstore_pb2.PutOptions(session_id=session_id, pin_ttl_s=pin_ttl_s))
            for chunk in block_chunks(blocks):
                yield kvstore_pb2.PutRequest(chunk=chunk)

        try:
            response: kvstore_pb2.PutResponse = await self._peer.stub.Put(
                requests(), timeout=timeout_s or self.timeout_s
            )
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        return response

    async def get(
        self, hashes: Sequence[BlockHash], prefix_only: bool = True, timeout_s: float | None = None
    ) -> list[KVBlock]:
        """The named blocks in order; with prefix_only, up to the first missing one."""
        local = await self._local_path()
        if local is None:
            return await self._remote_get(hashes, prefix_only, timeout_s)
        with _tracer.start_as_current_span("kvstore.get (shared memory)"):
            found, missing = local.get(hashes, prefix_only)
        try:
            await local.flush_touches()
        except (Unavailable, OSError) as exc:
            await self._drop_local(exc)
        if not missing:
            return found
        remote = await self._remote_get([hashes[i] for i in missing], prefix_only, timeout_s)
        if prefix_only:
            return found + remote
        by_hash = {block.hash: block for block in found + remote}
        return [by_hash[h] for h in hashes if h in by_hash]

    async def _remote_get(
        self, hashes: Sequence[BlockHash], prefix_only: bool, timeout_s: float | None
    ) -> list[KVBlock]:
        if self._data is not None:
            # start_span, not start_as_current_span: nothing runs inside that could be its child, and
            # making it current costs a context switch on every block read.
            with _tracer.start_span("kvstore.get (data channel)"):
                return await self._on_data_channel(self._data.get(hashes, prefix_only, timeout_s or self.timeout_s))
        return await self._grpc_get(hashes, prefix_only, timeout_s)

    async def _grpc_get(self, hashes: Sequence[BlockHash], prefix_only: bool, timeout_s: float | None) -> list[KVBlock]:
        assembler = BlockAssembler(MAX_BLOCK_BYTES)
        out: list[KVBlock] = []
        call = self._peer.stub.Get(
            kvstore_pb2.GetRequest(hashes=list(hashes), prefix_only=prefix_only),
            timeout=timeout_s or self.timeout_s,
        )
        try:
            async for chunk in call:
                block = assembler.feed(chunk)
                if block is not None:
                    out.append(block)
            assembler.finish()
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        return out

    async def lookup(self, hashes: Sequence[BlockHash]) -> Lookup:
        try:
            response = await self._peer.stub.Lookup(
                kvstore_pb2.LookupRequest(hashes=list(hashes)), timeout=CONTROL_TIMEOUT_S
            )
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        return Lookup(response.matched, list(response.tiers))

    async def delete(self, hashes: Sequence[BlockHash]) -> int:
        try:
            response = await self._peer.stub.Delete(
                kvstore_pb2.DeleteRequest(hashes=list(hashes)), timeout=CONTROL_TIMEOUT_S
            )
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        return int(response.deleted)

    async def pin(self, session_id: str, hashes: Sequence[BlockHash], ttl_s: int) -> int:
        try:
            response = await self._peer.stub.Pin(
                kvstore_pb2.PinRequest(session_id=session_id, hashes=list(hashes), ttl_s=ttl_s),
                timeout=CONTROL_TIMEOUT_S,
            )
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        return int(response.pinned)

    async def stats(self) -> kvstore_pb2.StatsResponse:
        try:
            response: kvstore_pb2.StatsResponse = await self._peer.stub.Stats(
                kvstore_pb2.StatsRequest(), timeout=CONTROL_TIMEOUT_S
            )
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        return response

    # -- best-effort helpers for request paths --------------------------------

    async def fetch_prefix(self, hashes: Sequence[BlockHash], timeout_s: float) -> list[KVBlock]:
        """The stored prefix of `hashes`, or [] if the store is down or slow (see module doc)."""
        if not hashes:
            return []
        try:
            return await self.get(hashes, prefix_only=True, timeout_s=timeout_s)
        except CorruptBlock:
            raise
        except ShoalError as exc:
            log.warning("kvstore read failed; recomputing", address=self.address, error=exc.message)
            return []

    async def store_blocks(
        self, blocks: Sequence[KVBlock], timeout_s: float, session_id: str = "", pin_ttl_s: int = 0
    ) -> bool:
        """Write blocks; False (logged) if the store is down, slow or full."""
        if not blocks:
            return True
        try:
            await self.put(blocks, session_id=session_id, pin_ttl_s=pin_ttl_s, timeout_s=timeout_s)
        except ShoalError as exc:
            log.warning("kvstore write failed; blocks not shared", address=self.address, error=exc.message)
            return False
        return True
