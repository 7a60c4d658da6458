"""The prefill/decode hand-off: compute a prompt on the prefill pool, decode it from its KV elsewhere.

The prefill worker computes the prompt's KV, writes its full blocks to the
kvstore (or keeps them for the decode worker to fetch, without a kvstore) and
returns the first token at once, which the client gets while the decode
worker imports the blocks. The decode side then runs as any other attempt,
with a KV source. Every hand-off has a deadline; a prefill that fails or is
slow returns None and the caller computes the prompt on the decode side.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from services.router.discovery import WorkerDirectory
from services.router.inflight import InflightCounts
from services.router.metrics import RouterMetrics
from shared.errors import ErrorCode, ShoalError
from shared.policies.routing import Decision, Phase
from shared.rpc.pool import ClientPool
from shared.rpc.shoal.v1 import common_pb2, worker_pb2
from shared.rpc.worker_client import WorkerClient
from shared.telemetry.logging import get_logger

log = get_logger("shoal.router.pd")

# Failures of the prefill call after which the decode side computes the prompt itself.
FALLBACK = {
    ErrorCode.UNAVAILABLE,
    ErrorCode.RESOURCE_EXHAUSTED,
    ErrorCode.CANCELLED,
    ErrorCode.INTERNAL,
    ErrorCode.DEADLINE_EXCEEDED,
}


@dataclass(frozen=True)
class Prefilled:
    """A prefill's outcome: the first token, and where the decode side reads the prompt's KV."""

    prefill_worker: str
    decode_worker: str
    first_token: int
    first_text: str
    finish: common_pb2.FinishReason.ValueType
    usage: common_pb2.Usage
    source: worker_pb2.KVSource
    # The first token's, when the request asked for logprobs.
    first_logprob: common_pb2.TokenLogprob | None = None


def prefill_budget_s(prompt_tokens: int) -> float:
    """Generous time to compute a prompt: a slow engine does a few thousand tokens a second."""
    return 5.0 + prompt_tokens / 500


class Handoff:
    def __init__(
        self,
        directory: WorkerDirectory,
        clients: ClientPool[WorkerClient],
        inflight: InflightCounts,
        metrics: RouterMetrics,
        kvstore_address: str | None,
        kv_transfer_timeout_s: float,
    ) -> None:
        self.directory = directory
        self.clients = clients
        self.inflight = inflight
        self.metrics = metrics
        self.kvstore_address = kvstore_address
        self.kv_transfer_timeout_s = kv_transfer_timeout_s

    async def prefill(
        self,
        request_id: str,
        model: str,
        prompt: list[int],
        sampling: common_pb2.SamplingParams,
        session_id: str,
        decide: Callable[[Phase], Decision],
        uncached: Callable[[str], int],
    ) -> Prefilled | None:
        """Prefill on the worker `decide(PREFILL)` picks, for the one `decide(DECODE)` picks; None: fall back.

        `uncached(worker)`: the prompt tokens that worker would compute (counted as its queue meanwhile)."""
        prefill, decode = decide(Phase.PREFILL), decide(Phase.DECODE)
        if prefill.worker_id is None or decode.worker_id is None:
            return None
        prefill_address = self.directory.address(prefill.worker_id)
        if prefill_address is None or self.directory.address(decode.worker_id) is None:
            return None
        sink = (
            worker_pb2.KVSink(kvstore=common_pb2.KVStoreRef(address=self.kvstore_address), session_id=session_id)
            if self.kvstore_address
            else worker_pb2.KVSink(hold=True)
        )
        request = worker_pb2.PrefillRequest(
            request_id=f"{request_id}-prefill", model=model, prompt_token_ids=prompt, sampling=sampling, sink=sink
        )
        try:
            with self.inflight.track(prefill.worker_id, uncached(prefill.worker_id)):
                result = await self.clients.get(prefill_address).prefill(
                    request, timeout_s=self.kv_transfer_timeout_s + prefill_budget_s(len(prompt))
                )
        except ShoalError as exc:
            if exc.code not in FALLBACK:
                raise
            self.directory.bench(prefill.worker_id, exc)
            self.metrics.pd.labels("prefill-failed").inc()
            log.warning("prefill failed; computing the prompt on the decode side", error=exc.message)
            return None
        origin = (
            {"kvstore": common_pb2.KVStoreRef(address=self.kvstore_address)}
            if self.kvstore_address
            else {"peer": common_pb2.PeerRef(address=prefill_address)}
        )
        source = worker_pb2.KVSource(
            block_hashes=result.block_hashes, timeout_ms=int(self.kv_transfer_timeout_s * 1000), **origin
        )
        self.metrics.pd.labels("disaggregated").inc()
        return Prefilled(
            prefill.worker_id,
            decode.worker_id,
            result.first_token_id,
            result.first_text,
            result.finish_reason,
            result.usage,
            source,
            result.first_logprob if result.HasField("first_logprob") else None,
        )
