"""Faults around a live expert migration: a commit whose reply is lost."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from services.controller.jobs.migrate import MIGRATE, migrate_with
from services.controller.jobs.store import JobStore
from shared.errors import Unavailable
from shared.rpc.shoal.v1 import worker_pb2
from shared.rpc.worker_client import WorkerClient
from tests.integration.controller.test_expert_migration import PROMPTS, expected, greedy, swapped_plan
from tests.support.services import ep_worker_processes

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
        client = WorkerClient(address)
        lossy = LostCommitReply(address)
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
