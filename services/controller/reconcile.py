"""The reconcile loop: observe, decide (pure policies), act through jobs.

Each tick builds, per pool, a snapshot of what is (ready workers from the
registry, starting ones from the actuator, the work routers reported second by
second) and asks the pool's scaling policy what should be. Then it acts:

* more replicas: raise the actuator's target at once;
* fewer: first cancel workers still starting, then open one drain-first
  scale-down job per excess ready worker (least loaded first); the job drains
  the worker and only then has the actuator stop it;
* a manual override or the pause switch wins over the policy;
* a deleted model's pools go to zero (after the routers have stopped
  admitting it, so requests in flight finish on their drained workers), then
  the pools and the model are deleted.

Everything a tick does is derived from observed state, so ticks are
idempotent and the loop survives its own restart and a Redis restart (the
observed state comes back with the workers' next heartbeats). If Redis lost
its data (the `cluster` mark is gone), the tick first writes back the
documents the previous tick read: desired state outlives a wipe. Every decision
is recorded with its reason: in a capped Redis stream, in a status document
per pool, and as metrics. Jobs whose worker died are resubmitted.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge
from redis.asyncio import Redis

from services.controller.actuators.base import Actuator, InstanceState
from services.controller.desired import DesiredState
from services.controller.jobs.store import Job, JobState, JobStore
from shared.errors import ShoalError
from shared.policies.scaling import (
    WORK_HISTORY_S,
    PolicyState,
    PoolSnapshot,
    ScalingDecision,
    ScalingReason,
    WorkerReport,
    WorkSample,
    make_policy,
    pool_snapshot,
)
from shared.state import schema
from shared.state.redis import read_marked
from shared.state.registry import WorkerRegistry
from shared.state.versioned import DocumentStore, Versioned
from shared.state.workstats import read_work
from shared.telemetry.logging import get_logger
from shared.types.pools import ModelPublic, ModelState, PoolPublic
from shared.types.workers import WorkerRecord

log = get_logger("shoal.controller.reconcile")

SCALE_DOWN = "scale-down"
DEFAULT_COLD_START_S = 10.0
# Routers read the model catalog every second: a deleted model's workers keep serving this long first.
ROUTER_NOTICE_S = 3.0


@dataclass(frozen=True)
class PoolStatus:
    pool: str
    at: float
    ready: int
    starting: int
    draining: int
    desired: int
    reason: str
    explanation: str
    cold_start_s: float
    prefill_capacity: float
    decode_capacity: float
    forecast_prefill_tps: float
    forecast_decode_tps: float
    acted: bool


class ReconcileMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.decisions = Counter(
            "shoal_controller_decisions", "Scaling decisions by pool and reason", ["pool", "reason"], registry=registry
        )
        self.desired = Gauge("shoal_controller_desired_replicas", "Replicas wanted", ["pool"], registry=registry)
        self.ready = Gauge("shoal_controller_ready_replicas", "Workers serving", ["pool"], registry=registry)
        self.starting = Gauge("shoal_controller_starting_replicas", "Workers starting", ["pool"], registry=registry)
        self.jobs = Counter("shoal_controller_jobs", "Jobs opened by kind", ["kind"], registry=registry)
        self.jobs.labels(SCALE_DOWN)  # at zero from the start: a rate() over it is 0, not "no data"
        self.pool_errors = Counter(
            "shoal_controller_pool_errors", "Reconcile passes that failed for a pool", ["pool"], registry=registry
        )
        self.state_restores = Counter(
            "shoal_controller_state_restores",
            "Times Redis had lost its data and the desired state last seen was written back",
            registry=registry,
        )
        self.open_jobs = Gauge(
            "shoal_controller_open_jobs", "Jobs not finished, by state", ["state"], registry=registry
        )
        # What the job-stuck alert watches: a lease renewal touches a job, so only its age tells it is stuck.
        self.oldest_job = Gauge(
            "shoal_controller_oldest_open_job_seconds",
            "Age of the oldest job not finished (0: none)",
            registry=registry,
        )

    def watch_jobs(self, open_jobs: list[Job], now: float) -> None:
        for state in (JobState.PENDING, JobState.RUNNING):
            self.open_jobs.labels(state.value).set(sum(job.state is state for job in open_jobs))
        self.oldest_job.set(max((now - job.created_at for job in open_jobs), default=0.0))


class Reconciler:
    def __init__(
        self,
        redis: Redis,
        actuator: Actuator,
        submit: Callable[[Job], None],
        metrics: ReconcileMetrics,
        cold_starts: Callable[[str], float | None] = lambda _pool: None,
        job_lease_s: float = 30.0,
    ) -> None:
        self.redis = redis
        self.desired = DesiredState(redis)
        self.registry = WorkerRegistry(redis)
        self.jobs = JobStore(redis, job_lease_s)
        self.docs = DocumentStore(redis)
        self.actuator = actuator
        self.submit = submit
        self.metrics = metrics
        self.cold_starts = cold_starts
        self.states: dict[str, PolicyState] = {}
        self.history: defaultdict[str, deque[WorkSample]] = defaultdict(deque)
        self.refused: defaultdict[str, deque[tuple[float, int]]] = defaultdict(deque)
        self._last_work = "0-0"
        self.last: dict[str, PoolStatus] = {}
        # The last error of each pool whose reconcile failed (cleared when it succeeds again).
        self.pool_errors: dict[str, str] = {}
        self._pending_decisions: list[PoolStatus] = []
        # Every document (desired state) as the last tick read it: written back if Redis loses its data.
        self._documents: dict[str, Versioned] = {}
        # Scale-down jobs whose drained worker this process has told the actuator to stop.
        self._stopped: set[str] = set()

    # -- observation --------------------------------------------------------------

    async def _ingest_work(self, now: float) -> None:
        entries, self._last_work = await read_work(self.redis, self._last_work)
        for entry in entries:
            second = float(int(entry.t))
            for pool, work in entry.pools.items():
                history = self.history[pool]
                if history and history[-1].t == second:
                    last = history.pop()
                    work_sample = WorkSample(
                        second,
                        last.requests + work.requests,
                        last.prefill_tokens + work.prefill_tokens,
                        last.decode_tokens + work.decode_tokens,
                    )
                else:
                    work_sample = WorkSample(second, work.requests, work.prefill_tokens, work.decode_tokens)
                history.append(work_sample)
            for model, count in entry.refused.items():
                self.refused[model].append((entry.t, count))
        for history in self.history.values():
            while history and history[0].t < now - WORK_HISTORY_S:
                history.popleft()
        for refused in self.refused.values():
            while refused and refused[0][0] < now - WORK_HISTORY_S:
                refused.popleft()

    def _snapshot(
        self, pool: PoolPublic, workers: list[WorkerRecord], starting: int, now: float, cold_start: float
    ) -> PoolSnapshot:
        recent_refusals = sum(n for t, n in self.refused.get(pool.model, ()) if t > now - 10)
        reports = [
            WorkerReport(
                running=w.load.running_requests,
                waiting=w.load.waiting_requests,
                max_running=w.info.max_running,
                prefill_tokens_per_s=w.load.prefill_tokens_per_s,
                decode_tokens_per_s=w.load.decode_tokens_per_s,
                ttft_p90_s=w.load.ttft_p90_s,
                tbt_p90_s=w.load.tbt_p90_s,
            )
            for w in workers
        ]
        work = list(self.history.get(pool.name, ()))
        return pool_snapshot(pool, now, len(workers), starting, cold_start, work, reports, recent_refusals)

    # -- the tick -------------------------------------------------------------------

    async def tick(self, act: bool = True) -> list[PoolStatus]:
        """One reconcile pass; with act=False (dry run) decide and report, but change nothing."""
        now = time.time()
        if act:
            await self._restore_if_lost()
        await self._ingest_work(now)
        paused = await self.desired.paused()
        workers = await self.registry.list_workers()
        models = {m.name: m for m in await self.desired.models()}
        open_jobs = await self.jobs.open_jobs()
        self.metrics.watch_jobs(open_jobs, now)
        removing = {j.params["worker_id"]: j for j in open_jobs if j.kind == SCALE_DOWN}
        statuses: list[PoolStatus] = []
        pools = await self.desired.pools()
        if act:
            # Before the pools' decisions: their targets count the drained workers not stopped yet.
            await self._stop_drained(open_jobs, pools)
        for pool in pools:
            model = models.get(pool.model)
            if model is None:
                continue
            try:
                status = await self._reconcile_pool(pool, model, workers, removing, now, paused, act)
                if act and model.state is ModelState.DELETING and status.ready + status.starting + status.draining == 0:
                    await self._retire(pool)
                    continue
            except Exception as exc:
                log.exception("reconciling a pool failed; the other pools go on", pool=pool.name)
                self.metrics.pool_errors.labels(pool.name).inc()
                self.pool_errors[pool.name] = f"{type(exc).__name__}: {exc}"
                continue
            self.pool_errors.pop(pool.name, None)
            statuses.append(status)
        if act:
            served = {pool.model for pool in await self.desired.pools()}
            for model in models.values():
                if model.state is ModelState.DELETING and model.name not in served:
                    await self.desired.forget_model(model.name)
                    log.info("model deleted: its pools drained and are gone", model=model.name)
            await self._resubmit_stale(open_jobs, now)
            documents, whole = await read_marked(self.redis, self.docs.snapshot)
            if whole:  # a read across a wipe may be partial: keep the last whole one to write back
                self._documents = documents
        return statuses

    async def _stop_drained(self, open_jobs: list[Job], pools: list[PoolPublic]) -> None:
        """Stop the workers that scale-down jobs have drained (phase `remove`). The controller does it, not
        the job: only the controller's account may scale Deployments and mark pods. Once per job in this
        process; the actuators' remove is idempotent, so a restarted controller asking again is harmless."""
        by_name = {pool.name: pool for pool in pools}
        open_ids = {job.id for job in open_jobs}
        self._stopped &= open_ids
        for job in open_jobs:
            pool = by_name.get(str(job.params.get("pool", "")))
            if job.kind != SCALE_DOWN or job.phase != "remove" or job.id in self._stopped or pool is None:
                continue
            worker_id = str(job.params["worker_id"])
            try:
                await self.actuator.remove(pool, worker_id)
            except ShoalError as exc:
                log.warning(
                    "stopping a drained worker failed; next tick tries again", worker_id=worker_id, error=exc.message
                )
                continue
            self._stopped.add(job.id)
            log.info("drained worker stopped", worker_id=worker_id, pool=pool.name, job=job.id)

    async def _retire(self, pool: PoolPublic) -> None:
        """A deleted model's pool whose workers are all gone: delete it."""
        await self.actuator.delete_pool(pool.name)
        await self.desired.delete_pool(pool.name)
        self.states.pop(pool.name, None)
        log.info("pool of a deleted model retired", pool=pool.name, model=pool.model)

    async def _restore_if_lost(self) -> None:
        """Redis lost its data (wiped, or restarted without its file) when the cluster mark is gone: write
        back the documents the last tick saw, then mark it again. Workers register again by themselves."""
        if await self.redis.exists(schema.CLUSTER):
            return
        if self._documents:
            restored = await self.docs.restore(self._documents)
            self.metrics.state_restores.inc()
            log.error("Redis lost Shoal's state; the desired state last seen is written back", documents=restored)
        await self.redis.set(schema.CLUSTER, "1", nx=True)

    async def _reconcile_pool(
        self,
        pool: PoolPublic,
        model: ModelPublic,
        workers: list[WorkerRecord],
        removing: dict[str, Job],
        now: float,
        paused: bool,
        act: bool,
    ) -> PoolStatus:
        instances = await self.actuator.instances(pool.name)
        mine = [w for w in workers if w.info.pool == pool.name]
        ready = [w for w in mine if w.schedulable and w.worker_id not in removing]
        draining = len(mine) - len(ready)
        registered = {w.worker_id for w in mine}
        starting = sum(
            1 for i in instances.instances if i.state is InstanceState.STARTING and i.worker_id not in registered
        )
        # Workers that serve nothing new (cordoned by an operator, or being scaled down: registered or not)
        # still count in the actuator's target until it is told to stop them: a target that left them out
        # would have it stop serving workers in their place, or start none when asked for more.
        gone = {i.worker_id for i in instances.instances if i.state is InstanceState.STOPPING}
        gone |= {str(j.params["worker_id"]) for j in removing.values() if j.id in self._stopped}
        scaled_down = {w for w, j in removing.items() if j.params.get("pool") == pool.name}
        held = len(((registered - {w.worker_id for w in ready}) | scaled_down) - gone)
        cold = self.cold_starts(pool.name) or DEFAULT_COLD_START_S
        snapshot = self._snapshot(pool, ready, starting, now, cold)
        decision = self._decide(pool, model, snapshot, paused, keep_state=act, now=now)
        acted = False
        if act and not paused:
            acted = await self._act(pool, model, decision, snapshot, ready, held)
        status = self._status(pool, snapshot, decision, draining, cold, acted)
        if act:
            self._record(status)
        return status

    def _decide(
        self, pool: PoolPublic, model: ModelPublic, snapshot: PoolSnapshot, paused: bool, keep_state: bool, now: float
    ) -> ScalingDecision:
        state = self.states.get(pool.name, PolicyState())
        if model.state is ModelState.DELETING:
            # Routers stop admitting the model within ROUTER_NOTICE_S; until then its workers keep serving.
            if now < (model.deleting_since or 0.0) + ROUTER_NOTICE_S:
                return ScalingDecision(
                    snapshot.current, ScalingReason.MODEL_DELETED, "model deleted: routers stop admitting it", state
                )
            return ScalingDecision(0, ScalingReason.MODEL_DELETED, "model deleted: draining its workers", state)
        if paused:
            return ScalingDecision(snapshot.current, ScalingReason.PAUSED, "scaling is paused", state)
        if pool.replicas_override is not None:
            return ScalingDecision(
                pool.replicas_override, ScalingReason.MANUAL, f"manual override: {pool.replicas_override}", state
            )
        policy = make_policy(pool.scaling.policy, pool.scaling.params)
        decision = policy.decide(snapshot, state)
        if keep_state:
            self.states[pool.name] = decision.state
        return decision

    async def _act(
        self,
        pool: PoolPublic,
        model: ModelPublic,
        decision: ScalingDecision,
        snapshot: PoolSnapshot,
        ready: list[WorkerRecord],
        held: int,
    ) -> bool:
        target = decision.replicas
        if target > snapshot.current:
            await self.actuator.scale_to(pool, model, target + held)
            return True
        if target >= snapshot.current:
            return False
        if snapshot.starting:
            # A scale-up no longer wanted: cancel what has not started serving.
            await self.actuator.scale_to(pool, model, max(target, snapshot.ready) + held)
        excess = snapshot.ready - target
        victims = sorted(ready, key=lambda w: (w.load.running_requests + w.load.waiting_requests, w.worker_id))
        for worker in victims[: max(0, excess)]:
            job, created = await self.jobs.create(
                SCALE_DOWN,
                {"pool": pool.name, "worker_id": worker.worker_id},
                job_id=f"{SCALE_DOWN}-{worker.worker_id}",
            )
            if created:
                self.metrics.jobs.labels(SCALE_DOWN).inc()
                self.submit(job)
                log.info("scale-down job opened", pool=pool.name, worker_id=worker.worker_id, job_id=job.id)
        return True

    def _status(
        self,
        pool: PoolPublic,
        snapshot: PoolSnapshot,
        decision: ScalingDecision,
        draining: int,
        cold: float,
        acted: bool,
    ) -> PoolStatus:
        state = decision.state
        return PoolStatus(
            pool=pool.name,
            at=snapshot.now,
            ready=snapshot.ready,
            starting=snapshot.starting,
            draining=draining,
            desired=decision.replicas,
            reason=decision.reason.value,
            explanation=decision.explanation,
            cold_start_s=cold,
            prefill_capacity=state.prefill_capacity or pool.capacity.prefill_tokens_per_s,
            decode_capacity=state.decode_capacity or pool.capacity.decode_tokens_per_s,
            forecast_prefill_tps=decision.forecast_prefill_tps,
            forecast_decode_tps=decision.forecast_decode_tps,
            acted=acted,
        )

    def _record(self, status: PoolStatus) -> None:
        self.metrics.decisions.labels(status.pool, status.reason).inc()
        self.metrics.desired.labels(status.pool).set(status.desired)
        self.metrics.ready.labels(status.pool).set(status.ready)
        self.metrics.starting.labels(status.pool).set(status.starting)
        self.metrics.pool_errors.labels(status.pool)  # at zero until a pass fails: its rate is 0, not "no data"
        previous = self.last.get(status.pool)
        self.last[status.pool] = status
        if previous is None or (previous.desired, previous.reason) != (status.desired, status.reason):
            self._pending_decisions.append(status)

    async def flush_decisions(self) -> None:
        """Write changed decisions to the decision log (one entry per change, not per tick)."""
        pending, self._pending_decisions = self._pending_decisions, []
        for status in pending:
            await self.redis.xadd(
                schema.DECISIONS, {"data": json.dumps(asdict(status))}, maxlen=schema.DECISIONS_MAXLEN, approximate=True
            )

    async def _resubmit_stale(self, open_jobs: list[Job], now: float) -> None:
        """Hand again to the runners the jobs whose runner died (lease lapsed) or that none picked up.

        Only the lease counts, not silence: a runner renews it during calls that take minutes. A
        resubmitted task that finds another live runner on the job leaves it alone (JobStore.claim)."""
        for job in open_jobs:
            lapsed = job.state is JobState.RUNNING and job.lease_until < now
            forgotten = job.state is JobState.PENDING and now - job.updated_at > self.jobs.lease_s
            if lapsed or forgotten:
                log.warning("job has no live runner; resubmitting", job_id=job.id, phase=job.phase, state=job.state)
                self.submit(await self.jobs.update(job, message="resubmitted: its runner stopped"))


async def read_decisions(redis: Redis, limit: int = 100) -> list[dict[str, object]]:
    entries = await redis.xrevrange(schema.DECISIONS, count=limit)
    return [json.loads(fields[b"data"]) for _id, fields in entries]
