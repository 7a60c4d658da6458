"""Live expert migration on a 2-rank worker (real processes, gloo), driven by the controller's job.

Greedy requests run the whole time; every one must finish with the tokens a
single-process engine gives, before, during and after the switch.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from cli.main import app
from services.controller.jobs.migrate import MIGRATE, migrate_with
from services.controller.jobs.store import JobStore
from shared.errors import FailedPrecondition, InvalidArgument, Unavailable
from shared.rpc.shoal.v1 import common_pb2, worker_pb2
from shared.rpc.worker_client import WorkerClient
from tests.support.engines import collect, prompts, reference_engine, request
from tests.support.models import TINY_MODEL_NAME
from tests.support.pki import as_controller
from tests.support.services import (
    ADMIN,
    OPERATOR,
    VIEWER,
    RunningController,
    ep_joiner,
    ep_worker_processes,
    running_controller,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMPTS = prompts(4, [12, 70])
TOKENS = 16


@pytest.fixture(scope="module")
def expected(tiny_model: Path) -> list[list[int]]:
    async def run() -> list[list[int]]:
        engine = reference_engine(tiny_model)
        await engine.start()
        try:
            return [(await collect(engine, request(f"e{i}", p, TOKENS))).tokens for i, p in enumerate(PROMPTS)]
        finally:
            await engine.stop()

    return asyncio.run(run())


async def greedy(client: WorkerClient, index: int, tag: str) -> list[int]:
    message = worker_pb2.GenerateRequest(
        request_id=f"{tag}-{index}",
        model=TINY_MODEL_NAME,
        prompt_token_ids=PROMPTS[index],
        sampling=common_pb2.SamplingParams(max_tokens=TOKENS, ignore_eos=True),
    )
    return [t async for r in client.generate(message, timeout_s=120) for t in r.token_ids]


class Load:
    """Greedy requests back to back from a few clients until stopped (bounded in count)."""

    def __init__(self, client: WorkerClient, expected: list[list[int]], clients: int = 3, limit: int = 400) -> None:
        self.client, self.expected, self.limit = client, expected, limit
        self.results: list[bool] = []
        self.errors: list[str] = []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._run(c)) for c in range(clients)]

    async def _run(self, client_index: int) -> None:
        n = 0
        while not self._stop.is_set() and len(self.results) < self.limit:
            index = (client_index + n) % len(PROMPTS)
            try:
                self.results.append(await greedy(self.client, index, f"load{client_index}-{n}") == self.expected[index])
            except Exception as exc:  # any failure is what the test counts
                self.errors.append(repr(exc))
            n += 1

    async def finish(self) -> None:
        """Wait until every client has stopped (at the count limit, or once told to)."""
        await asyncio.gather(*self._tasks)

    async def stop(self) -> None:
        self._stop.set()
        await self.finish()


def swapped_plan(stats: worker_pb2.ExpertStatsResponse) -> dict[str, Any]:
    """A target map that moves experts 0 and 1 to each other's rank in every layer."""
    wire = stats.expert_map
    slots = []
    for layer in sorted(wire.layers, key=lambda layer: layer.layer):
        layer_slots = list(layer.slot_experts)
        a, b = layer_slots.index(0), layer_slots.index(1)
        layer_slots[a], layer_slots[b] = 1, 0
        slots.append(layer_slots)
    return {
        "version": wire.version + 1,
        "num_ranks": wire.num_ranks,
        "slots_per_rank": wire.slots_per_rank,
        "slots": slots,
        "moves": 2 * len(slots),
    }


