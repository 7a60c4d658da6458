"""Faults around a live expert migration on a real 2-rank instance (processes, gloo).

A commit whose reply is lost; a rank that cannot stage its copies; a runner
that dies between stage and commit; a runner that stalls past its lease while
another finishes the job. A runner's death or stall is injected at an exact
step inside this process (the worker processes are real): that is where a
SIGKILL or SIGSTOP of a Celery worker would leave the job.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from services.controller.jobs.migrate import MIGRATE, migrate_with, run_migration
from services.controller.jobs.store import Job, JobState, JobStore, LostLease
from shared.errors import Unavailable
from shared.rpc.shoal.v1 import worker_pb2
from shared.rpc.worker_client import WorkerClient
from tests.integration.controller.test_expert_migration import PROMPTS, expected, greedy, swapped_plan
from tests.support.pki import as_controller
from tests.support.services import ep_joiner, ep_worker_processes

pytestmark = [pytest.mark.integration, pytest.mark.slow]

__all__ = ["expected"]  # the fixture, from the migration tests


class LostCommitReply(WorkerClient):
    """Injected failure: the commit reaches every rank, then its reply is lost on the way back."""

    async def commit_expert_map(self, migration_id: str, version: int) -> worker_pb2.CommitExpertMapResponse:
        await super().commit_expert_map(migration_id, version)
        raise Unavailable("injected: the commit's reply was lost")


async def test_a_commit_whose_reply_is_lost_is_recorded_as_committed(
    redis_url: str, tiny_model: Path, expected: list[list[int]], redis: Any
) -> None:
    with ep_worker_processes(redis_url, tiny_model, 2, worker_id="ep-lost") as (address, _):
        client = WorkerClient(address, as_controller())
        lossy = LostCommitReply(address, as_controller())
        try:
            before = await client.expert_stats()
            jobs = JobStore(redis)
            job, _ = await jobs.create(MIGRATE, {"address": address, "plan": swapped_plan(before)})
            final = await migrate_with(job, jobs, lossy)
            assert final.state.value == "succeeded", final.message  # not "rolled-back": the new map serves
            assert "released" in final.message
            after = await client.expert_stats()
            assert after.expert_map.version == before.expert_map.version + 1
            assert [await greedy(client, i, "after") for i in range(len(PROMPTS))] == expected
        finally:
            await client.close()
            await lossy.close()


async def test_a_rank_that_cannot_stage_rolls_the_migration_back_instead_of_hanging(
    redis_url: str, tiny_model: Path, expected: list[list[int]], redis: Any, tmp_path: Path
) -> None:
    follower_model = tmp_path / "rank1-model"
    shutil.copytree(tiny_model, follower_model)
    with ep_worker_processes(redis_url, tiny_model, 2, "ep-oom", rank_models={1: follower_model}) as (address, _):
        (follower_model / "model.safetensors").unlink()  # rank 1's disk loses the checkpoint it serves from
        client = WorkerClient(address, as_controller())
        try:
            before = await client.expert_stats()
            jobs = JobStore(redis)
            job, _ = await jobs.create(MIGRATE, {"address": address, "plan": swapped_plan(before)})
            final = await asyncio.wait_for(migrate_with(job, jobs, client), 120)  # before the fix: a hang
            assert final.state is JobState.ROLLED_BACK and "rank 1 could not stage" in final.message
            assert (await client.expert_stats()).expert_map == before.expert_map
            assert [await greedy(client, i, "after") for i in range(len(PROMPTS))] == expected
        finally:
            await client.close()


class RunnerKilled(BaseException):
    """Injected: the runner's process dies here (nothing after this line of the runner runs)."""


class DiesAtCommit(WorkerClient):
    async def commit_expert_map(self, migration_id: str, version: int) -> worker_pb2.CommitExpertMapResponse:
        raise RunnerKilled


class DiesAtStage(WorkerClient):
    async def stage_experts(self, request: worker_pb2.StageExpertsRequest) -> worker_pb2.StageExpertsResponse:
        raise RunnerKilled


class Recording(WorkerClient):
    """Records the calls that change the instance."""

    def __init__(self, address: str) -> None:
        super().__init__(address, as_controller())
        self.changes: list[str] = []

    async def stage_experts(self, request: worker_pb2.StageExpertsRequest) -> worker_pb2.StageExpertsResponse:
        self.changes.append("stage")
        return await super().stage_experts(request)

    async def commit_expert_map(self, migration_id: str, version: int) -> worker_pb2.CommitExpertMapResponse:
        self.changes.append("commit")
        return await super().commit_expert_map(migration_id, version)

    async def release_experts(self, migration_id: str, discard_staged: bool) -> worker_pb2.ReleaseExpertsResponse:
        self.changes.append("release")
        return await super().release_experts(migration_id, discard_staged)


