"""The live expert migration job: plan, stage, commit, release.

plan: read the instance's expert loads and served map (ExpertStats), ask the
placement policy for a new map; nothing to move ends the job.
stage: load the new copies beside the old ones, `LAYERS_PER_CALL` layers per
call, so serving pauses only briefly between engine steps.
commit: every rank switches to the new map at the same step boundary.
release: free the copies the new map no longer uses.

Before the commit, a cancel or any failure rolls back (staged copies
discarded, the old map keeps serving): the job ends ROLLED_BACK. After it,
only the release is left; a retried job resumes there. The job id is per
instance, so a second migration cannot start while one is in flight (and
the worker refuses one too).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from services.controller.jobs.store import Job, JobState, JobStore
from shared.errors import FailedPrecondition, ShoalError
from shared.policies.placement import PLACEMENT_POLICIES, Topology, balance_of
from shared.rpc.shoal.v1 import common_pb2, worker_pb2
from shared.rpc.worker_client import WorkerClient
from shared.telemetry.logging import get_logger

log = get_logger("shoal.controller.jobs")

MIGRATE = "migrate-experts"
LAYERS_PER_CALL = 2


# Where staged expert copies come from: the checkpoint on disk, or the rank serving them now.
SOURCES = {"checkpoint": worker_pb2.WEIGHT_SOURCE_CHECKPOINT, "peer": worker_pb2.WEIGHT_SOURCE_PEER}


def plan_from_stats(stats: worker_pb2.ExpertStatsResponse, policy: str) -> dict[str, Any]:
    """The placement policy's answer for this instance, as a JSON-able plan."""
    wire = stats.expert_map
    if not wire.num_ranks:
        raise FailedPrecondition("the worker holds every expert itself: no expert parallelism, nothing to place")
    loads = np.array([list(layer.tokens) for layer in sorted(stats.layers, key=lambda layer: layer.layer)], float)
    current = np.array([list(layer.slot_experts) for layer in sorted(wire.layers, key=lambda layer: layer.layer)])
    topo = Topology(ranks=wire.num_ranks, nodes=1, slots_per_rank=wire.slots_per_rank)
    result = PLACEMENT_POLICIES[policy]().place(loads, current, topo)
    before = [balance_of(current[i], loads[i], topo) for i in range(len(loads))]
    return {
        "version": wire.version + 1,
        "num_ranks": wire.num_ranks,
        "slots_per_rank": wire.slots_per_rank,
        "slots": result.slots.tolist(),
        "moves": result.moves,
        "balance_before": float(np.mean(before)),
        "balance_after": float(result.balance.mean()),
    }


def _target(plan: dict[str, Any]) -> common_pb2.ExpertMap:
    return common_pb2.ExpertMap(
        version=plan["version"],
        num_ranks=plan["num_ranks"],
        slots_per_rank=plan["slots_per_rank"],
        layers=[common_pb2.LayerPlacement(layer=i, slot_experts=s) for i, s in enumerate(plan["slots"])],
    )


async def run_migration(job_id: str, jobs: JobStore, address: str, token: str | None) -> Job:
    job = await jobs.get(job_id)
    if job.state.final:
        return job
    job = await jobs.update(job, state=JobState.RUNNING, attempts=job.attempts + 1)
    client = WorkerClient(address, token)
    try:
        return await migrate_with(job, jobs, client)
    finally:
        await client.close()


async def migrate_with(job: Job, jobs: JobStore, client: WorkerClient) -> Job:
    """The job body over an open client (tests inject a failing one)."""
    migration_id = job.id
    if job.phase in ("", "plan", "stage"):  # before the commit: a failure rolls back
        try:
            if job.phase in ("", "plan"):
                plan = job.params.get("plan") or plan_from_stats(
                    await client.expert_stats(), str(job.params.get("policy", "migration-aware"))
                )
                if plan["moves"] == 0:
                    return await jobs.update(
                        job, state=JobState.SUCCEEDED, progress=1.0, result=plan, message="balanced: nothing to move"
                    )
                job = await jobs.update(job, phase="stage", progress=0.1, result=plan, message="plan ready")
            plan = job.result
            layers = list(range(len(plan["slots"])))
            staged = 0
            for first in range(0, len(layers), LAYERS_PER_CALL):
                job = await jobs.update(job)
                if job.cancel_requested:
                    return await _roll_back(job, jobs, client, "cancelled before the commit")
                request = worker_pb2.StageExpertsRequest(
                    migration_id=migration_id,
                    target=_target(plan),
                    layers=layers[first : first + LAYERS_PER_CALL],
                    source=SOURCES[str(plan.get("source", "checkpoint"))],
                )
                staged += (await client.stage_experts(request)).staged_copies
                done = min(len(layers), first + LAYERS_PER_CALL) / len(layers)
                job = await jobs.update(job, progress=0.1 + 0.6 * done, message=f"staged {staged} copies")
            job = await jobs.update(job)
            if job.cancel_requested:
                return await _roll_back(job, jobs, client, "cancelled before the commit")
            commit = await client.commit_expert_map(migration_id, plan["version"])
            result = {**plan, "stall_s": commit.stall_s}
            job = await jobs.update(job, phase="release", progress=0.8, result=result, message="committed")
        except ShoalError as exc:
            log.warning("migration failed before its commit; rolling back", job_id=job.id, error=exc.message)
            return await _roll_back(job, jobs, client, f"failed before the commit: {exc.message}")
    released = await client.release_experts(migration_id, discard_staged=False)
    result = {**job.result, "released_copies": released.released_copies, "released_bytes": released.released_bytes}
    return await jobs.update(
        job, state=JobState.SUCCEEDED, progress=1.0, result=result, message="migrated; old copies released"
    )


async def _roll_back(job: Job, jobs: JobStore, client: WorkerClient, why: str) -> Job:
    try:
        await client.release_experts(job.id, discard_staged=True)
    except ShoalError as exc:
        # Nothing was staged (or the worker is gone): the old map still serves either way.
        log.info("rollback found nothing to discard", job_id=job.id, error=exc.message)
    return await jobs.update(job, state=JobState.ROLLED_BACK, message=f"{why}; the old expert map still serves")