async def wait_job(front: RunningController, job_id: str, timeout_s: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(base_url=front.url, headers=front.headers(VIEWER)) as http:
        while time.monotonic() < deadline:
            job: dict[str, Any] = (await http.get(f"/v1/jobs/{job_id}")).json()
            if job["state"] not in ("pending", "running"):
                return job
            await asyncio.sleep(0.1)
    raise TimeoutError(job_id)


async def test_a_migration_under_load_loses_nothing_and_changes_no_output(
    redis_url: str, tiny_model: Path, expected: list[list[int]], tmp_path: Path
) -> None:
    with ep_worker_processes(redis_url, tiny_model, 2, worker_id="ep-0") as (address, _):
        async with running_controller(redis_url) as front:
            client = WorkerClient(address, as_controller())
            try:
                before = await client.expert_stats()
                assert before.expert_map.num_ranks == 2
                async with httpx.AsyncClient(base_url=front.url, headers=front.headers(OPERATOR)) as http:
                    view = (await http.get("/v1/workers/ep-0/experts")).json()
                    assert view["expert_parallel"] and view["version"] == before.expert_map.version
                    dry = (await http.post("/v1/workers/ep-0/experts/rebalance", json={"dry_run": True})).json()
                    assert dry["job"] is None and "balance_before" in dry["plan"]
                load = Load(client, expected)
                await asyncio.sleep(1.0)  # serving before the migration
                job = await front.app.open_migration("ep-0", address, swapped_plan(before))
                final = await wait_job(front, job.id)
                await asyncio.sleep(1.0)  # and after it
                await load.stop()
                assert final["state"] == "succeeded", final
                assert final["result"]["released_copies"] == 2 * len(before.layers)
                after = await client.expert_stats()
                assert after.expert_map.version == before.expert_map.version + 1
                env = {"SHOAL_CONTROLLER_URL": front.url, "SHOAL_ADMIN_TOKEN": OPERATOR, "COLUMNS": "200"}
                png = tmp_path / "heatmap.png"
                shown = await asyncio.to_thread(
                    CliRunner().invoke, app, ["experts", "ep-0", "--heatmap", str(png)], env=env
                )
                assert shown.exit_code == 0 and f"map v{after.expert_map.version}" in shown.output
                assert png.read_bytes().startswith(b"\x89PNG")
                planned = await asyncio.to_thread(CliRunner().invoke, app, ["rebalance", "ep-0", "--dry-run"], env=env)
                assert planned.exit_code == 0 and "expert copies to move" in planned.output
                assert load.errors == [], load.errors
                assert len(load.results) > 10 and all(load.results), f"{load.results.count(False)} outputs changed"
            finally:
                await client.close()


async def refuses_bad_migrations(client: WorkerClient, before: worker_pb2.ExpertStatsResponse) -> None:
    """Malformed or out-of-order migration calls get a clear status and change nothing."""
    plan = swapped_plan(before)
    target = common_pb2.ExpertMap(version=plan["version"], num_ranks=2, slots_per_rank=plan["slots_per_rank"])
    for i, slots in enumerate(plan["slots"]):
        target.layers.add(layer=i, slot_experts=slots)
    cases: list[tuple[worker_pb2.StageExpertsRequest, type[Exception], str]] = []
    wrong_ranks = common_pb2.ExpertMap(version=plan["version"], num_ranks=3, slots_per_rank=4)
    cases.append((worker_pb2.StageExpertsRequest(migration_id="x", target=wrong_ranks), InvalidArgument, "ranks"))
    lost = common_pb2.ExpertMap()
    lost.CopyFrom(target)
    lost.layers[0].slot_experts[:] = [0] * len(lost.layers[0].slot_experts)  # every other expert of layer 0 gone
    cases.append((worker_pb2.StageExpertsRequest(migration_id="x", target=lost), InvalidArgument, "holders"))
    stale = common_pb2.ExpertMap()
    stale.CopyFrom(target)
    stale.version = before.expert_map.version
    cases.append((worker_pb2.StageExpertsRequest(migration_id="x", target=stale), InvalidArgument, "newer"))
    for message, error, fragment in cases:
        with pytest.raises(error, match=fragment):
            await client.stage_experts(message)
    with pytest.raises(FailedPrecondition, match="no staged migration"):
        await client.commit_expert_map("never-staged", plan["version"])
    assert (await client.expert_stats()).expert_map == before.expert_map


class FailingCommit(WorkerClient):
    """Injected failure: the commit call never reaches the worker (its network dropped)."""

    async def commit_expert_map(self, migration_id: str, version: int) -> worker_pb2.CommitExpertMapResponse:
        raise Unavailable("injected: connection to the worker lost before the commit")


async def test_a_failure_between_stage_and_commit_rolls_back(
    redis_url: str, tiny_model: Path, expected: list[list[int]], redis: Any
) -> None:
    with ep_worker_processes(redis_url, tiny_model, 2, worker_id="ep-1") as (address, _):
        client = WorkerClient(address, as_controller())
        failing = FailingCommit(address, as_controller())
        try:
            before = await client.expert_stats()
            jobs = JobStore(redis)
            job, _ = await jobs.create(MIGRATE, {"address": address, "plan": swapped_plan(before)})
            final = await migrate_with(job, jobs, failing)
            assert final.state.value == "rolled-back" and "injected" in final.message
            after = await client.expert_stats()
            assert after.expert_map == before.expert_map  # the old map still serves
            assert [await greedy(client, i, "after") for i in range(len(PROMPTS))] == expected
            await refuses_bad_migrations(client, before)
            # The worker's migration slot is free again: a new migration goes through, this time copying
            # the moved experts from the rank serving them rather than reading the checkpoint.
            plan = {**swapped_plan(before), "source": "peer"}
            retry, _ = await jobs.create(MIGRATE, {"address": address, "plan": plan})
            assert (await migrate_with(retry, jobs, client)).state.value == "succeeded"
            assert (await client.expert_stats()).expert_map.version == before.expert_map.version + 1
            assert [await greedy(client, i, "peer") for i in range(len(PROMPTS))] == expected
        finally:
            await client.close()
            await failing.close()


async def test_scheduled_rebalancing_records_balance_and_migrates(
    redis_url: str, tiny_model: Path, expected: list[list[int]]
) -> None:
    with ep_worker_processes(redis_url, tiny_model, 2, worker_id="ep-sched") as (address, _):
        client = WorkerClient(address, as_controller())
        load = Load(client, expected, clients=2)
        try:
            await asyncio.sleep(2.0)  # expert statistics to plan from
            async with running_controller(
                redis_url,
                expert_stats_interval_s=0.3,
                expert_rebalance_interval_s=0.5,
                expert_rebalance_min_gain=0.0,
            ) as front:
                job = None
                for _ in range(300):
                    jobs = [j for j in await front.app.jobs.recent() if j.kind == MIGRATE]
                    if jobs:
                        job = await wait_job(front, jobs[0].id)
                        break
                    await asyncio.sleep(0.1)
                assert job is not None and job["state"] == "succeeded", job
                await asyncio.sleep(1.0)
                async with httpx.AsyncClient(base_url=front.url, headers=front.headers(VIEWER)) as http:
                    samples = (await http.get("/v1/workers/ep-sched/experts/history")).json()
                assert len(samples) >= 2
                assert samples[0]["version"] < samples[-1]["version"]  # the map changed under the history
                assert all(s["balance_max"] >= s["balance_mean"] >= 1.0 for s in samples)
            await load.stop()
            assert load.errors == [] and all(load.results)
        finally:
            await client.close()


def copies(layer: common_pb2.LayerPlacement, slots_per_rank: int) -> Counter[int]:
    """Copies of each expert in one layer (a rank's slots may repeat an expert: one copy)."""
    slots = list(layer.slot_experts)
    ranks = len(slots) // slots_per_rank
    return Counter(e for r in range(ranks) for e in set(slots[r * slots_per_rank : (r + 1) * slots_per_rank]))


async def test_redundant_slots_end_up_holding_copies_of_the_hot_experts(
    redis_url: str, tiny_model: Path, expected: list[list[int]]
) -> None:
    # Each rank on its own machine, as far as the instance can tell: its topology is two nodes.
    ranks = {r: {"SHOAL_WORKER_EP_REDUNDANT_SLOTS": "1", "SHOAL_WORKER_NODE_NAME": f"node-{r}"} for r in range(2)}
    with ep_worker_processes(redis_url, tiny_model, 2, worker_id="ep-spare", rank_env=ranks) as (address, _):
        client = WorkerClient(address, as_controller())
        try:
            start = (await client.expert_stats()).expert_map
            assert start.num_nodes == 2
            assert start.slots_per_rank == 8 // 2 + 1  # each rank's share and one spare slot, filled
            assert all(sum(copies(layer, start.slots_per_rank).values()) == 10 for layer in start.layers)
            load = Load(client, expected, clients=2)
            await asyncio.sleep(2.0)  # expert statistics to plan from
            await load.stop()
            # The load stops before the controller plans, so the counts it plans from are the ones checked
            # below: with load running on, two experts close in load can trade places between the two reads.
            seen = [list(layer.tokens) for layer in (await client.expert_stats()).layers]
            async with running_controller(
                redis_url, expert_stats_interval_s=0.3, expert_rebalance_interval_s=0.5, expert_rebalance_min_gain=0.0
            ) as front:
                for _ in range(300):
                    jobs = [j for j in await front.app.jobs.recent() if j.kind == MIGRATE]
                    if jobs:
                        break
                    await asyncio.sleep(0.1)
                assert jobs, "no rebalance was planned"
                job = await wait_job(front, jobs[0].id)
                assert job["state"] == "succeeded", job
                async with httpx.AsyncClient(base_url=front.url, headers=front.headers(VIEWER)) as http:
                    shown = (await http.get("/v1/workers/ep-spare/experts")).json()
                assert shown["num_nodes"] == 2 and shown["slots_per_rank"] == 5
            stats = await client.expert_stats()
            assert [list(layer.tokens) for layer in stats.layers] == seen
            served = stats.expert_map
            assert served.version > start.version
            # In every layer the copies now sit on the experts the load made hottest: the hottest has two,
            # where in some layer it started with one (the spare slots began as copies of other experts).
            hottest = [max(range(8), key=lambda e: tokens[e]) for tokens in seen]
            for expert, placement in zip(hottest, served.layers, strict=True):
                assert copies(placement, served.slots_per_rank)[expert] == 2, (hottest, placement)
            assert any(copies(p, start.slots_per_rank)[e] == 1 for e, p in zip(hottest, start.layers, strict=True))
            after = Load(client, expected, clients=2, limit=8)
            await asyncio.wait_for(after.finish(), timeout=120)
            assert after.errors == [] and len(after.results) >= 8 and all(after.results)  # outputs unchanged
            assert load.errors == [] and all(load.results)
        finally:
            await client.close()


async def test_adding_a_rank_under_load_loses_nothing(
    redis_url: str, tiny_model: Path, expected: list[list[int]]
) -> None:
    with ep_worker_processes(redis_url, tiny_model, 2, worker_id="ep-elastic") as (address, _):
        async with running_controller(redis_url) as front:
            client = WorkerClient(address, as_controller())
            master, joiner = ep_joiner(redis_url, tiny_model, 3, "ep-elastic")
            http = httpx.AsyncClient(base_url=front.url, headers=front.headers(OPERATOR))
            resize = "/v1/workers/ep-elastic/experts/resize"
            try:
                for body, status, fragment in [
                    ({"ranks": 4, "master": master}, 400, "one rank at a time"),
                    ({"ranks": 3}, 404, "not started by this controller"),  # a joiner it could start itself
                    ({"ranks": 3, "master": "nowhere"}, 400, "master"),
                ]:
                    answer = await http.post(resize, json=body)
                    assert answer.status_code == status and fragment in answer.text, answer.text
                load = Load(client, expected)
                await asyncio.sleep(1.0)  # serving before
                grow = await http.post(resize, json={"ranks": 3, "master": master})
                assert grow.status_code == 202, grow.text
                grown = await wait_job(front, grow.json()["id"], 180)
                assert grown["state"] == "succeeded", grown
                assert grown["result"]["ranks"] == 3 and grown["result"]["synced_bytes"] > 0
                stats = await client.expert_stats()
                assert stats.expert_map.num_ranks == 3
                width = stats.expert_map.slots_per_rank
                assert all(-1 not in layer.slot_experts[2 * width :] for layer in stats.expert_map.layers)
                await asyncio.sleep(1.0)  # three ranks serve
                with pytest.raises(FailedPrecondition, match="still serves experts"):
                    await client.resize_experts(2)  # experts first migrate off the leaving rank
                shrink = await http.post(resize, json={"ranks": 2, "source": "checkpoint"})
                shrunk = await wait_job(front, shrink.json()["id"], 180)
                assert shrunk["state"] == "succeeded", shrunk
                assert await asyncio.to_thread(joiner.popen.wait, 30) == 0  # the rank left cleanly
                assert (await client.expert_stats()).expert_map.num_ranks == 2
                await asyncio.sleep(1.0)  # and two again
                await load.stop()
                assert load.errors == [] and len(load.results) >= 6 and all(load.results), load.errors
            finally:
                joiner.terminate(grace_s=10)
                await http.aclose()
                await client.close()


async def test_the_local_actuator_launches_and_stops_expert_parallel_instances(
    redis_url: str, tiny_model: Path, expected: list[list[int]]
) -> None:
    pool = {
        "name": "moe",
        "model": TINY_MODEL_NAME,
        "engine": "reference",
        "min_replicas": 0,
        "max_replicas": 1,
        "scaling": {"policy": "fixed", "params": {"replicas": 1}},
        "worker_env": {"EP_SIZE": "2", "DEVICE": "cpu"},
    }
    async with running_controller(redis_url) as front:
        launcher = front.app.launcher
        assert launcher is not None
        async with httpx.AsyncClient(base_url=front.url, headers=front.headers(ADMIN), timeout=30) as http:
            await http.post("/v1/models", json={"name": TINY_MODEL_NAME, "path": str(tiny_model)})
            assert (await http.post("/v1/pools", json=pool)).status_code == 201
            workers: list[dict[str, Any]] = []
            for _ in range(600):
                workers = (await http.get("/v1/workers")).json()
                if workers:
                    break
                await asyncio.sleep(0.2)
            assert len(workers) == 1 and launcher.processes == 2  # one replica, two ranks
            view = (await http.get(f"/v1/workers/{workers[0]['worker_id']}/experts")).json()
            assert view["expert_parallel"] and view["num_ranks"] == 2
            worker_id = workers[0]["worker_id"]
            client = WorkerClient(workers[0]["address"], as_controller())
            try:
                assert await greedy(client, 0, "launched") == expected[0]
                # Elastic: the launcher starts the third rank itself; later that rank leaves, and the
                # instance, still serving, is neither stopped nor replaced.
                grow = await http.post(f"/v1/workers/{worker_id}/experts/resize", json={"ranks": 3})
                assert grow.status_code == 202, grow.text
                assert (await wait_job(front, grow.json()["id"], 180))["state"] == "succeeded"
                assert launcher.processes == 3 and (await client.expert_stats()).expert_map.num_ranks == 3
                assert await greedy(client, 1, "grown") == expected[1]
                shrink = await http.post(f"/v1/workers/{worker_id}/experts/resize", json={"ranks": 2})
                assert (await wait_job(front, shrink.json()["id"], 180))["state"] == "succeeded"
                for _ in range(100):
                    if launcher.processes == 2:
                        break
                    await asyncio.sleep(0.2)
                assert launcher.processes == 2 and (await client.expert_stats()).expert_map.num_ranks == 2
                assert [w["worker_id"] for w in (await http.get("/v1/workers")).json()] == [worker_id]
                assert await greedy(client, 0, "shrunk") == expected[0]
            finally:
                await client.close()
            await http.post("/v1/pools/moe/scale", json={"replicas": 0})
            for _ in range(300):
                if launcher.processes == 0:
                    break
                await asyncio.sleep(0.2)
            assert launcher.processes == 0  # drained, then both ranks stopped
