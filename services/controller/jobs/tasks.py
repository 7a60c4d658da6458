"""Celery tasks: thin wrappers that run a job's coroutine with fresh clients."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from celery import Task
from celery.worker import state as worker_state
from redis.asyncio import Redis

from services.controller.agents.sandbox import run_tool_process
from services.controller.desired import DesiredState
from services.controller.jobs.celery_app import celery_app
from services.controller.jobs.migrate import MIGRATE, run_migration
from services.controller.jobs.scale_down import run_scale_down
from services.controller.jobs.store import Job, JobStore
from shared.config import ControllerSettings, load_settings
from shared.rpc.security import Role, RpcSecurity
from shared.state.redis import connect
from shared.state.registry import WorkerRegistry


def _run(body: Callable[[ControllerSettings, Redis, JobStore], Awaitable[Job]]) -> str:
    """Run one job's coroutine on a fresh loop and Redis connection; returns its final state."""
    settings = load_settings(ControllerSettings)

    async def run() -> str:
        redis = connect(settings.redis_url)
        try:
            return (await body(settings, redis, JobStore(redis, settings.job_lease_s))).state.value
        finally:
            await redis.aclose()

    return asyncio.run(run())


def _security(settings: ControllerSettings) -> RpcSecurity:
    # Jobs act for the controller: they hold its certificate and reach workers as it does.
    return RpcSecurity.from_settings(settings, Role.CONTROLLER)


@celery_app.task(name="shoal.scale_down")  # type: ignore[untyped-decorator]
def scale_down(job_id: str) -> str:
    async def body(settings: ControllerSettings, redis: Redis, jobs: JobStore) -> Job:
        registry, desired = WorkerRegistry(redis), DesiredState(redis)
        return await run_scale_down(job_id, jobs, registry, desired, _security(settings))

    return _run(body)


@celery_app.task(name="shoal.migrate_experts")  # type: ignore[untyped-decorator]
def migrate_experts(job_id: str) -> str:
    async def body(settings: ControllerSettings, redis: Redis, jobs: JobStore) -> Job:
        address = str((await jobs.get(job_id)).params["address"])
        return await run_migration(job_id, jobs, address, _security(settings))

    return _run(body)


@celery_app.task(name="shoal.agent_tool", bind=True)  # type: ignore[untyped-decorator]
def agent_tool(task: Task, name: str, args: dict[str, str], timeout_s: float) -> str:
    """One attempt of an agent graph's registered tool, in a process of its own, stopped at `timeout_s` or
    when the task is revoked (the controller revokes it when it gives up: a timeout or a cancelled graph)."""
    task_id = task.request.id
    return run_tool_process(name, args, timeout_s, cancelled=lambda: task_id in worker_state.revoked)


TASKS = {"scale-down": "shoal.scale_down", MIGRATE: "shoal.migrate_experts"}
