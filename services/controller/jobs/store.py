"""Long operations (jobs) and their progress, in Redis.

A job is a JSON document in the `jobs` hash: what it does, its state, a
progress fraction and message, and `heartbeat_at`, refreshed while a Celery
task works on it. The reconcile loop resubmits a `running` job whose
heartbeat stopped (its worker died): tasks are idempotent and resume from the
phase the job records. Cancelling sets `cancel_requested`; the task stops at
its next check and leaves the cluster as the job's final message states.
"""

from __future__ import annotations

import enum
import time
import uuid
from typing import Any

from pydantic import BaseModel, Field
from redis.asyncio import Redis

from shared.errors import FailedPrecondition, NotFound
from shared.state import schema


class JobState(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    ROLLED_BACK = "rolled-back"

    @property
    def final(self) -> bool:
        return self not in (JobState.PENDING, JobState.RUNNING)


class Job(BaseModel):
    id: str
    kind: str
    params: dict[str, Any] = Field(default_factory=dict)
    state: JobState = JobState.PENDING
    phase: str = ""
    progress: float = 0.0
    message: str = ""
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)
    heartbeat_at: float = 0.0
    attempts: int = 0
    cancel_requested: bool = False
    result: dict[str, Any] = Field(default_factory=dict)


class JobStore:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    async def create(self, kind: str, params: dict[str, Any], job_id: str | None = None) -> tuple[Job, bool]:
        """A new job, or the existing unfinished one with the same id (created=False)."""
        job_id = job_id or f"{kind}-{uuid.uuid4().hex[:10]}"
        existing = await self.find(job_id)
        if existing is not None and not existing.state.final:
            return existing, False
        job = Job(id=job_id, kind=kind, params=params)
        await self.save(job)
        return job, True

    async def save(self, job: Job) -> None:
        job.updated_at = time.time()
        await self.redis.hset(schema.JOBS, job.id, job.model_dump_json())

    async def find(self, job_id: str) -> Job | None:
        raw = await self.redis.hget(schema.JOBS, job_id)
        return Job.model_validate_json(raw) if raw else None

    async def get(self, job_id: str) -> Job:
        job = await self.find(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}", param="job_id")
        return job

    async def list(self, limit: int = 200) -> list[Job]:
        raw = await self.redis.hvals(schema.JOBS)
        jobs = sorted((Job.model_validate_json(r) for r in raw), key=lambda j: j.created_at, reverse=True)
        return jobs[:limit]

    async def update(self, job: Job, **changes: Any) -> Job:
        # Never lose a cancel request made while the task held an older copy.
        stored = await self.find(job.id)
        if stored is not None and stored.cancel_requested:
            changes.setdefault("cancel_requested", True)
        for key, value in changes.items():
            setattr(job, key, value)
        job.heartbeat_at = time.time()
        await self.save(job)
        return job

    async def request_cancel(self, job_id: str) -> Job:
        job = await self.get(job_id)
        if job.state.final:
            raise FailedPrecondition(f"job {job_id} already {job.state.value}", job_id=job_id)
        job.cancel_requested = True
        await self.save(job)
        return job

    async def prune(self, keep_s: float = 24 * 3600) -> int:
        cutoff = time.time() - keep_s
        old = [j.id for j in await self.list(limit=100_000) if j.state.final and j.updated_at < cutoff]
        if old:
            await self.redis.hdel(schema.JOBS, *old)
        return len(old)


def job_summary(job: Job) -> dict[str, Any]:
    return job.model_dump(mode="json")
