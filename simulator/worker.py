"""One simulated worker: the engine's continuous batching, advanced many steps at a time.

Each step follows the live scheduler's rules (services/worker/engines/
scheduler.py): one token for every decoding request, then the next prompt
chunks of prefilling requests in admission order, then admissions in arrival
order, all under the step's token budget and the running cap. A step costs
what the performance profile says (shared/perfmodel.py), divided by the
pool's sim speed-up, exactly as the `sim` engine sleeps.

Simulating step by step would cost millions of Python iterations per
simulated hour, so the worker plans a *segment*: the run of steps whose batch
is the same (no prompt completes, no request finishes). Within a segment
every step has the same tokens and its context grows by a constant, so step
i takes a + b*i seconds and the segment's end has a closed form. A request
arriving mid-segment that could be admitted cuts the segment at the end of
the step in progress, as the live engine admits at step boundaries.

Simplifications, documented in docs/simulator.md: a request is admitted only
when its whole context (prompt + output) fits in the free KV capacity, so
there is no preemption; the prefix cache is an LRU of the workload's block
hashes (the block size of the trace, not the engine's).
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from shared.hashing import BlockHash
from shared.kvindex import KVIndex
from shared.perfmodel import PerfProfile
from shared.policies.routing import WorkerView
from simulator.workload import Request

# Sliding window of the load report the scaler reads (seconds).
REPORT_WINDOW_S = 10.0


@dataclass(eq=False, slots=True)
class Job:
    """One request's life in the simulated cluster."""

    index: int
    request: Request
    arrived: float
    cached_tokens: int = 0  # prompt tokens found in a worker's prefix cache
    prefill_worker: str = ""
    worker: str = ""
    decode_worker: str = ""  # P/D: where the job goes after its prefill
    first_token_at: float | None = None
    finished_at: float | None = None
    refused: bool = False
    # The current worker's part: the context it starts from, the tokens it
    # generates, and KV imported from a prefill worker (set by the cluster).
    context: int = 0
    to_generate: int = 0
    imported: int = 0
    # Progress on the current worker.
    prefill_left: int = 0
    queued_prefill: int = 0  # while waiting: its prompt tokens not in the worker's cache when it arrived
    position: int = 0
    ctx_base: int = 0
    reserved: int = 0

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.arrived

    @property
    def tbt(self) -> float | None:
        """Mean time between output tokens (0 for one-token outputs)."""
        if self.finished_at is None or self.first_token_at is None:
            return None
        gaps = self.request.output_tokens - 1
        return (self.finished_at - self.first_token_at) / gaps if gaps > 0 else 0.0


@dataclass(frozen=True)
class Limits:
    max_running: int
    max_batch_tokens: int
    max_waiting: int
    engine_block_size: int


@dataclass
class _Segment:
    start: float
    steps: int
    a: float  # first step's seconds
    b: float  # added seconds per following step
    chunks: list[tuple[Job, int]]
    spare: int  # budget left after the chunks (admission is possible only when > 0)

    def elapsed(self, steps: int) -> float:
        return steps * self.a + self.b * steps * (steps - 1) / 2

    def done_by(self, t: float) -> int:
        """Whole steps finished by time t."""
        dt = t - self.start
        if dt <= 0:
            return 0
        if self.b <= 0:
            steps = int(dt / self.a)
        else:
            # Largest j with a*j + b*j*(j-1)/2 <= dt.
            half = self.a - self.b / 2
            steps = int((-half + math.sqrt(half * half + 2 * self.b * dt)) / self.b)
        while steps > 0 and self.elapsed(steps) > dt:
            steps -= 1
        while self.elapsed(steps + 1) <= dt:
            steps += 1
        return min(steps, self.steps)


@dataclass
class Outcome:
    """What a segment's end produced."""

    prefilled: list[Job] = field(default_factory=list)  # prefill role: hand the job to a decode worker
    finished: list[Job] = field(default_factory=list)


