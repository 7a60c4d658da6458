"""One reconcile tick against a real Redis and the local actuator's documents (no worker processes)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from services.controller.actuators.local import LocalActuator, launch_doc, status_doc
from services.controller.desired import DesiredState
from services.controller.jobs.store import Job, JobStore
from services.controller.reconcile import SCALE_DOWN, ReconcileMetrics, Reconciler
from shared.config.services import WorkerRole
from shared.state.registry import WorkerRegistry
from shared.state.versioned import DocumentStore
from shared.types.pools import ModelCreate, PoolCreate
from shared.types.workers import WorkerLoad
from tests.support.workers import worker_info

pytestmark = pytest.mark.integration

POOL = "decode"


async def _register(registry: WorkerRegistry, worker_id: str) -> None:
    await registry.heartbeat(worker_info(worker_id, POOL, role=WorkerRole.DECODE), WorkerLoad(), lease_ttl_s=60)


async def _tick(
    redis: Redis,
    model_path: Path,
    override: int,
    serving: Sequence[str],
    cordoned: Sequence[str] = (),
    drained: Sequence[str] = (),
    starting: Sequence[str] = (),
) -> tuple[dict[str, object], list[Job]]:
    """One tick over a pool whose launch target holds every worker named; return the launch document after
    it and the scale-down jobs the tick opened. Drained workers have a job in phase `remove`."""
    desired = DesiredState(redis)
    await desired.create_model(ModelCreate(name="m", path=str(model_path)))
    pool = await desired.create_pool(
        PoolCreate(name=POOL, model="m", role=WorkerRole.DECODE, min_replicas=1, max_replicas=8)
    )
    await desired.set_override(POOL, override)
    registry = WorkerRegistry(redis)
    jobs = JobStore(redis)
    for worker_id in [*serving, *cordoned, *drained]:
        await _register(registry, worker_id)
    for worker_id in [*cordoned, *drained]:
        await registry.set_cordoned(worker_id, True)
    for worker_id in drained:
        job, _ = await jobs.create(
            SCALE_DOWN, {"pool": POOL, "worker_id": worker_id}, job_id=f"{SCALE_DOWN}-{worker_id}"
        )
        await jobs.update(job, phase="remove")
    actuator = LocalActuator(redis)
    everyone = [*serving, *cordoned, *drained]
    await actuator.scale_to(pool, await desired.model("m"), len(everyone) + len(starting))
    instances = [{"worker_id": w, "state": "running", "started_at": 1.0} for w in everyone]
    instances += [{"worker_id": w, "state": "starting", "started_at": 2.0} for w in starting]
    await DocumentStore(redis).put(status_doc(POOL), {"instances": instances, "cold_start_s": 5.0})
    opened: list[Job] = []
    await Reconciler(redis, actuator, opened.append, ReconcileMetrics(CollectorRegistry())).tick()
    launch = await DocumentStore(redis).get(launch_doc(POOL))
    assert launch is not None
    return launch.body, opened


async def test_cancelling_a_scale_up_keeps_every_worker_that_serves_or_drains(redis: Redis, tiny_model: Path) -> None:
    """Only the starting worker may be cancelled: a drained worker the actuator has not been told to stop
    yet counts in its target, or lowering the target would stop a serving worker in its place (and the
    removal then another one), leaving the pool with nothing serving."""
    launch, opened = await _tick(redis, tiny_model, override=1, serving=("a", "b"), drained=["c"], starting=["d"])
    # a and b stay (one of them now draining for the shrink to one), c is stopped, d is cancelled.
    assert launch["remove"] == ["c"]
    assert launch["target"] == 2
    assert [job.params["worker_id"] for job in opened] in (["a"], ["b"])


async def test_a_cordoned_worker_does_not_stand_in_for_a_wanted_replica(redis: Redis, tiny_model: Path) -> None:
    """An operator's cordon takes a worker out of service, not out of the actuator's target: asking for two
    serving workers starts a new one beside it, and shrinking leaves it alone."""
    launch, opened = await _tick(redis, tiny_model, override=2, serving=["a"], cordoned=["e"])
    assert launch["target"] == 3 and launch["remove"] == []
    assert opened == []
    await redis.flushdb()
    launch, opened = await _tick(redis, tiny_model, override=1, serving=("a", "b"), cordoned=["e"], starting=["d"])
    assert launch["target"] == 3 and launch["remove"] == []  # d is cancelled; a, b and e stay
    assert [job.params["worker_id"] for job in opened] in (["a"], ["b"])
