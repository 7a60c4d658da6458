"""The live expert migration job: plan, stage, commit, release.

plan: read the instance's expert loads and served map (ExpertStats), ask the
placement policy for a new map; nothing to move ends the job.
stage: load the new copies beside the old ones, `LAYERS_PER_CALL` layers per
call, so serving pauses only briefly between engine steps.
commit: every rank switches to the new map at the same step boundary.
release: free the copies the new map no longer uses.

Before the commit, a cancel or any failure rolls back (staged copies
discarded, the old map keeps serving): the job ends ROLLED_BACK. After it,
only the release is left; a retried job resumes there. Whether the commit
happened is read from the worker, never assumed: a commit whose reply was
lost, or a job retried after its runner died around the commit, finds the
new map version serving and goes on to the release; when the worker cannot
say, the job fails saying so rather than claiming a rollback. The job id is per
instance, so a second migration cannot start while one is in flight (and
the worker refuses one too).

The same job resizes an instance (elastic expert parallelism, params
`resize`): to grow, `join` first regroups the ranks with the process waiting
at `resize.master` (a failure there ends the job FAILED and changes nothing),
then the migration spreads the experts over every rank; to shrink, the
migration's plan leaves the last rank empty, and `leave` then regroups the
ranks without it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np

from services.controller.jobs.store import Job, JobState, JobStore, LostLease, runner_name
from shared.errors import FailedPrecondition, ShoalError, Unavailable
from shared.policies.placement import PLACEMENT_POLICIES, Topology, balance_of, vacate_last_rank
from shared.rpc.security import RpcSecurity
from shared.rpc.shoal.v1 import common_pb2, worker_pb2
from shared.rpc.worker_client import WorkerClient
from shared.telemetry.logging import get_logger

log = get_logger("shoal.controller.jobs")

MIGRATE = "migrate-experts"
LAYERS_PER_CALL = 2
JOIN_WAIT_S = 600.0  # a joining rank loads the model's dense weights before it can join
JOIN_RETRY_S = 1.0


# Where staged expert copies come from: the checkpoint on disk, or the rank serving them now.
SOURCES = {"checkpoint": worker_pb2.WEIGHT_SOURCE_CHECKPOINT, "peer": worker_pb2.WEIGHT_SOURCE_PEER}


def topology_of(wire: common_pb2.ExpertMap) -> Topology:
    """The instance's ranks, the nodes it reports (1 when it does not) and its slots per rank."""
    return Topology(ranks=wire.num_ranks, nodes=wire.num_nodes or 1, slots_per_rank=wire.slots_per_rank)


def plan_from_stats(stats: worker_pb2.ExpertStatsResponse, policy: str, vacate_last: bool = False) -> dict[str, Any]:
    """The placement policy's answer for this instance, as a JSON-able plan (`vacate_last`: leave the last rank
    empty, so it can leave)."""
    wire = stats.expert_map
    if not wire.num_ranks:
        raise FailedPrecondition("the worker holds every expert itself: no expert parallelism, nothing to place")
    loads = np.array([list(layer.tokens) for layer in sorted(stats.layers, key=lambda layer: layer.layer)], float)
    current = np.array([list(layer.slot_experts) for layer in sorted(wire.layers, key=lambda layer: layer.layer)])
    topo = topology_of(wire)
    if vacate_last:
        try:
            result = vacate_last_rank(PLACEMENT_POLICIES[policy](), loads, current, topo)
        except ValueError as exc:
            raise FailedPrecondition(f"the instance cannot lose a rank: {exc}") from exc
    else:
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


async def run_migration(job_id: str, jobs: JobStore, address: str, security: RpcSecurity) -> Job:
    job = await jobs.claim(job_id, runner_name())
    if job is None:
        return await jobs.get(job_id)  # finished, or a live runner has it
    client = WorkerClient(address, security)
    try:
        async with jobs.leased(job):
            return await migrate_with(job, jobs, client)
    finally:
        await client.close()


