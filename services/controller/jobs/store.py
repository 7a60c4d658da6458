"""Long operations (jobs) and their progress, in Redis, written with compare-and-set and run under a lease.

A job is a JSON document under its own key, with a version every write
bumps. A write names the version it read; a Lua script refuses it when the
document changed since, and the writer re-reads, applies its own changes
again and retries, so a cancel request made meanwhile is never lost.

A runner (a Celery task, or the controller's own loop in tests) *claims* a
job before working on it: the claim records the runner and a lease. While
the runner works, `leased` renews the lease in the background, also during
calls that legitimately take minutes (staging experts, regrouping ranks).
Every write of a runner that lost the job (its lease lapsed and another
runner claimed it) fails with LostLease, so a job never runs twice at once.
The reconcile loop resubmits a job whose lease lapsed (its runner died), or
that nobody picked up; a resubmitted task that finds the job claimed by a
live runner leaves it alone. Tasks are idempotent and resume from the phase
the job records.

Open jobs are in a set the reconcile loop reads every tick; every job is in
an index by creation time for listing. A finished job's document expires
after FINISHED_TTL_S and the indexes forget it as they meet it.
"""

from __future__ import annotations

import asyncio
import enum
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any

from pydantic import BaseModel, Field
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.errors import FailedPrecondition, NotFound, ShoalError, Unavailable
from shared.state import schema
from shared.state.records import FINISHED_TTL_S, RecordIndex, RecordKeys
from shared.telemetry.logging import get_logger

log = get_logger("shoal.controller.jobs")

DEFAULT_LEASE_S = 30.0
_WRITE_TRIES = 20

# KEYS: the job's key, the open set, the index. ARGV: expected version, new document, id, created_at,
# finished (0/1), time to live of a finished document.
_COMPARE_AND_SET = """
local current = redis.call('GET', KEYS[1])
local version = 0
if current then version = cjson.decode(current)['version'] end
if version ~= tonumber(ARGV[1]) then return 0 end
if ARGV[5] == '1' then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[6])
  redis.call('SREM', KEYS[2], ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[2])
  redis.call('SADD', KEYS[2], ARGV[3])
end
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[3])
return 1
"""


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
    attempts: int = 0
    cancel_requested: bool = False
    result: dict[str, Any] = Field(default_factory=dict)
    # Compare-and-set: bumped by every write.
    version: int = 0
    # The runner working on the job, and until when its lease holds (time.time()).
    owner: str = ""
    lease_until: float = 0.0

    def leased(self, now: float) -> bool:
        return bool(self.owner) and self.lease_until > now


class LostLease(FailedPrecondition):
    """Another runner holds the job now: this one must stop."""


