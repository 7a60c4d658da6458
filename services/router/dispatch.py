"""Running one request on the workers: choose, stream, retry, resume, hand off.

For each request the dispatcher builds a snapshot of the serving workers
(load from the registry plus this router's own in-flight counts, cached
prefix lengths from the KV index), asks the routing policy for a worker, and
streams its tokens. Prompts with a long uncached part go through a prefill
worker first and are decoded from the handed-over KV (P/D); every hand-off
has a deadline, and a failed or slow one falls back to computing the prompt
on the decode side.

Failures: a worker that fails before the first token is replaced by another;
one that fails mid-stream is *resumed* on another worker, which continues
from the tokens already produced (sampling is seeded per position, so the
continuation is what the first worker would have produced). After
MAX_ATTEMPTS the request fails with UNAVAILABLE. A client that goes away
cancels the worker stream, which aborts the request there.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field, replace

from services.router.discovery import WorkerDirectory
from services.router.metrics import RouterMetrics
from shared.errors import DeadlineExceeded, ErrorCode, Overloaded, ShoalError, Unavailable
from shared.hashing import BlockHash
from shared.kvindex import KVIndex
from shared.policies.routing import Decision, PDPolicy, Phase, Reason, RequestView, Router, WorkerView
from shared.rpc.kvstore_client import KVStoreClient
from shared.rpc.pool import ClientPool
from shared.rpc.shoal.v1 import common_pb2, worker_pb2
from shared.rpc.worker_client import WorkerClient
from shared.state.workstats import WorkRecorder
from shared.telemetry.logging import get_logger
from shared.types.workers import WorkerRecord

log = get_logger("shoal.router.dispatch")

MAX_ATTEMPTS = 3
SESSIONS_KEPT = 100_000
# Failures that mean "this worker could not serve it": try another one.
_WORKER_FAILURES = {
    ErrorCode.UNAVAILABLE,
    ErrorCode.RESOURCE_EXHAUSTED,
    ErrorCode.CANCELLED,
    ErrorCode.INTERNAL,
}
_FINISH = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_ABORT: "abort",
}


@dataclass
class Job:
    """A tokenized request ready to dispatch."""

    request_id: str
    model: str
    prompt: list[int]
    sampling: common_pb2.SamplingParams
    hashes: list[BlockHash]
    block_size: int
    session_id: str = ""
    # A placement preference (an agent graph's plan): serve from this pool while it has a serving worker.
    pool: str = ""
    # Seconds to keep the prompt's prefix pinned in the kvstore for the session (an agent's tool call).
    pin_s: int = 0
    deadline_s: float = 600.0


@dataclass
class Chunk:
    text: str
    tokens: int
    finish: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass
class _Progress:
    produced: list[int] = field(default_factory=list)
    failed: set[str] = field(default_factory=set)
    attempts: int = 0


class Dispatcher:
    def __init__(
        self,
        directory: WorkerDirectory,
        index: KVIndex,
        router: Router,
        pd: PDPolicy,
        clients: ClientPool[WorkerClient],
        metrics: RouterMetrics,
        kvstore_address: str | None = None,
        kvstore_publisher: str | None = None,
        kv_transfer_timeout_s: float = 10.0,
        work: WorkRecorder | None = None,
        kvstores: ClientPool[KVStoreClient] | None = None,
    ) -> None:
        self.directory = directory
        self.index = index
        self.router = router
        self.pd = pd
        self.clients = clients
        self.metrics = metrics
        self.kvstore_address = kvstore_address
        self.kvstore_publisher = kvstore_publisher
        self.kv_transfer_timeout_s = kv_transfer_timeout_s
        self.work = work
        self.kvstores = kvstores
        self.pinning: set[asyncio.Task[None]] = set()
        self.inflight: dict[str, int] = {}
        self.sessions: OrderedDict[str, str] = OrderedDict()
        self._ids = itertools.count()

    # -- snapshots and decisions ------------------------------------------------

    def _views(self, records: Sequence[WorkerRecord], hashes: Sequence[BlockHash]) -> list[WorkerView]:
        cached = self.index.prefix_lengths(hashes, [r.worker_id for r in records]) if hashes else {}
        views = []
        for record in records:
            load = record.load
            mine = self.inflight.get(record.worker_id, 0)
            views.append(
                WorkerView(
                    worker_id=record.worker_id,
                    role=record.info.role.value,
                    running=max(load.running_requests, mine),
                    waiting=load.waiting_requests,
                    kv_usage=load.kv_usage,
                    max_running=record.info.max_running,
                    capacity=record.info.max_running + record.info.max_waiting,
                    cached_blocks=cached.get(record.worker_id, 0),
                    gpu_type=record.info.gpu_type,
                )
            )
        return views

    def _request_view(self, job: Job, phase: Phase) -> RequestView:
        return RequestView(
            phase=phase,
            prompt_tokens=len(job.prompt),
            prompt_blocks=len(job.hashes),
            block_size=job.block_size,
            session_id=job.session_id,
            session_worker=self.sessions.get(job.session_id, "") if job.session_id else "",
        )

    def _serving(self, job: Job) -> list[WorkerRecord]:
        records = self.directory.serving()
        if job.pool:
            preferred = [r for r in records if r.info.pool == job.pool]
            return preferred or records
        return records

    def _decide(self, job: Job, phase: Phase, views: list[WorkerView], progress: _Progress) -> Decision:
        eligible = [v for v in views if v.worker_id not in progress.failed]
        decision = self.router.route(self._request_view(job, phase), eligible)
        self.metrics.decisions.labels(phase.value, decision.reason.value).inc()
        return decision

    def _remember_session(self, job: Job, worker_id: str) -> None:
        if job.session_id:
            self.sessions[job.session_id] = worker_id
            self.sessions.move_to_end(job.session_id)
            while len(self.sessions) > SESSIONS_KEPT:
                self.sessions.popitem(last=False)

    def _account(self, prefill_worker: str, decode_worker: str, chunk: Chunk) -> None:
        """Record the work a finished request cost each pool (for the autoscaler)."""
        if self.work is None:
            return
        prefill_pool = self.directory.pool(prefill_worker)
        decode_pool = self.directory.pool(decode_worker)
        computed = max(0, chunk.prompt_tokens - chunk.cached_tokens)
        if prefill_pool is not None:
            self.work.record(prefill_pool, prefill_tokens=computed)
        if decode_pool is not None:
            self.work.record(decode_pool, requests=1, decode_tokens=chunk.completion_tokens)

    def _refuse(self, decision: Decision) -> ShoalError:
        if self.work is not None:
            self.work.refused()
        if decision.reason is Reason.ALL_OVERLOADED:
            return Overloaded("every worker for this model is at capacity; retry shortly", retry_after_s=1.0)
        return Unavailable("no worker is serving this model right now", retry_after_s=2.0)

    # -- streaming ----------------------------------------------------------------

    async def stream(self, job: Job) -> AsyncGenerator[Chunk, None]:
        """Run `job` and yield its text as it comes (see module doc)."""
        started = time.monotonic()
        progress = _Progress()
        records = self._serving(job)
        views = self._views(records, job.hashes)
        decode_side = [v for v in views if v.role != "prefill"]
        prefill_side = [v for v in views if v.role == "prefill"]
        if self.pd.disaggregate(self._request_view(job, Phase.PREFILL), decode_side, prefill_side):
            async for chunk in self._disaggregated(job, views, progress):
                yield chunk
                if chunk.finish is not None:
                    return
        while True:
            remaining = job.deadline_s - (time.monotonic() - started)
            if remaining <= 0:
                raise DeadlineExceeded(f"request did not finish within {job.deadline_s:g}s")
            views = self._views(self._serving(job), job.hashes)
            decision = self._decide(job, Phase.GENERATE, views, progress)
            if not decision.ok:
                if progress.attempts:
                    raise Unavailable(f"no worker left to retry on after {progress.attempts} failure(s)")
                raise self._refuse(decision)
            assert decision.worker_id is not None
            self._remember_session(job, decision.worker_id)
            try:
                async for chunk in self._run_on(job, decision.worker_id, views, progress, remaining):
                    if chunk.finish is not None:
                        # Before the last yield: the consumer may close this generator right after it.
                        self._account(decision.worker_id, decision.worker_id, chunk)
                        self._pin_later(job, decision.worker_id)
                    yield chunk
                    if chunk.finish is not None:
                        return
                raise Unavailable("worker stream ended without a finish reason")
            except ShoalError as exc:
                self._failed(job, decision.worker_id, exc, progress)

    def _pin_later(self, job: Job, worker_id: str) -> None:
        if job.pin_s and job.session_id and job.hashes and self.kvstores is not None and self.kvstore_address:
            task = asyncio.create_task(self._pin(job, worker_id))
            self.pinning.add(task)
            task.add_done_callback(self.pinning.discard)

    async def _pin(self, job: Job, worker_id: str) -> None:
        """Copy the prompt's prefix from the worker to the kvstore, pinned for the session: it survives the
        worker evicting it while the agent waits on a tool, and the router can import it back."""
        address = self.directory.address(worker_id)
        if address is None or self.kvstores is None or not self.kvstore_address:
            return
        try:
            blocks = await self.clients.get(address).fetch_kv(job.hashes, self.kv_transfer_timeout_s)
            stored = await self.kvstores.get(self.kvstore_address).store_blocks(
                blocks, self.kv_transfer_timeout_s, session_id=job.session_id, pin_ttl_s=job.pin_s
            )
        except ShoalError as exc:
            log.warning("could not pin a session's prefix", session=job.session_id, error=exc.message)
            return
        self.metrics.pins.labels("stored" if stored else "failed").inc()

    def _failed(self, job: Job, worker_id: str, exc: ShoalError, progress: _Progress) -> None:
        if exc.code not in _WORKER_FAILURES:
            raise exc
        progress.failed.add(worker_id)
        progress.attempts += 1
        self.directory.bench(worker_id)
        kind = "resume" if progress.produced else "retry"
        self.metrics.retries.labels(kind).inc()
        log.warning(
            "worker failed; trying another", request_id=job.request_id, worker=worker_id, kind=kind, error=exc.message
        )
        if progress.attempts >= MAX_ATTEMPTS:
            raise Unavailable(f"request failed on {progress.attempts} workers; last error: {exc.message}") from None

    def _generate_request(self, job: Job, progress: _Progress) -> worker_pb2.GenerateRequest:
        return worker_pb2.GenerateRequest(
            request_id=f"{job.request_id}-{next(self._ids)}",
            model=job.model,
            prompt_token_ids=job.prompt,
            sampling=job.sampling,
            session_id=job.session_id,
            resume_token_ids=progress.produced,
        )

    async def _run_on(
        self, job: Job, worker_id: str, views: Sequence[WorkerView], progress: _Progress, timeout_s: float
    ) -> AsyncIterator[Chunk]:
        address = self.directory.address(worker_id)
        if address is None:
            raise Unavailable(f"worker {worker_id} left the registry")
        client = self.clients.get(address)
        request = self._generate_request(job, progress)
        source = self._store_source(job, worker_id, views) if not progress.produced else None
        self.inflight[worker_id] = self.inflight.get(worker_id, 0) + 1
        try:
            if source is None:
                stream = client.generate(request, timeout_s)
            else:
                stream = client.decode(worker_pb2.DecodeRequest(request=request, kv_source=source), timeout_s)
            async for response in stream:
                yield self._chunk(response, progress)
        finally:
            self.inflight[worker_id] -= 1

    def _chunk(self, response: worker_pb2.GenerateResponse, progress: _Progress) -> Chunk:
        progress.produced.extend(response.token_ids)
        if response.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED:
            return Chunk(response.text, len(response.token_ids))
        usage = response.usage
        return Chunk(
            response.text,
            len(response.token_ids),
            _FINISH[response.finish_reason],
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.cached_prompt_tokens,
        )

    def _store_source(self, job: Job, worker_id: str, views: Sequence[WorkerView]) -> worker_pb2.KVSource | None:
        """Import the prompt's prefix from the kvstore when it holds more than the worker does."""
        if not (self.kvstore_address and self.kvstore_publisher and job.hashes):
            return None
        stored = self.index.prefix_lengths(job.hashes, [self.kvstore_publisher]).get(self.kvstore_publisher, 0)
        local = next((v.cached_blocks for v in views if v.worker_id == worker_id), 0)
        if stored <= local:
            return None
        self.metrics.kv_source.labels("kvstore").inc()
        return worker_pb2.KVSource(
            kvstore=common_pb2.KVStoreRef(address=self.kvstore_address),
            block_hashes=job.hashes[:stored],
            timeout_ms=int(self.kv_transfer_timeout_s * 1000),
        )

    # -- prefill / decode ---------------------------------------------------------

    async def _disaggregated(self, job: Job, views: list[WorkerView], progress: _Progress) -> AsyncIterator[Chunk]:
        """Prefill on the prefill pool and decode from its KV; on any failure, fall back."""
        prefill = self._decide(job, Phase.PREFILL, views, progress)
        decode = self._decide(job, Phase.DECODE, views, progress)
        prefill_address = self.directory.address(prefill.worker_id or "")
        decode_address = self.directory.address(decode.worker_id or "")
        if prefill_address is None or decode_address is None:
            return
        assert decode.worker_id is not None and prefill.worker_id is not None
        sink = (
            worker_pb2.KVSink(kvstore=common_pb2.KVStoreRef(address=self.kvstore_address), session_id=job.session_id)
            if self.kvstore_address
            else worker_pb2.KVSink(hold=True)
        )
        self.inflight[prefill.worker_id] = self.inflight.get(prefill.worker_id, 0) + 1
        try:
            result = await self.clients.get(prefill_address).prefill(
                worker_pb2.PrefillRequest(
                    request_id=f"{job.request_id}-prefill",
                    model=job.model,
                    prompt_token_ids=job.prompt,
                    sampling=job.sampling,
                    sink=sink,
                ),
                timeout_s=self.kv_transfer_timeout_s + _prefill_budget(len(job.prompt)),
            )
        except ShoalError as exc:
            if exc.code not in _WORKER_FAILURES and exc.code is not ErrorCode.DEADLINE_EXCEEDED:
                raise
            self.directory.bench(prefill.worker_id)
            self.metrics.pd.labels("prefill-failed").inc()
            log.warning("prefill failed; computing the prompt on the decode side", error=exc.message)
            return
        finally:
            self.inflight[prefill.worker_id] -= 1
        progress.produced.append(result.first_token_id)
        if result.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
            usage = result.usage
            final = Chunk(result.first_text, 1, _FINISH[result.finish_reason], usage.prompt_tokens, 1)
            self._account(prefill.worker_id, prefill.worker_id, final)
            yield final
            return
        yield Chunk(result.first_text, 1)
        self._remember_session(job, decode.worker_id)
        origin = (
            {"kvstore": common_pb2.KVStoreRef(address=self.kvstore_address)}
            if self.kvstore_address
            else {"peer": common_pb2.PeerRef(address=prefill_address)}
        )
        source = worker_pb2.KVSource(
            block_hashes=result.block_hashes, timeout_ms=int(self.kv_transfer_timeout_s * 1000), **origin
        )
        request = worker_pb2.DecodeRequest(request=self._generate_request(job, progress), kv_source=source)
        self.metrics.pd.labels("disaggregated").inc()
        self.inflight[decode.worker_id] = self.inflight.get(decode.worker_id, 0) + 1
        try:
            async for response in self.clients.get(decode_address).decode(request, job.deadline_s):
                chunk = self._chunk(response, progress)
                if chunk.finish is not None:
                    # The decode worker recomputed only the uncached tail; the prompt was the prefill pool's.
                    self._account(prefill.worker_id, decode.worker_id, replace(chunk, cached_tokens=0))
                yield chunk
        except ShoalError as exc:
            # The caller resumes on another worker from the tokens produced so far.
            self._failed(job, decode.worker_id, exc, progress)
        finally:
            self.inflight[decode.worker_id] -= 1


def _prefill_budget(prompt_tokens: int) -> float:
    """Generous time to compute a prompt: a slow engine does a few thousand tokens a second."""
    return 5.0 + prompt_tokens / 500
