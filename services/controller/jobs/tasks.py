"""Celery tasks: thin wrappers that run a job's coroutine with fresh clients."""

from __future__ import annotations

import asyncio

from services.controller.actuators.factory import make_actuator
from services.controller.desired import DesiredState
from services.controller.jobs.celery_app import celery_app
from services.controller.jobs.migrate import MIGRATE, run_migration
from services.controller.jobs.scale_down import run_scale_down
from services.controller.jobs.store import JobStore
from shared.config import ControllerSettings, load_settings
from shared.state.redis import connect
from shared.state.registry import WorkerRegistry


@celery_app.task(name="shoal.scale_down")  # type: ignore[untyped-decorator]
def scale_down(job_id: str) -> str:
    settings = load_settings(ControllerSettings)

    async def run() -> str:
        redis = connect(settings.redis_url)
        try:
            job = await run_scale_down(
                job_id,
                JobStore(redis),
                WorkerRegistry(redis),
                DesiredState(redis),
                make_actuator(settings, redis),
                settings.internal_token,
            )
            return job.state.value
        finally:
            await redis.aclose()

    return asyncio.run(run())


@celery_app.task(name="shoal.migrate_experts")  # type: ignore[untyped-decorator]
def migrate_experts(job_id: str) -> str:
    settings = load_settings(ControllerSettings)

    async def run() -> str:
        redis = connect(settings.redis_url)
        try:
            jobs = JobStore(redis)
            address = str((await jobs.get(job_id)).params["address"])
            job = await run_migration(job_id, jobs, address, settings.internal_token)
            return job.state.value
        finally:
            await redis.aclose()

    return asyncio.run(run())


TASKS = {"scale-down": "shoal.scale_down", MIGRATE: "shoal.migrate_experts"}
