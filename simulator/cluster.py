"""The event loop: arrivals, routing, worker segments, P/D hand-offs and reconcile ticks.

The decisions are the live services' code, called as they call it:
`shared.policies.routing.Router` (built from the routing document) picks
workers from `WorkerView`s whose prefix lengths come from the router's own
`KVIndex`; `PDPolicy` decides whether a prompt goes through the prefill pool;
each pool's scaling policy (`make_policy`) decides its replicas every
reconcile interval from a `PoolSnapshot` made by `pool_snapshot`, as the
reconciler makes it.
What the simulator adds is time: the workers (simulator/worker.py), cold
starts, KV transfer between prefill and decode, and drain-first scale-down.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import OrderedDict, defaultdict, deque
from dataclasses import dataclass, field, replace

from shared.kvindex import KVIndex
from shared.perfmodel import PerfProfile
from shared.policies.routing import PDPolicy, Phase, RequestView, Router, WorkerView
from shared.policies.scaling import (
    WORK_HISTORY_S,
    PolicyState,
    PoolSnapshot,
    ScalingPolicy,
    WorkerReport,
    WorkSample,
    make_policy,
    pool_snapshot,
)
from shared.types.pools import PoolCreate
from simulator.config import SimConfig, pool_profile, worker_settings
from simulator.experts import PoolExperts
from simulator.worker import Job, Limits, Outcome, SimWorker
from simulator.workload import Request, Workload

# As the reconciler: seconds of refusals counted.
REFUSED_WINDOW_S = 10.0
SESSIONS_KEPT = 100_000

_ARRIVAL, _SEGMENT, _HANDOFF, _READY, _TICK = range(5)


@dataclass
class SimPool:
    spec: PoolCreate
    profile: PerfProfile
    speedup: float
    limits: Limits
    cold_start_s: float
    policy: ScalingPolicy
    state: PolicyState = field(default_factory=PolicyState)
    ready: dict[str, SimWorker] = field(default_factory=dict)
    starting: dict[str, float] = field(default_factory=dict)  # worker id -> ready at
    draining: dict[str, SimWorker] = field(default_factory=dict)
    work: deque[WorkSample] = field(default_factory=deque)
    refused: deque[float] = field(default_factory=deque)
    experts: PoolExperts | None = None
    slowdown: float = 1.0

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def replicas(self) -> int:
        return len(self.ready) + len(self.starting)

    def fits(self, request: Request) -> bool:
        """Could a worker of this pool ever hold the request (its whole context within KV capacity)?"""
        return request.prompt_tokens + request.output_tokens + 1 <= self.profile.kv_capacity_tokens

    @property
    def cost_per_hour(self) -> float:
        return self.spec.cost_per_hour or self.profile.cost_per_hour

    def record(self, t: float, requests: float = 0, prefill: float = 0, decode: float = 0) -> None:
        second = float(int(t))
        if self.work and self.work[-1].t == second:
            last = self.work.pop()
            sample = WorkSample(
                second, last.requests + requests, last.prefill_tokens + prefill, last.decode_tokens + decode
            )
        else:
            sample = WorkSample(second, requests, prefill, decode)
        self.work.append(sample)


@dataclass(frozen=True)
class ScalingEvent:
    t: float
    pool: str
    before: int
    after: int
    reason: str


@dataclass(frozen=True)
class TimelineRow:
    t: float
    arrivals_per_s: float
    replicas: dict[str, int]
    running: int
    ttft_p90_s: float
    tbt_p90_s: float


@dataclass
class SimResult:
    config: SimConfig
    workload: Workload
    jobs: list[Job]
    pools: dict[str, SimPool]
    worker_seconds: dict[str, float]
    worker_pools: dict[str, str]
    scaling_events: list[ScalingEvent]
    timeline: list[TimelineRow]
    end_s: float
    wall_s: float
    kv_transfer_s: float
    # Metrics count from here: requests arriving earlier and worker time spent earlier are the warm-up.
    measured_from: float = 0.0


class Simulation:
    def __init__(
        self,
        config: SimConfig,
        workload: Workload,
        model: str | None = None,
        warm: bool = True,
        max_steps_per_segment: int = 1 << 30,
        warmup_s: float = 0.0,
    ) -> None:
        """`warm`: the pools' first replicas are ready at time 0. `max_steps_per_segment=1` advances
        every worker one engine step at a time: slow, and the reference the segment arithmetic is tested against.
        `warmup_s`: the first seconds are run but not measured, so that policies compared on one workload are
        judged from the state each reaches under it, not from the one they all start in."""
        self.config = config
        self.warmup_s = warmup_s
        self.max_steps_per_segment = max_steps_per_segment
        self.workload = workload
        self.router = Router(config.routing.resolve())
        self.pd = PDPolicy(config.pd_min_uncached_tokens)
        self.index = KVIndex()
        self.pools: dict[str, SimPool] = {}
        for spec in config.model_pools(model):
            settings = worker_settings(spec)
            profile = pool_profile(spec, settings)
            self.pools[spec.name] = SimPool(
                spec=spec,
                profile=profile,
                speedup=settings.sim_speedup,
                limits=Limits(
                    settings.max_running, settings.max_batch_tokens, settings.max_waiting, settings.block_size
                ),
                cold_start_s=settings.sim_startup_delay_s or profile.cold_start_s,
                policy=make_policy(spec.scaling.policy, spec.scaling.params),
            )
            if spec.name in config.experts:
                experts = PoolExperts(config.experts[spec.name], profile.kv_transfer_bytes_per_s)
                self.pools[spec.name].experts = experts
        self.workers: dict[str, SimWorker] = {}
        self.started: dict[str, float] = {}
        self.worker_pools: dict[str, str] = {}
        self.worker_seconds: dict[str, float] = defaultdict(float)
        self.sessions: OrderedDict[str, str] = OrderedDict()
        self.jobs = [Job(i, r, r.at) for i, r in enumerate(workload.requests)]
        self.events: list[tuple[float, int, int, str, int]] = []
        self._seq = itertools.count()
        self._ids = itertools.count()
        self.scaling_events: list[ScalingEvent] = []
        self.timeline: list[TimelineRow] = []
        self.unfinished = len(self.jobs)
        self.kv_transfer_s = 0.0
        self._tick_arrivals = 0
        self._tick_latencies: list[tuple[float, float]] = []
        self.now = 0.0
        self._warm = warm

    # -- the loop -----------------------------------------------------------------------

    def run(self) -> SimResult:
        started = time.perf_counter()
        for pool in self.pools.values():
            self._scale(pool, 0.0, initial=self._warm)
        for job in self.jobs:
            self._push(job.arrived, _ARRIVAL, "", job.index)
        self._push(0.0, _TICK, "", 0)
        while self.events and self.unfinished:
            t, _, kind, worker_id, value = heapq.heappop(self.events)
            self.now = t
            if kind == _ARRIVAL:
                self._arrive(self.jobs[value], t)
            elif kind == _SEGMENT:
                self._segment_end(worker_id, value, t)
            elif kind == _HANDOFF:
                self._handoff(self.jobs[value], t)
            elif kind == _READY:
                self._ready(worker_id, t)
            else:
                self._tick(t)
        stuck = [w.worker_id for w in self.workers.values() if not w.idle or w.reserved]
        if self.unfinished or stuck:
            raise RuntimeError(f"simulation ended with {self.unfinished} request(s) unfinished on {stuck}")
        for worker_id in list(self.started):
            self._stop(worker_id, self.now)
        return SimResult(
            self.config,
            self.workload,
            self.jobs,
            self.pools,
            dict(self.worker_seconds),
            self.worker_pools,
            self.scaling_events,
            self.timeline,
            self.now,
            time.perf_counter() - started,
            self.kv_transfer_s,
            self.warmup_s,
        )

    def _push(self, t: float, kind: int, worker_id: str, value: int) -> None:
        heapq.heappush(self.events, (t, next(self._seq), kind, worker_id, value))

    # -- requests -----------------------------------------------------------------------

    def _views(self, job: Job) -> list[WorkerView]:
        hashes = job.request.hashes
        views: list[WorkerView] = []
        for pool in self.pools.values():
            if not pool.ready or not pool.fits(job.request):
                continue
            views.extend(w.view(pool.spec.gpu_type) for w in pool.ready.values())
        if hashes:
            cached = self.index.prefix_lengths(hashes, [v.worker_id for v in views])
            views = [replace(v, cached_blocks=cached[v.worker_id]) if cached[v.worker_id] else v for v in views]
        return views

    def _request_view(self, job: Job, phase: Phase) -> RequestView:
        request = job.request
        return RequestView(
            phase=phase,
            prompt_tokens=request.prompt_tokens,
            prompt_blocks=len(request.hashes),
            block_size=self.workload.block_size,
            session_id=request.session,
            session_worker=self.sessions.get(request.session, "") if self.router.uses_session else "",
        )

    def _arrive(self, job: Job, t: float) -> None:
        self._tick_arrivals += 1
        views = self._views(job)
        decode_side = [v for v in views if v.role != "prefill"]
        prefill_side = [v for v in views if v.role == "prefill"]
        if self.pd.disaggregate(self._request_view(job, Phase.PREFILL), decode_side, prefill_side):
            prefill = self.router.route(self._request_view(job, Phase.PREFILL), views)
            decode = self.router.route(self._request_view(job, Phase.DECODE), views)
            if prefill.ok and decode.ok:
                assert prefill.worker_id is not None and decode.worker_id is not None
                job.prefill_worker = prefill.worker_id
                job.decode_worker = decode.worker_id
                self._remember_session(job, decode.worker_id)
                self._start(job, self.workers[prefill.worker_id], t, context=job.request.prompt_tokens, generate=1)
                return
        decision = self.router.route(self._request_view(job, Phase.GENERATE), views)
        if not decision.ok:
            self._refuse(job, t)
            return
        assert decision.worker_id is not None
        self._remember_session(job, decision.worker_id)
        request = job.request
        self._start(job, self.workers[decision.worker_id], t, request.prompt_tokens, request.output_tokens)

    def _remember_session(self, job: Job, worker_id: str) -> None:
        session = job.request.session
        if session:
            self.sessions[session] = worker_id
            self.sessions.move_to_end(session)
            if len(self.sessions) > SESSIONS_KEPT:
                self.sessions.popitem(last=False)

    def _refuse(self, job: Job, t: float) -> None:
        job.refused = True
        job.finished_at = t
        self.unfinished -= 1
        for pool in self.pools.values():
            if pool.spec.role.value != "prefill":
                pool.refused.append(t)

    def _start(self, job: Job, worker: SimWorker, t: float, context: int, generate: int, imported: int = 0) -> None:
        job.context, job.to_generate, job.imported = context, generate, imported
        end = worker.submit(job, t)
        if end is not None:
            self._push(end, _SEGMENT, worker.worker_id, worker.version)

    def _segment_end(self, worker_id: str, version: int, t: float) -> None:
        worker = self.workers.get(worker_id)
        if worker is None or worker.version != version:
            return  # superseded by a re-plan
        outcome, end = worker.finish_segment(t)
        if end is not None:
            self._push(end, _SEGMENT, worker_id, worker.version)
        self._settle(worker, outcome, t)

    def _settle(self, worker: SimWorker, outcome: Outcome, t: float) -> None:
        for job in outcome.prefilled:
            seconds = self.pools[worker.pool].profile.kv_transfer_time(job.request.prompt_tokens)
            self.kv_transfer_s += seconds
            self._push(t + seconds, _HANDOFF, "", job.index)
        for job in outcome.finished:
            self.unfinished -= 1
            request = job.request
            if job.prefill_worker:
                self.pools[self.workers[job.prefill_worker].pool].record(
                    t, prefill=request.prompt_tokens - job.cached_tokens
                )
            else:
                self.pools[worker.pool].record(t, prefill=request.prompt_tokens - job.cached_tokens)
            self.pools[worker.pool].record(t, requests=1, decode=request.output_tokens)
            if job.ttft is not None and job.tbt is not None:
                self._tick_latencies.append((job.ttft, job.tbt))
        if worker.idle and worker.draining:
            self._stop(worker.worker_id, t)

    def _handoff(self, job: Job, t: float) -> None:
        worker = self.workers.get(job.decode_worker)
        if worker is None:  # scaled away during the transfer: pick another, as the router retries
            decision = self.router.route(self._request_view(job, Phase.DECODE), self._views(job))
            if not decision.ok:
                self._refuse(job, t)
                return
            assert decision.worker_id is not None
            worker = self.workers[decision.worker_id]
        block = worker.limits.engine_block_size
        prompt = job.request.prompt_tokens
        # The decode worker continues from the prompt plus the first token, holding the prompt's full blocks.
        self._start(job, worker, t, prompt + 1, job.request.output_tokens - 1, imported=prompt // block * block)

    # -- replicas -------------------------------------------------------------------------

    def _add_worker(self, pool: SimPool, t: float, ready_at: float) -> None:
        worker_id = f"{pool.name}-{next(self._ids)}"
        worker = SimWorker(
            worker_id,
            pool.name,
            pool.spec.role.value,
            pool.profile,
            pool.limits,
            pool.speedup,
            cache_blocks=pool.profile.kv_capacity_tokens // self.workload.block_size,
            hash_block=self.workload.block_size,
            index=self.index,
            max_steps_per_segment=self.max_steps_per_segment,
        )
        worker.slowdown = pool.slowdown
        self.workers[worker_id] = worker
        self.worker_pools[worker_id] = pool.name
        self.started[worker_id] = t
        if ready_at <= t:
            pool.ready[worker_id] = worker
        else:
            pool.starting[worker_id] = ready_at
            self._push(ready_at, _READY, worker_id, 0)

    def _ready(self, worker_id: str, t: float) -> None:
        worker = self.workers.get(worker_id)
        if worker is None:
            return
        pool = self.pools[worker.pool]
        if pool.starting.pop(worker_id, None) is not None:
            worker.slowdown = pool.slowdown
            pool.ready[worker_id] = worker

    def _stop(self, worker_id: str, t: float) -> None:
        worker = self.workers.pop(worker_id, None)
        if worker is None:
            return
        pool = self.pools[worker.pool]
        pool.ready.pop(worker_id, None)
        pool.starting.pop(worker_id, None)
        pool.draining.pop(worker_id, None)
        self.index.drop(worker_id)
        self.worker_seconds[pool.name] += max(0.0, t - max(self.started.pop(worker_id), self.warmup_s))

    def _snapshot(self, pool: SimPool, t: float) -> PoolSnapshot:
        while pool.work and pool.work[0].t < t - WORK_HISTORY_S:
            pool.work.popleft()
        while pool.refused and pool.refused[0] < t - REFUSED_WINDOW_S:
            pool.refused.popleft()
        reports = []
        for worker in pool.ready.values():
            prefill, decode, ttft, tbt = worker.report(t)
            reports.append(
                WorkerReport(
                    running=worker.running,
                    waiting=len(worker.waiting),
                    max_running=worker.limits.max_running,
                    prefill_tokens_per_s=prefill,
                    decode_tokens_per_s=decode,
                    ttft_p90_s=ttft,
                    tbt_p90_s=tbt,
                )
            )
        return pool_snapshot(
            pool.spec,
            t,
            len(pool.ready),
            len(pool.starting),
            pool.cold_start_s,
            list(pool.work),
            reports,
            float(len(pool.refused)),
            pool.profile.sped_up(pool.speedup),
        )

    def _scale(self, pool: SimPool, t: float, initial: bool = False) -> None:
        snapshot = self._snapshot(pool, t)
        decision = pool.policy.decide(snapshot, pool.state)
        pool.state = decision.state
        before, wanted = pool.replicas, decision.replicas
        if wanted == before:
            return
        self.scaling_events.append(ScalingEvent(t, pool.name, before, wanted, decision.reason.value))
        for _ in range(wanted - before):
            self._add_worker(pool, t, t if initial else t + pool.cold_start_s)
        excess = before - wanted
        for worker_id in sorted(pool.starting, key=pool.starting.__getitem__, reverse=True)[: max(0, excess)]:
            self._stop(worker_id, t)
            excess -= 1
        for worker in sorted(pool.ready.values(), key=lambda w: (w.queued, w.worker_id))[: max(0, excess)]:
            # Drain first: no new requests; the worker stops once its last one finishes.
            del pool.ready[worker.worker_id]
            pool.draining[worker.worker_id] = worker
            worker.draining = True
            if worker.idle:
                self._stop(worker.worker_id, t)

    def _tick(self, t: float) -> None:
        for pool in self.pools.values():
            self._scale(pool, t)
            if pool.experts is not None:
                pool.slowdown = pool.experts.update(t)
                for worker in (*pool.ready.values(), *pool.draining.values()):
                    worker.slowdown = pool.slowdown
        interval = self.config.reconcile_interval_s
        ttfts = sorted(x for x, _ in self._tick_latencies)
        tbts = sorted(x for _, x in self._tick_latencies)
        self.timeline.append(
            TimelineRow(
                t,
                self._tick_arrivals / interval,
                {name: pool.replicas for name, pool in self.pools.items()},
                sum(w.queued for w in self.workers.values()),
                ttfts[int(0.9 * (len(ttfts) - 1))] if ttfts else 0.0,
                tbts[int(0.9 * (len(tbts) - 1))] if tbts else 0.0,
            )
        )
        self._tick_arrivals = 0
        self._tick_latencies = []
        self._push(t + interval, _TICK, "", 0)


def simulate(
    config: SimConfig, workload: Workload, model: str | None = None, warm: bool = True, warmup_s: float = 0.0
) -> SimResult:
    return Simulation(config, workload, model, warm, warmup_s=warmup_s).run()