async def migrate_with(job: Job, jobs: JobStore, client: WorkerClient) -> Job:
    """The job body over an open client (tests inject a failing one)."""
    migration_id = job.id
    resize: dict[str, Any] | None = job.params.get("resize")  # {"ranks": n, "master": "host:port" to grow}
    shrink = resize is not None and "master" not in resize
    if resize and not shrink and job.phase in ("", "join"):
        job = await _join(job, jobs, client, int(resize["ranks"]), str(resize["master"]))
        if job.state.final:
            return job
    if job.phase == "stage" and await _committed(client, int(job.result["version"])):
        job = await jobs.update(job, phase="release", progress=0.8, message="committed (found serving on retry)")
    if job.phase in ("", "plan", "stage"):  # before the commit: a failure rolls back
        try:
            if job.phase in ("", "plan"):
                plan = job.params.get("plan") or plan_from_stats(
                    await client.expert_stats(), str(job.params.get("policy", "migration-aware")), shrink
                )
                plan = {**plan, **({"source": job.params["source"]} if "source" in job.params else {})}
                if plan["moves"] == 0 and not shrink:
                    return await jobs.update(
                        job,
                        state=JobState.SUCCEEDED,
                        progress=1.0,
                        result={**job.result, **plan},
                        message="balanced: nothing to move",
                    )
                phase = "stage" if plan["moves"] else "leave"
                job = await jobs.update(job, phase=phase, progress=0.1, result={**job.result, **plan})
            if job.phase == "stage":
                job = await _stage_and_commit(job, jobs, client)
        except LostLease:
            raise  # another runner has the job now: this one touches nothing more (no rollback of its work)
        except ShoalError as exc:
            log.warning("migration failed before its commit; rolling back", job_id=job.id, error=exc.message)
            return await _roll_back(job, jobs, client, f"failed before the commit: {exc.message}")
        if job.state.final:
            return job
    if job.phase == "release":
        released = await client.release_experts(migration_id, discard_staged=False)
        result = {**job.result, "released_copies": released.released_copies, "released_bytes": released.released_bytes}
        if not shrink:
            return await jobs.update(
                job, state=JobState.SUCCEEDED, progress=1.0, result=result, message="migrated; old copies released"
            )
        job = await jobs.update(job, phase="leave", progress=0.9, result=result, message="last rank emptied")
    assert resize is not None and job.phase == "leave"
    left = await client.resize_experts(int(resize["ranks"]))
    result = {**job.result, "ranks": left.ranks, "regroup_stall_s": left.stall_s}
    return await jobs.update(
        job, state=JobState.SUCCEEDED, progress=1.0, result=result, message=f"rank {left.ranks} left"
    )


async def _join(job: Job, jobs: JobStore, client: WorkerClient, ranks: int, master: str) -> Job:
    """Regroup the instance with the rank waiting at `master`, retrying while that process still loads."""
    deadline = time.monotonic() + JOIN_WAIT_S
    while True:
        try:
            joined = await client.resize_experts(ranks, master)
            break
        except Unavailable as exc:
            job = await jobs.update(job, phase="join", message=f"waiting for the new rank: {exc.message}")
            if job.cancel_requested:
                return await jobs.update(job, state=JobState.CANCELLED, message="cancelled before the new rank joined")
            if time.monotonic() > deadline:
                return await jobs.update(job, state=JobState.FAILED, message=f"the new rank never came: {exc.message}")
            await asyncio.sleep(JOIN_RETRY_S)
        except ShoalError as exc:
            return await jobs.update(job, state=JobState.FAILED, message=f"the new rank did not join: {exc.message}")
    return await jobs.update(
        job,
        phase="plan",
        progress=0.05,
        result={"ranks": joined.ranks, "synced_bytes": joined.synced_bytes, "regroup_stall_s": joined.stall_s},
        message=f"rank {joined.ranks - 1} joined",
    )


async def _stage_and_commit(job: Job, jobs: JobStore, client: WorkerClient) -> Job:
    """Stage the plan's copies a few layers at a time, then commit; a cancel before the commit rolls back."""
    migration_id, plan = job.id, job.result
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
    try:
        commit = await client.commit_expert_map(migration_id, plan["version"])
    except ShoalError as exc:
        served = await _committed(client, int(plan["version"]))
        if served is None:
            return await jobs.update(
                job,
                state=JobState.FAILED,
                message=f"the commit's outcome is unknown ({exc.message}) and the worker does not answer; "
                f"read its expert map version before acting",
            )
        if not served:
            raise
        log.warning("the commit landed but its reply was lost", job_id=job.id, error=exc.message)
        return await jobs.update(job, phase="release", progress=0.8, result=plan, message="committed (reply lost)")
    result = {**plan, "stall_s": commit.stall_s}
    return await jobs.update(job, phase="release", progress=0.8, result=result, message="committed")


async def _committed(client: WorkerClient, version: int) -> bool | None:
    """Whether the worker serves map `version` (or later) now; None when it cannot be asked."""
    try:
        return int((await client.expert_stats()).expert_map_version) >= version
    except ShoalError:
        return None


async def _roll_back(job: Job, jobs: JobStore, client: WorkerClient, why: str) -> Job:
    try:
        await client.release_experts(job.id, discard_staged=True)
    except ShoalError as exc:
        # Nothing was staged (or the worker is gone): the old map still serves either way.
        log.info("rollback found nothing to discard", job_id=job.id, error=exc.message)
    return await jobs.update(job, state=JobState.ROLLED_BACK, message=f"{why}; the old expert map still serves")
