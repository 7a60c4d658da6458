"""Drain-first scale-down jobs: no request lost, and a job survives its runners dying.

Real workers (sim engine), the real router, and for the restart test a real
Celery worker process killed with SIGKILL in the middle of a drain.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.controller.actuators.local import launch_doc
from shared.config import EngineKind
from shared.processes import ManagedProcess, spawn
from shared.rpc.security import Role
from shared.state.versioned import DocumentStore
from tests.support.pki import tls_dir
from tests.support.redis import service_url
from tests.support.services import ADMIN, RunningController, running_controller, running_router, running_worker

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "shoal-tiny-moe"
TOKENS = 40
# Slow the sim engine down so that a request is still running when the drain starts.
SLOW = {"engine": EngineKind.SIM, "sim_speedup": 0.05, "heartbeat_interval_s": 0.3, "lease_ttl_s": 2.0}


async def until(predicate: Callable[[], Awaitable[object]], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(0.1)
    return False


async def admin(front: RunningController, method: str, path: str, **kw: Any) -> Any:
    async with httpx.AsyncClient(base_url=front.url, headers=front.headers(ADMIN)) as http:
        response = await http.request(method, path, **kw)
        assert response.status_code < 300, response.text
        return response.json()


async def declare_pool(front: RunningController, model_path: Path) -> None:
    await admin(front, "POST", "/v1/models", json={"name": MODEL, "path": str(model_path)})
    pool = {"name": "default", "model": MODEL, "role": "mixed", "engine": "sim", "min_replicas": 0, "max_replicas": 0}
    await admin(front, "POST", "/v1/pools", json=pool)


async def stream_completion(url: str) -> tuple[int, int]:
    """(status, tokens streamed) of one streamed completion."""
    body = {"model": MODEL, "prompt": "drain me", "max_tokens": TOKENS, "ignore_eos": True, "stream": True}
    tokens = 0
    async with (
        httpx.AsyncClient(base_url=url, timeout=120) as http,
        http.stream("POST", "/v1/completions", json=body) as r,
    ):
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                tokens += sum(1 for c in json.loads(line[6:])["choices"] if c["text"])
        return r.status_code, tokens


async def job_state(front: RunningController, job_id: str) -> dict[str, Any]:
    result: dict[str, Any] = await admin(front, "GET", f"/v1/jobs/{job_id}")
    return result


async def test_a_drained_worker_finishes_every_running_request(redis_url: str, tiny_model: Path) -> None:
    async with (
        running_controller(redis_url) as front,
        running_router(redis_url, tiny_model) as router,
        running_worker(redis_url, model_path=tiny_model, worker_id="w-a", **SLOW) as a,
        running_worker(redis_url, model_path=tiny_model, worker_id="w-b", **SLOW) as b,
    ):
        await declare_pool(front, tiny_model)
        assert await until(lambda: router_sees(router.url, 2), 10)
        requests = [asyncio.create_task(stream_completion(router.url)) for _ in range(6)]
        assert await until(lambda: busy_worker(front), 20)
        drained = {"w-a": a, "w-b": b}[await busy_worker(front)]
        job = await admin(front, "DELETE", f"/v1/workers/{drained.settings.worker_id}")
        # Routers stop sending to it; what it runs, it finishes before the job moves on.
        assert await until(lambda: _phase_is(front, job["id"], "remove"), 60)
        assert drained.engine.load().running_requests == 0
        # The controller, not the job, stops it: its (local) actuator is asked to remove exactly that worker.
        assert await until(lambda: _removal_asked(front, drained.settings.worker_id), 10)
        results = await asyncio.gather(*requests)
        assert results == [(200, TOKENS)] * len(requests)
        late = await stream_completion(router.url)  # new traffic goes to the worker that stays
        assert late == (200, TOKENS)
        await drained.drain_and_stop()  # what SIGTERM does to a worker process
        assert await until(lambda: _state_is(front, job["id"], "succeeded"), 30)


async def router_sees(url: str, count: int) -> bool:
    async with httpx.AsyncClient(base_url=url) as http:
        return int((await http.get("/health")).json()["workers"]) >= count


async def busy_worker(front: RunningController) -> str:
    """The id of a worker running requests, or ''."""
    workers = await admin(front, "GET", "/v1/workers")
    return next((w["worker_id"] for w in workers if w["running_requests"] > 0), "")


def celery_worker(redis_url: str, name: str) -> ManagedProcess:
    env = {
        "SHOAL_REDIS_URL": service_url(redis_url, Role.CONTROLLER),
        "SHOAL_LOG_LEVEL": "WARNING",
        "SHOAL_CONTROLLER_JOB_LEASE_S": "2",
        "SHOAL_TLS_DIR": str(tls_dir(Role.CONTROLLER)),
    }
    return spawn(name, [sys.executable, "-m", "services.controller.jobs"], env=env)


async def test_a_job_survives_its_celery_worker_and_the_controller_being_killed(
    redis_url: str, tiny_model: Path
) -> None:
    first = celery_worker(redis_url, "celery-1")
    second: ManagedProcess | None = None
    try:
        async with running_worker(redis_url, model_path=tiny_model, worker_id="w-1", **SLOW) as worker:
            async with running_controller(redis_url, celery=True, job_lease_s=2.0) as front:
                await declare_pool(front, tiny_model)
                async with running_router(redis_url, tiny_model) as router:
                    request = asyncio.create_task(stream_completion(router.url))
                    assert await until(lambda: busy_worker(front), 20)
                    job = await admin(front, "DELETE", "/v1/workers/w-1")
                    assert await until(lambda: _phase_is(front, job["id"], "drain"), 60)
                    first.terminate(grace_s=0)  # SIGKILL mid-drain: the task is neither finished nor acknowledged
                    # ... and the controller goes down with it.
                    assert await request == (200, TOKENS)
            second = celery_worker(redis_url, "celery-2")
            async with running_controller(redis_url, celery=True, job_lease_s=2.0) as front:
                # The restarted controller sees the job's lease lapse and resubmits it; it resumes at its phase.
                assert await until(lambda: _phase_is(front, job["id"], "remove"), 60)
                await worker.drain_and_stop()
                assert await until(lambda: _state_is(front, job["id"], "succeeded"), 30)
                final = await job_state(front, job["id"])
                assert final["attempts"] == 2  # the killed run, and the one resubmission
    finally:
        for process in (first, second):
            if process is not None:
                process.terminate(grace_s=5)


async def _removal_asked(front: RunningController, worker_id: str) -> bool:
    launch = await DocumentStore(front.app.redis).get(launch_doc("default"))
    return launch is not None and launch.body["remove"] == [worker_id]


async def _phase_is(front: RunningController, job_id: str, phase: str) -> bool:
    return bool((await job_state(front, job_id))["phase"] == phase)


async def _state_is(front: RunningController, job_id: str, state: str) -> bool:
    return bool((await job_state(front, job_id))["state"] == state)