LEASE_S = 1.0


async def _claimed(redis: Any, params: dict[str, Any]) -> tuple[JobStore, Job]:
    """A migration job (leases of LEASE_S), claimed by a first runner."""
    jobs = JobStore(redis, lease_s=LEASE_S)
    job, _ = await jobs.create(MIGRATE, params)
    first = await jobs.claim(job.id, "runner-1")
    assert first is not None
    return jobs, first


async def _finished_by_the_next(jobs: JobStore, job_id: str, address: str) -> Job:
    """Once the first runner's lease has lapsed, what the resubmitted task runs; it must succeed."""
    lapse = (await jobs.get(job_id)).lease_until - time.time()
    await asyncio.sleep(max(0.0, lapse) + 0.1)
    final = await run_migration(job_id, jobs, address, as_controller())
    assert final.state is JobState.SUCCEEDED, final.message
    return final


async def test_a_runner_killed_between_stage_and_commit_is_finished_by_the_next(
    redis_url: str, tiny_model: Path, expected: list[list[int]], redis: Any
) -> None:
    with ep_worker_processes(redis_url, tiny_model, 2, worker_id="ep-killed") as (address, _):
        client = WorkerClient(address, as_controller())
        dying = DiesAtCommit(address, as_controller())
        try:
            before = await client.expert_stats()
            jobs, first = await _claimed(redis, {"address": address, "plan": swapped_plan(before)})
            with pytest.raises(RunnerKilled):
                async with jobs.leased(first):
                    await migrate_with(first, jobs, dying)
            assert (await jobs.get(first.id)).phase == "stage"
            final = await _finished_by_the_next(jobs, first.id, address)
            assert final.attempts == 2
            assert (await client.expert_stats()).expert_map.version == before.expert_map.version + 1  # once
            assert [await greedy(client, i, "after") for i in range(len(PROMPTS))] == expected
        finally:
            await client.close()
            await dying.close()


async def test_a_runner_that_lost_its_lease_changes_nothing_when_it_wakes(
    redis_url: str, tiny_model: Path, expected: list[list[int]], redis: Any
) -> None:
    with ep_worker_processes(redis_url, tiny_model, 2, worker_id="ep-stalled") as (address, _):
        client = WorkerClient(address, as_controller())
        stale = Recording(address)
        try:
            before = await client.expert_stats()
            # The first runner claims the job, then stalls (SIGSTOP) past its lease.
            jobs, stalled = await _claimed(redis, {"address": address, "plan": swapped_plan(before)})
            await _finished_by_the_next(jobs, stalled.id, address)
            with pytest.raises(LostLease):  # it wakes, with its old copy of the job
                await migrate_with(stalled, jobs, stale)
            assert stale.changes == []  # no stage, no rollback of the other runner's work
            assert (await jobs.get(stalled.id)).state is JobState.SUCCEEDED
            assert (await client.expert_stats()).expert_map.version == before.expert_map.version + 1
            assert [await greedy(client, i, "after") for i in range(len(PROMPTS))] == expected
        finally:
            await client.close()
            await stale.close()


async def test_a_runner_killed_after_a_rank_joined_is_finished_by_the_next(
    redis_url: str, tiny_model: Path, expected: list[list[int]], redis: Any
) -> None:
    with ep_worker_processes(redis_url, tiny_model, 2, worker_id="ep-grow") as (address, _):
        master, joiner = ep_joiner(redis_url, tiny_model, 3, "ep-grow")
        client = WorkerClient(address, as_controller())
        dying = DiesAtStage(address, as_controller())
        try:
            params = {"address": address, "resize": {"ranks": 3, "master": master}, "source": "checkpoint"}
            jobs, first = await _claimed(redis, params)
            with pytest.raises(RunnerKilled):  # the new rank has joined; the runner dies before any stage
                async with jobs.leased(first):
                    await asyncio.wait_for(migrate_with(first, jobs, dying), 300)
            assert (await client.expert_stats()).expert_map.num_ranks == 3
            final = await _finished_by_the_next(jobs, first.id, address)
            assert final.attempts == 2 and final.result["ranks"] == 3  # it did not try to join again
            stats = await client.expert_stats()
            width = stats.expert_map.slots_per_rank
            assert all(-1 not in layer.slot_experts[2 * width :] for layer in stats.expert_map.layers)
            assert [await greedy(client, i, "after") for i in range(len(PROMPTS))] == expected
        finally:
            joiner.terminate(grace_s=10)
            await client.close()
            await dying.close()