class SimWorker:
    def __init__(
        self,
        worker_id: str,
        pool: str,
        role: str,
        profile: PerfProfile,
        limits: Limits,
        speedup: float,
        cache_blocks: int,
        hash_block: int,
        index: KVIndex,
        max_steps_per_segment: int = 1 << 30,
    ) -> None:
        self.worker_id = worker_id
        self.pool = pool
        self.role = role
        self.profile = profile
        self.limits = limits
        self.scale = 1.0 / speedup
        # Step-time factor from outside the engine (expert imbalance), applied from the next segment.
        self.slowdown = 1.0
        self.index = index
        self.cache_blocks = cache_blocks
        self.hash_block = hash_block
        self.kv_capacity = profile.kv_capacity_tokens
        self.max_steps = max_steps_per_segment
        self.cache: OrderedDict[BlockHash, None] = OrderedDict()
        self.waiting: deque[Job] = deque()
        self.waiting_prefill = 0  # queued_prefill summed over the waiting jobs
        self.prefilling: list[Job] = []
        self.decoding: list[tuple[int, int, Job]] = []  # heap of (finish step, job index, job)
        self.step = 0  # decode steps taken so far: a decoding job's context is ctx_base + step
        self.ctx_base_sum = 0
        self.reserved = 0
        self.segment: _Segment | None = None
        self.version = 0  # bumps when the pending segment-end event is superseded
        self.draining = False
        # (time, prefill tokens, decode tokens) per segment, and (time, ttft, tbt) per finish.
        self.work_log: deque[tuple[float, int, int]] = deque()
        self.latency_log: deque[tuple[float, float, float]] = deque()
        self._view: WorkerView | None = None

    # -- what routing and scaling see -------------------------------------------------

    @property
    def running(self) -> int:
        return len(self.prefilling) + len(self.decoding)

    @property
    def queued(self) -> int:
        return self.running + len(self.waiting)

    @property
    def idle(self) -> bool:
        return not (self.waiting or self.prefilling or self.decoding)

    @property
    def kv_tokens(self) -> int:
        """Tokens whose KV is held now (admission reserves more: each request's whole output)."""
        return sum(j.position for j in self.prefilling) + self.ctx_base_sum + len(self.decoding) * self.step

    def view(self, gpu_type: str) -> WorkerView:
        """The worker as routing sees it, without prefix lengths (the caller adds them); cached while its load holds."""
        if self._view is None:
            limits = self.limits
            self._view = WorkerView(
                worker_id=self.worker_id,
                role=self.role,
                running=self.running,
                waiting=len(self.waiting),
                kv_usage=self.kv_tokens / self.kv_capacity,
                prefill_tokens=self.waiting_prefill + sum(j.prefill_left for j in self.prefilling),
                kv_tokens=self.kv_tokens,
                max_running=limits.max_running,
                capacity=limits.max_running + limits.max_waiting,
                gpu_type=gpu_type,
            )
        return self._view

    def report(self, now: float) -> tuple[float, float, float, float]:
        """(prefill tok/s, decode tok/s, ttft p90, tbt p90) over the report window."""
        horizon = now - REPORT_WINDOW_S
        while self.work_log and self.work_log[0][0] < horizon:
            self.work_log.popleft()
        while self.latency_log and self.latency_log[0][0] < horizon:
            self.latency_log.popleft()
        prefill = sum(p for _, p, _ in self.work_log) / REPORT_WINDOW_S
        decode = sum(d for _, _, d in self.work_log) / REPORT_WINDOW_S
        ttfts = sorted(x for _, x, _ in self.latency_log)
        tbts = sorted(x for _, _, x in self.latency_log)
        return prefill, decode, _p90(ttfts), _p90(tbts)

    # -- events -----------------------------------------------------------------------

    def submit(self, job: Job, now: float) -> float | None:
        """Queue a job; returns a new segment end time when the worker must re-plan, else None."""
        job.worker = self.worker_id
        job.queued_prefill = max(0, job.context - max(self._cached_blocks(job.request) * self.hash_block, job.imported))
        self.waiting_prefill += job.queued_prefill
        self.waiting.append(job)
        self._view = None
        seg = self.segment
        if seg is None:
            return self._plan(now)
        if seg.spare <= 0 or self.running >= self.limits.max_running:
            return None  # nothing could be admitted before the segment ends anyway
        steps = seg.done_by(now) + 1
        if steps >= seg.steps:
            return None
        seg.steps = steps
        self.version += 1
        return seg.start + seg.elapsed(steps)

    def finish_segment(self, now: float) -> tuple[Outcome, float | None]:
        """Apply the segment that ends now; plan the next. Returns what happened and the next end time."""
        seg = self.segment
        assert seg is not None
        outcome = Outcome()
        k = seg.steps
        decode_tokens = k * len(self.decoding)
        self.step += k
        prefill_tokens = 0
        for job, chunk in seg.chunks:
            job.prefill_left -= k * chunk
            job.position += k * chunk
            prefill_tokens += k * chunk
            if job.prefill_left == 0:
                self.prefilling.remove(job)
                self._remember(job.request.hashes)
                if job.first_token_at is None:
                    job.first_token_at = now
                if self.role == "prefill" and job.request.output_tokens > 1:
                    self._release(job)
                    outcome.prefilled.append(job)
                elif job.to_generate <= 1:
                    self._finish(job, now, outcome)
                else:
                    self._decode(job)
        while self.decoding and self.decoding[0][0] <= self.step:
            _, _, job = heapq.heappop(self.decoding)
            self.ctx_base_sum -= job.ctx_base
            self._finish(job, now, outcome)
        self.work_log.append((now, prefill_tokens, decode_tokens))
        self.segment = None
        return outcome, self._plan(now)

    # -- internals ----------------------------------------------------------------------

    def _decode(self, job: Job) -> None:
        # Context of its next step: what it started from plus the token just sampled.
        job.ctx_base = job.context + 1 - self.step
        self.ctx_base_sum += job.ctx_base
        heapq.heappush(self.decoding, (self.step + job.to_generate - 1, job.index, job))

    def _finish(self, job: Job, now: float, outcome: Outcome) -> None:
        job.finished_at = now
        self._release(job)
        tbt = job.tbt or 0.0
        ttft = job.ttft or 0.0
        self.latency_log.append((now, ttft, tbt))
        outcome.finished.append(job)

    def _release(self, job: Job) -> None:
        self.reserved -= job.reserved
        job.reserved = 0

    def _admit(self, job: Job) -> bool:
        need = job.context + job.to_generate
        if self.reserved + need > self.kv_capacity:
            return False
        hit = min(self._match(job.request), job.context - 1)
        if not job.imported:
            job.cached_tokens = hit
        # At least one token is computed: it yields the next token's logits.
        start = min(max(hit, job.imported), job.context - 1)
        job.position = start
        job.prefill_left = job.context - start
        job.reserved = need
        self.reserved += need
        self.prefilling.append(job)
        return True

    def _cached_blocks(self, request: Request) -> int:
        """Leading prompt blocks the cache holds now."""
        matched = 0
        for block in request.hashes:
            if block not in self.cache:
                break
            matched += 1
        return matched

    def _match(self, request: Request) -> int:
        """Prompt tokens found in the cache, whose blocks become the most recently used."""
        matched = self._cached_blocks(request)
        for block in request.hashes[:matched]:
            self.cache.move_to_end(block)
        return matched * self.hash_block

    def _remember(self, hashes: tuple[BlockHash, ...]) -> None:
        if not self.cache_blocks:
            return
        added = []
        for block in hashes:
            if block in self.cache:
                self.cache.move_to_end(block)
            else:
                self.cache[block] = None
                added.append(block)
        if added:
            self.index.add(self.worker_id, added)
        evicted = []
        while len(self.cache) > self.cache_blocks:
            block, _ = self.cache.popitem(last=False)
            evicted.append(block)
        if evicted:
            self.index.remove(self.worker_id, evicted)

    def _plan(self, now: float) -> float | None:
        """Choose the next segment's batch and length; None when there is nothing to do."""
        limits = self.limits
        self._view = None  # admissions and finishes change the load
        decoders = len(self.decoding)
        budget = max(0, limits.max_batch_tokens - decoders)
        chunks: list[tuple[Job, int]] = []
        for job in self.prefilling:
            if budget == 0:
                break
            chunk = min(job.prefill_left, budget)
            chunks.append((job, chunk))
            budget -= chunk
        while self.waiting and budget > 0 and self.running < limits.max_running and self._admit(self.waiting[0]):
            job = self.waiting.popleft()
            self.waiting_prefill -= job.queued_prefill
            chunk = min(job.prefill_left, budget)
            chunks.append((job, chunk))
            budget -= chunk
        if not chunks and not decoders:
            return None
        steps = self.max_steps
        if self.decoding:
            steps = min(steps, self.decoding[0][0] - self.step)
        prefill_tokens = prefill_context = growth = 0
        for job, chunk in chunks:
            steps = min(steps, job.prefill_left // chunk)
            prefill_tokens += chunk
            prefill_context += chunk * job.position + chunk * (chunk + 1) // 2
            growth += chunk * chunk
        p = self.profile
        decode_context = self.ctx_base_sum + decoders * self.step
        scale = self.scale * self.slowdown
        a = p.step_time(prefill_tokens, prefill_context, decoders, decode_context) * scale
        b = (p.prefill_attn_s * growth + p.decode_ctx_s * decoders) * scale
        self.segment = _Segment(now, max(1, steps), a, b, chunks, budget)
        self.version += 1
        return now + self.segment.elapsed(self.segment.steps)


def _p90(values: list[float]) -> float:
    return values[int(0.9 * (len(values) - 1))] if values else 0.0
