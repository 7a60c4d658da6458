"""The drain-first scale-down job: cordon, drain, then wait until the controller has stopped the worker.

Phases are recorded in the job, so a retried task resumes where the last one
stopped. No request is lost: the worker stops admitting (cordon in the
registry, so routers stop sending; Drain, so the worker refuses strays),
finishes every running request, and only then is stopped. The stop itself
is the controller's (its reconcile loop removes the worker of every job in
phase `remove`): the job's process holds no rights over pods or
Deployments. Cancelling before the worker is stopped puts it back in service
(uncordoned, admitting).
"""

from __future__ import annotations

import asyncio
import time

from services.controller.desired import DesiredState
from services.controller.jobs.store import Job, JobState, JobStore, runner_name
from shared.errors import NotFound, ShoalError
from shared.rpc.security import RpcSecurity
from shared.rpc.worker_client import drain_blocking
from shared.state.registry import WorkerRegistry
from shared.telemetry.logging import get_logger

log = get_logger("shoal.controller.jobs")

DRAIN_STEP_S = 2.0
GONE_TIMEOUT_S = 120.0


async def _serve_again(registry: WorkerRegistry, worker_id: str, address: str, security: RpcSecurity) -> None:
    """Undo the job's cordon and drain: the worker admits requests and routers send them again."""
    try:
        await asyncio.to_thread(drain_blocking, address, 0.0, security, True)
    except ShoalError as exc:
        log.warning("could not tell the worker to admit again; it may be gone", worker_id=worker_id, error=exc.message)
    await registry.set_cordoned(worker_id, False)


async def run_scale_down(
    job_id: str,
    jobs: JobStore,
    registry: WorkerRegistry,
    desired: DesiredState,
    security: RpcSecurity,
) -> Job:
    job = await jobs.claim(job_id, runner_name())
    if job is None:
        return await jobs.get(job_id)  # finished, or a live runner has it
    async with jobs.leased(job):
        return await _scale_down(job, jobs, registry, desired, security)


async def _scale_down(
    job: Job, jobs: JobStore, registry: WorkerRegistry, desired: DesiredState, security: RpcSecurity
) -> Job:
    worker_id = str(job.params["worker_id"])
    try:
        await desired.pool(str(job.params["pool"]))
    except NotFound:
        return await jobs.update(job, state=JobState.FAILED, message="the pool was deleted")
    record = await registry.get(worker_id)
    if job.phase in ("", "cordon"):
        await registry.set_cordoned(worker_id, True)
        job = await jobs.update(job, phase="drain", progress=0.1, message="cordoned: routers stop sending to it")
    if job.phase == "drain":
        while record is not None:
            job = await jobs.update(job)
            if job.cancel_requested:
                await _serve_again(registry, worker_id, record.info.address, security)
                return await jobs.update(
                    job, state=JobState.CANCELLED, message="cancelled before the worker stopped; it serves again"
                )
            try:
                response = await asyncio.to_thread(drain_blocking, record.info.address, DRAIN_STEP_S, security)
            except ShoalError as exc:
                log.warning("drain call failed; the worker may be gone", worker_id=worker_id, error=exc.message)
                record = await registry.get(worker_id)
                continue
            left = response.running_requests + response.waiting_requests
            job = await jobs.update(job, progress=0.5, message=f"draining: {left} request(s) still running")
            if response.drained:
                break
            record = await registry.get(worker_id)
        job = await jobs.update(job, phase="remove", progress=0.7, message="drained; the controller stops it")
    deadline = time.monotonic() + GONE_TIMEOUT_S
    while await registry.get(worker_id) is not None and time.monotonic() < deadline:
        job = await jobs.update(job)
        await asyncio.sleep(0.5)
    if await registry.get(worker_id) is not None:
        return await jobs.update(
            job,
            state=JobState.FAILED,
            message="worker drained, but still registered 120 s later (is the controller up?)",
        )
    await registry.set_cordoned(worker_id, False)
    return await jobs.update(job, state=JobState.SUCCEEDED, progress=1.0, message="worker drained and stopped")
