"""Client of the Worker service, used by the router, the controller and peers.

Every call has a deadline. Failures are raised as taxonomy errors; the
caller decides whether to retry elsewhere (`error.retryable`). Streams are
cancelled when the consumer stops iterating, which aborts the request on the
worker.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any

import grpc

from shared.errors import ShoalError
from shared.hashing import BlockHash
from shared.rpc.blocks import BlockAssembler
from shared.rpc.client import CONTROL_TIMEOUT_S, PeerChannel
from shared.rpc.errors import from_rpc_error
from shared.rpc.security import Role, RpcSecurity
from shared.rpc.shoal.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from shared.types.kv import KVBlock

MAX_BLOCK_BYTES = 256 * 2**20
MIGRATION_TIMEOUT_S = 300.0


class WorkerClient:
    def __init__(self, address: str, security: RpcSecurity) -> None:
        self.address = address
        self._peer = PeerChannel(address, Role.WORKER, security, worker_pb2_grpc.WorkerStub)

    @property
    def stub(self) -> worker_pb2_grpc.WorkerStub:
        return self._peer.stub

    async def close(self) -> None:
        await self._peer.close()

    def _error(self, exc: grpc.RpcError) -> ShoalError:
        return from_rpc_error(exc, self.address)

    async def _stream(
        self, call: AsyncIterator[worker_pb2.GenerateResponse]
    ) -> AsyncGenerator[worker_pb2.GenerateResponse, None]:
        try:
            async for response in call:
                yield response
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        finally:
            cancel = getattr(call, "cancel", None)
            if cancel is not None:
                cancel()

    def generate(
        self, request: worker_pb2.GenerateRequest, timeout_s: float
    ) -> AsyncGenerator[worker_pb2.GenerateResponse, None]:
        return self._stream(self.stub.Generate(request, timeout=timeout_s))

    def decode(
        self, request: worker_pb2.DecodeRequest, timeout_s: float
    ) -> AsyncGenerator[worker_pb2.GenerateResponse, None]:
        return self._stream(self.stub.Decode(request, timeout=timeout_s))

    async def prefill(self, request: worker_pb2.PrefillRequest, timeout_s: float) -> worker_pb2.PrefillResponse:
        try:
            response: worker_pb2.PrefillResponse = await self.stub.Prefill(request, timeout=timeout_s)
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        return response

    async def abort(self, request_id: str) -> bool:
        try:
            response = await self.stub.Abort(worker_pb2.AbortRequest(request_id=request_id), timeout=CONTROL_TIMEOUT_S)
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        return bool(response.found)

    async def fetch_kv(self, hashes: Sequence[BlockHash], timeout_s: float) -> list[KVBlock]:
        """Blocks of the peer's prefix cache, up to the first it no longer holds."""
        assembler = BlockAssembler(MAX_BLOCK_BYTES)
        blocks: list[KVBlock] = []
        try:
            async for chunk in self.stub.FetchKV(
                worker_pb2.FetchKVRequest(block_hashes=list(hashes)), timeout=timeout_s
            ):
                block = assembler.feed(chunk)
                if block is not None:
                    blocks.append(block)
            assembler.finish()
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        return blocks

    async def _unary(self, method: str, request: Any, timeout_s: float = CONTROL_TIMEOUT_S) -> Any:
        try:
            return await getattr(self.stub, method)(request, timeout=timeout_s)
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    async def get_load(self) -> common_pb2.LoadReport:
        report: common_pb2.LoadReport = await self._unary("GetLoad", worker_pb2.GetLoadRequest())
        return report

    async def drain(self, wait_s: float = 0.0) -> worker_pb2.DrainResponse:
        request = worker_pb2.DrainRequest(wait_s=wait_s)
        response: worker_pb2.DrainResponse = await self._unary("Drain", request, wait_s + CONTROL_TIMEOUT_S)
        return response

    async def resume(self) -> worker_pb2.DrainResponse:
        """Undo a drain: the worker admits new requests again."""
        response: worker_pb2.DrainResponse = await self._unary("Drain", worker_pb2.DrainRequest(resume=True))
        return response

    async def expert_stats(self, window_s: float = 0.0) -> worker_pb2.ExpertStatsResponse:
        request = worker_pb2.ExpertStatsRequest(window_s=window_s)
        response: worker_pb2.ExpertStatsResponse = await self._unary("ExpertStats", request)
        return response

    async def stage_experts(self, request: worker_pb2.StageExpertsRequest) -> worker_pb2.StageExpertsResponse:
        # Loading weights from disk can take a while for big experts.
        response: worker_pb2.StageExpertsResponse = await self._unary("StageExperts", request, MIGRATION_TIMEOUT_S)
        return response

    async def commit_expert_map(self, migration_id: str, version: int) -> worker_pb2.CommitExpertMapResponse:
        request = worker_pb2.CommitExpertMapRequest(migration_id=migration_id, version=version)
        response: worker_pb2.CommitExpertMapResponse = await self._unary("CommitExpertMap", request)
        return response

    async def release_experts(self, migration_id: str, discard_staged: bool) -> worker_pb2.ReleaseExpertsResponse:
        request = worker_pb2.ReleaseExpertsRequest(migration_id=migration_id, discard_staged=discard_staged)
        response: worker_pb2.ReleaseExpertsResponse = await self._unary("ReleaseExperts", request)
        return response

    async def resize_experts(self, ranks: int, master: str = "") -> worker_pb2.ResizeExpertsResponse:
        # The regroup copies the whole KV cache to a joining rank.
        request = worker_pb2.ResizeExpertsRequest(ranks=ranks, master=master)
        response: worker_pb2.ResizeExpertsResponse = await self._unary("ResizeExperts", request, MIGRATION_TIMEOUT_S)
        return response


def drain_blocking(
    address: str, wait_s: float, security: RpcSecurity, resume: bool = False
) -> worker_pb2.DrainResponse:
    """Drain (or with `resume`, undo a drain) from synchronous code (Celery tasks): one call, its own channel."""
    import grpc as sync_grpc

    metadata = [("authorization", f"Bearer {security.token}")] if security.token else None
    with security.blocking_channel(address, Role.WORKER) as channel:
        try:
            response: worker_pb2.DrainResponse = worker_pb2_grpc.WorkerStub(channel).Drain(
                worker_pb2.DrainRequest(wait_s=wait_s, resume=resume),
                timeout=wait_s + CONTROL_TIMEOUT_S,
                metadata=metadata,
            )
        except sync_grpc.RpcError as exc:
            raise from_rpc_error(exc, address) from None
    return response