class JobStore:
    def __init__(self, redis: Redis, lease_s: float = DEFAULT_LEASE_S) -> None:
        self.redis = redis
        self.lease_s = lease_s
        self.records = RecordIndex(redis, RecordKeys(schema.job, schema.JOB_INDEX, schema.OPEN_JOBS))
        self._cas = redis.register_script(_COMPARE_AND_SET)

    # -- reading ----------------------------------------------------------------

    async def find(self, job_id: str) -> Job | None:
        raw = await self.records.get(job_id)
        return Job.model_validate_json(raw) if raw else None

    async def get(self, job_id: str) -> Job:
        job = await self.find(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}", param="job_id")
        return job

    async def recent(self, limit: int = 200) -> list[Job]:
        """The newest jobs first."""
        return [Job.model_validate_json(raw) for raw in await self.records.recent(limit)]

    async def open_jobs(self) -> list[Job]:
        """Jobs not finished yet (what the reconcile loop looks after)."""
        jobs = [Job.model_validate_json(raw) for raw in await self.records.open(_finished)]
        return sorted(jobs, key=lambda j: j.created_at)

    # -- writing ------------------------------------------------------------------

    async def _write(self, job: Job, expected: int) -> bool:
        done = await self._cas(
            keys=[schema.job(job.id), schema.OPEN_JOBS, schema.JOB_INDEX],
            args=[expected, job.model_dump_json(), job.id, job.created_at, int(job.state.final), FINISHED_TTL_S],
        )
        return bool(done)

    async def create(self, kind: str, params: dict[str, Any], job_id: str | None = None) -> tuple[Job, bool]:
        """A new job, or the existing unfinished one with the same id (created=False)."""
        job_id = job_id or f"{kind}-{uuid.uuid4().hex[:10]}"
        for _ in range(_WRITE_TRIES):
            existing = await self.find(job_id)
            if existing is not None and not existing.state.final:
                return existing, False
            previous = existing.version if existing is not None else 0
            job = Job(id=job_id, kind=kind, params=params, version=previous + 1)
            if await self._write(job, previous):
                return job, True
        raise Unavailable(f"job {job_id} keeps changing; try again", job_id=job_id)

    async def update(self, job: Job, **changes: Any) -> Job:
        """Apply `changes` to the stored job (compare-and-set; see the module doc) and return it.

        A runner's write (`job` names an owner) raises LostLease when another runner holds the job now."""
        for _ in range(_WRITE_TRIES):
            new = job.model_copy(update={**changes, "version": job.version + 1, "updated_at": time.time()})
            if await self._write(new, job.version):
                return new
            stored = await self.get(job.id)
            if job.owner and stored.owner != job.owner:
                raise LostLease(f"job {job.id} is run by {stored.owner or 'no one'} now", job_id=job.id)
            job = stored  # someone else wrote (a cancel, a lease renewal): apply ours on top of theirs
        raise Unavailable(f"job {job.id} keeps changing; try again", job_id=job.id)

    async def _modify(self, job_id: str, change: Callable[[Job], dict[str, Any] | None]) -> Job | None:
        """Read, change, compare-and-set, until it holds: `change` returns the fields to set, or None to
        leave the job as it is (then None is returned)."""
        for _ in range(_WRITE_TRIES):
            job = await self.get(job_id)
            changes = change(job)
            if changes is None:
                return None
            new = job.model_copy(update={**changes, "version": job.version + 1, "updated_at": time.time()})
            if await self._write(new, job.version):
                return new
        raise Unavailable(f"job {job_id} keeps changing; try again", job_id=job_id)

    async def request_cancel(self, job_id: str) -> Job:
        job = await self.get(job_id)
        if job.state.final:
            raise FailedPrecondition(f"job {job_id} already {job.state.value}", job_id=job_id)
        cancelled = await self._modify(job_id, lambda j: {"cancel_requested": True})
        assert cancelled is not None
        return cancelled

    # -- running ------------------------------------------------------------------

    async def claim(self, job_id: str, runner: str) -> Job | None:
        """Take the job to run it: the job (state RUNNING, leased to `runner`), or None when it is finished
        or another live runner holds it."""

        def take(job: Job) -> dict[str, Any] | None:
            if job.state.final or (job.leased(time.time()) and job.owner != runner):
                return None
            return {
                "owner": runner,
                "lease_until": time.time() + self.lease_s,
                "state": JobState.RUNNING,
                "attempts": job.attempts + 1,
            }

        return await self._modify(job_id, take)

    @asynccontextmanager
    async def leased(self, job: Job) -> AsyncIterator[None]:
        """Keep renewing `job`'s lease while the block runs (a runner works inside it)."""
        keeper = asyncio.create_task(self._renew(job))
        try:
            yield
        finally:
            keeper.cancel()
            with suppress(asyncio.CancelledError):
                await keeper

    async def _renew(self, job: Job) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                stored = await self.find(job.id)
                if stored is None or stored.state.final or stored.owner != job.owner:
                    return
                await self.update(stored, lease_until=time.time() + self.lease_s)
            except LostLease:
                log.warning("job taken over by another runner", job_id=job.id)
                return
            except (RedisError, ShoalError) as exc:
                # Redis away for a moment: try again at the next third; two misses in a row lose the lease.
                log.warning("could not renew a job's lease", job_id=job.id, error=str(exc))


def runner_name() -> str:
    """A name for one run of a job: its host, its process, and a nonce (a retry in the same process is
    another runner)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _finished(raw: bytes) -> bool:
    return Job.model_validate_json(raw).state.final


def job_summary(job: Job) -> dict[str, Any]:
    return job.model_dump(mode="json")
