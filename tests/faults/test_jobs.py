"""Faults around the controller's jobs: what a cancelled or undone scale-down leaves behind."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from shared.config import EngineKind
from shared.rpc.shoal.v1 import common_pb2, worker_pb2
from shared.rpc.worker_client import WorkerClient
from tests.integration.controller.test_jobs import (
    admin,
    busy_worker,
    declare_pool,
    router_sees,
    stream_completion,
    until,
)
from tests.support.pki import as_controller
from tests.support.services import RunningController, running_controller, running_router, running_worker

pytestmark = pytest.mark.integration

MODEL = "shoal-tiny-moe"
SLOW = {"engine": EngineKind.SIM, "sim_speedup": 0.05, "heartbeat_interval_s": 0.3, "lease_ttl_s": 2.0}


async def _admits(address: str) -> bool:
    """The worker takes a new request (a draining one refuses it at once)."""
    client = WorkerClient(address, as_controller())
    request = worker_pb2.GenerateRequest(
        request_id=f"probe-{asyncio.get_running_loop().time()}",
        model=MODEL,
        prompt_token_ids=[20, 21],
        sampling=common_pb2.SamplingParams(max_tokens=1),
    )
    try:
        async for _ in client.generate(request, timeout_s=30):
            pass
    except Exception:
        return False
    finally:
        await client.close()
    return True


async def test_uncordoning_a_drained_worker_makes_it_admit_again(redis_url: str, tiny_model: Path) -> None:
    async with (
        running_controller(redis_url) as front,
        running_worker(redis_url, model_path=tiny_model, worker_id="w-d", engine=EngineKind.SIM) as worker,
    ):
        await admin(front, "POST", "/v1/workers/w-d/drain")
        assert not await _admits(worker.address)
        await admin(front, "POST", "/v1/workers/w-d/uncordon")
        assert await _admits(worker.address)
        assert not worker.engine.load().draining


async def test_a_cancelled_scale_down_leaves_the_worker_serving(redis_url: str, tiny_model: Path) -> None:
    async with (
        running_controller(redis_url) as front,
        running_router(redis_url, tiny_model) as router,
        running_worker(redis_url, model_path=tiny_model, worker_id="w-c", **SLOW) as worker,
    ):
        await declare_pool(front, tiny_model)
        assert await until(lambda: router_sees(router.url, 1), 10)
        running = asyncio.create_task(stream_completion(router.url))
        assert await until(lambda: busy_worker(front), 20)
        job = await admin(front, "DELETE", "/v1/workers/w-c")  # drain-first scale-down
        assert await until(lambda: _phase(front, job["id"], "drain"), 20)
        await admin(front, "POST", f"/v1/jobs/{job['id']}/cancel")
        assert await until(lambda: _state(front, job["id"], "cancelled"), 30)
        assert await running == (200, 40)  # what it was running finished
        assert not worker.engine.load().draining
        assert await _admits(worker.address)
        assert await stream_completion(router.url) == (200, 40)  # and routers send to it again


async def _phase(front: RunningController, job_id: str, phase: str) -> bool:
    return bool((await admin(front, "GET", f"/v1/jobs/{job_id}"))["phase"] == phase)


async def _state(front: RunningController, job_id: str, state: str) -> bool:
    return bool((await admin(front, "GET", f"/v1/jobs/{job_id}"))["state"] == state)
