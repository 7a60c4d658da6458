"""Running one request on the workers: choose, stream, retry, resume.

For each attempt the dispatcher builds a snapshot of the serving workers
(load from the registry plus this router's own in-flight counts, cached
prefix lengths from the KV index), asks the routing policy for a worker, and
streams the request's events over that worker's Serve session: one
long-lived gRPC stream per worker, shared by every request this router sends
there (shared/rpc/serve_client.py). Prompts with a long uncached part are
prefilled on the prefill pool first (pd.py) and decoded from the KV it left.

Failures: a worker that fails before the first token is replaced by another;
one that fails mid-stream, or stalls (its session sees no engine progress
for the stall deadline), is *resumed* on another worker, which continues
from the tokens already produced (sampling is seeded per position, so the
continuation is what the first worker would have produced). After
MAX_ATTEMPTS the request fails with UNAVAILABLE. Closing the stream (the
client went away) cancels the request on its worker.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field

from services.router.discovery import WorkerDirectory
from services.router.inflight import InflightCounts
from services.router.metrics import RouterMetrics
from services.router.pd import Handoff, Prefilled
from services.router.pinning import Pinner
from shared.errors import DeadlineExceeded, ErrorCode, Overloaded, ShoalError, Unavailable
from shared.hashing import BlockHash
from shared.kvindex import KVIndex
from shared.openai.jobs import Chunk, Job
from shared.policies.routing import Decision, PDPolicy, Phase, Reason, RequestView, Router, WorkerView
from shared.rpc.pool import ClientPool
from shared.rpc.serve_client import RequestStream, ServeSession
from shared.rpc.shoal.v1 import common_pb2, worker_pb2
from shared.state.sessions import SessionMap
from shared.state.workstats import WorkRecorder
from shared.telemetry.logging import get_logger
from shared.types.workers import WorkerRecord

log = get_logger("shoal.router.dispatch")

MAX_ATTEMPTS = 3
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
_UNFINISHED = common_pb2.FINISH_REASON_UNSPECIFIED


@dataclass
class _Progress:
    started: float = field(default_factory=time.monotonic)
    produced: list[int] = field(default_factory=list)
    # Characters of text handed to the client so far: a resumed attempt streams from there.
    sent_chars: int = 0
    failed: set[str] = field(default_factory=set)
    attempts: int = 0
    # Attempts a worker refused because it was full (backpressure, not a fault).
    busy: int = 0
    session_worker: str = ""


@dataclass(frozen=True, slots=True)
class _Attempt:
    """One try at a request: the worker that runs it, the one that computed its prompt, its KV source."""

    worker_id: str
    prefill_worker: str
    source: worker_pb2.KVSource | None
    prefill_tokens: int = 0  # prompt tokens the worker computes (neither cached there nor imported)


@dataclass(frozen=True)
class KVStoreTarget:
    """The kvstore requests may import prompt prefixes from (its address, and its name in the KV index)."""

    address: str
    publisher: str
    transfer_timeout_s: float


class Dispatcher:
    def __init__(
        self,
        directory: WorkerDirectory,
        index: KVIndex,
        router: Router,
        pd: PDPolicy,
        streams: ClientPool[ServeSession],
        metrics: RouterMetrics,
        sessions: SessionMap,
        handoff: Handoff,
        inflight: InflightCounts,
        kvstore: KVStoreTarget | None = None,
        pinner: Pinner | None = None,
        work: WorkRecorder | None = None,
        max_inflight: int = 4096,
    ) -> None:
        self.directory = directory
        self.index = index
        self.router = router
        self.pd = pd
        self.streams = streams
        self.metrics = metrics
        self.sessions = sessions
        self.handoff = handoff
        self.inflight = inflight
        self.kvstore = kvstore
        self.pinner = pinner
        self.work = work
        self.max_inflight = max_inflight
        # Requests this router is running now (admission: at most max_inflight).
        self.requests = 0
        self._ids = itertools.count()

    # -- snapshots and decisions ------------------------------------------------

    def _views(self, records: Sequence[WorkerRecord], hashes: Sequence[BlockHash]) -> list[WorkerView]:
        cached = self.index.prefix_lengths(hashes, [r.worker_id for r in records]) if hashes else {}
        views = []
        for record in records:
            load = record.load
            views.append(
                WorkerView(
                    worker_id=record.worker_id,
                    role=record.info.role.value,
                    running=max(load.running_requests, self.inflight.get(record.worker_id)),
                    waiting=load.waiting_requests,
                    kv_usage=load.kv_usage,
                    max_running=record.info.max_running,
                    capacity=record.info.max_running + record.info.max_waiting,
                    cached_blocks=cached.get(record.worker_id, 0),
                    gpu_type=record.info.gpu_type,
                    prefill_tokens=self.inflight.prefill_tokens(record.worker_id),
                    kv_tokens=load.kv_blocks_used * record.info.block_size,
                )
            )
        return views

    def _request_view(self, job: Job, phase: Phase, progress: _Progress) -> RequestView:
        return RequestView(
            phase=phase,
            prompt_tokens=len(job.prompt),
            prompt_blocks=len(job.hashes),
            block_size=job.block_size,
            session_id=job.session_id,
            session_worker=progress.session_worker,
        )

    def _serving(self, job: Job) -> list[WorkerRecord]:
        records = self.directory.serving(job.model)
        if job.pool:
            preferred = [r for r in records if r.info.pool == job.pool]
            return preferred or records
        return records

    def _decide(self, job: Job, phase: Phase, views: list[WorkerView], progress: _Progress) -> Decision:
        eligible = [v for v in views if v.worker_id not in progress.failed]
        decision = self.router.route(self._request_view(job, phase, progress), eligible)
        self.metrics.decisions.labels(job.model, phase.value, decision.reason.value).inc()
        return decision

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

    def _refuse(self, job: Job, full: bool) -> ShoalError:
        if self.work is not None:
            self.work.refused(job.model)
        if full:
            return Overloaded("every worker for this model is at capacity; retry shortly", retry_after_s=1.0)
        return Unavailable("no worker is serving this model right now", retry_after_s=2.0)

    # -- streaming ----------------------------------------------------------------

    async def stream(self, job: Job) -> AsyncGenerator[Chunk, None]:
        """Run `job` and yield its text as it comes (see module doc); Overloaded past max_inflight.

        One generator for the whole request (P/D hand-off, attempts, events): each layer of
        generators costs every streamed token a resumption.
        """
        if self.requests >= self.max_inflight:
            raise Overloaded(f"{self.max_inflight} requests in flight; retry shortly", retry_after_s=1.0)
        self.requests += 1
        self.metrics.inflight.set(self.requests)
        try:
            progress = _Progress()
            if job.session_id:
                progress.session_worker = await self.sessions.worker(job.session_id)
            views = self._views(self._serving(job), job.hashes)
            handed = await self._prefill(job, views, progress)
            if handed is not None:
                first = self._first_chunk(handed, progress)
                yield first
                if first.finish is not None:
                    return
            while True:
                attempt = self._next_attempt(job, views, progress, handed)
                handed = None
                events = self._open(job, attempt, progress)
                try:
                    with self.inflight.track(attempt.worker_id, attempt.prefill_tokens) as tracked:
                        async for event in events:
                            tracked.prefilled()
                            chunk = self._chunk(job, attempt, event, progress)
                            yield chunk
                            if chunk.finish is not None:
                                return
                    raise Unavailable(f"worker {attempt.worker_id} ended the request without a finish reason")
                except ShoalError as exc:
                    self._failed(job, attempt.worker_id, exc, progress)
                    views = self._views(self._serving(job), job.hashes)  # the load and caches have moved
                finally:
                    events.close()
        finally:
            self.requests -= 1
            self.metrics.inflight.set(self.requests)

    async def _prefill(self, job: Job, views: list[WorkerView], progress: _Progress) -> Prefilled | None:
        """The P/D hand-off when the prompt's uncached part is long enough; None: run colocated."""
        decode_side = [v for v in views if v.role != "prefill"]
        prefill_side = [v for v in views if v.role == "prefill"]
        if not self.pd.disaggregate(self._request_view(job, Phase.PREFILL, progress), decode_side, prefill_side):
            return None
        return await self.handoff.prefill(
            job.request_id,
            job.model,
            job.prompt,
            job.sampling,
            job.session_id,
            lambda phase: self._decide(job, phase, views, progress),
            lambda worker_id: _uncached(job, views, worker_id),
        )

    def _first_chunk(self, handed: Prefilled, progress: _Progress) -> Chunk:
        progress.produced.append(handed.first_token)
        progress.sent_chars += len(handed.first_text)
        logprobs = [handed.first_logprob] if handed.first_logprob is not None else []
        if handed.finish == _UNFINISHED:
            return Chunk(handed.first_text, 1, logprobs=logprobs)
        usage = handed.usage
        final = Chunk(handed.first_text, 1, _FINISH[handed.finish], usage.prompt_tokens, 1, logprobs=logprobs)
        self._account(handed.prefill_worker, handed.prefill_worker, final)
        return final

    def _next_attempt(
        self, job: Job, views: list[WorkerView], progress: _Progress, handed: Prefilled | None
    ) -> _Attempt:
        """Where the next attempt runs: the prefilled request's decode worker, or the policy's choice."""
        if handed is not None:
            attempt = _Attempt(handed.decode_worker, handed.prefill_worker, handed.source)
        else:
            decision = self._decide(job, Phase.GENERATE, views, progress)
            if decision.worker_id is None:
                if progress.attempts > progress.busy:
                    raise Unavailable(f"no worker left to retry on after {progress.attempts} failure(s)")
                raise self._refuse(job, full=progress.busy > 0 or decision.reason is Reason.ALL_OVERLOADED)
            source = self._store_source(job, decision.worker_id, views) if not progress.produced else None
            prefill = _uncached(job, views, decision.worker_id) if source is None else 0
            attempt = _Attempt(decision.worker_id, decision.worker_id, source, prefill)
        if job.session_id:
            self.sessions.remember(job.session_id, attempt.worker_id)
        return attempt

    def _open(self, job: Job, attempt: _Attempt, progress: _Progress) -> RequestStream:
        """Send the request (resuming after what was produced) on the worker's Serve session."""
        address = self.directory.data_address(attempt.worker_id)
        if address is None:
            raise Unavailable(f"worker {attempt.worker_id} left the registry")
        remaining = job.deadline_s - (time.monotonic() - progress.started)
        if remaining <= 0:
            raise DeadlineExceeded(f"request did not finish within {job.deadline_s:g}s")
        request = worker_pb2.GenerateRequest(
            request_id=f"{job.request_id}-{next(self._ids)}",
            model=job.model,
            prompt_token_ids=job.prompt,
            sampling=job.sampling,
            session_id=job.session_id,
            resume_token_ids=progress.produced,
            resume_text_chars=progress.sent_chars,
        )
        return self.streams.get(address).start(request, remaining, attempt.source, job.trace_context, job.coalesce_ms)

    def _chunk(self, job: Job, attempt: _Attempt, event: worker_pb2.StreamEvent, progress: _Progress) -> Chunk:
        progress.produced.extend(event.token_ids)
        progress.sent_chars += len(event.text)
        if event.finish_reason == _UNFINISHED:
            return Chunk(event.text, len(event.token_ids), logprobs=event.logprobs)
        usage = event.usage
        # A P/D decode recomputed only the uncached tail: the prompt was the prefill pool's work.
        cached = usage.cached_prompt_tokens if attempt.prefill_worker == attempt.worker_id else 0
        chunk = Chunk(
            event.text,
            len(event.token_ids),
            _FINISH[event.finish_reason],
            usage.prompt_tokens,
            usage.completion_tokens,
            cached,
            event.logprobs,
        )
        self._account(attempt.prefill_worker, attempt.worker_id, chunk)
        self._pin_later(job, attempt.worker_id)
        return chunk

    def _pin_later(self, job: Job, worker_id: str) -> None:
        if job.pin_s and job.session_id and job.hashes and self.pinner is not None:
            self.pinner.later(worker_id, job.hashes, job.session_id, job.pin_s)

    def _failed(self, job: Job, worker_id: str, exc: ShoalError, progress: _Progress) -> None:
        if exc.code not in _WORKER_FAILURES:
            raise exc
        progress.failed.add(worker_id)
        progress.attempts += 1
        self.directory.bench(worker_id, exc)
        kind = "resume" if progress.produced else "retry"
        self.metrics.retries.labels(kind).inc()
        if exc.code is ErrorCode.RESOURCE_EXHAUSTED:
            progress.busy += 1
            log.info("worker full; trying another", request_id=job.request_id, worker=worker_id, kind=kind)
        else:
            log.warning(
                "worker failed; trying another",
                request_id=job.request_id,
                worker=worker_id,
                kind=kind,
                error=exc.message,
            )
        if progress.attempts >= MAX_ATTEMPTS:
            if progress.busy == progress.attempts:
                raise self._refuse(job, full=True)
            raise Unavailable(f"request failed on {progress.attempts} workers; last error: {exc.message}") from None

    def _store_source(self, job: Job, worker_id: str, views: Sequence[WorkerView]) -> worker_pb2.KVSource | None:
        """Import the prompt's prefix from the kvstore when it holds more than the worker does."""
        store = self.kvstore
        if store is None or not job.hashes:
            return None
        stored = self.index.prefix_lengths(job.hashes, [store.publisher]).get(store.publisher, 0)
        local = next((v.cached_blocks for v in views if v.worker_id == worker_id), 0)
        if stored <= local:
            return None
        self.metrics.kv_source.labels("kvstore").inc()
        return worker_pb2.KVSource(
            kvstore=common_pb2.KVStoreRef(address=store.address),
            block_hashes=job.hashes[:stored],
            timeout_ms=int(store.transfer_timeout_s * 1000),
        )


def _uncached(job: Job, views: Sequence[WorkerView], worker_id: str) -> int:
    """The prompt tokens `worker_id` would compute: those past the prefix it holds."""
    held = next((v.cached_blocks for v in views if v.worker_id == worker_id), 0)
    return max(0, len(job.prompt) - held * job.block_size)
