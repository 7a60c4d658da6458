"""Elastic scaling end to end: real worker processes, the local actuator, the router, load."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.services import OPERATOR, RunningController, running_controller, running_router

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "shoal-tiny-moe"


async def ready_workers(front: RunningController, pool: str) -> int:
    async with httpx.AsyncClient(base_url=front.url) as http:
        workers = (await http.get("/v1/workers", params={"pool": pool}, headers=front.headers())).json()
    return sum(1 for w in workers if not (w["cordoned"] or w["draining"]))


async def setup_pool(front: RunningController, model_path: Path, **pool: Any) -> None:
    spec = {
        "name": "decode",
        "model": MODEL,
        "role": "decode",
        "engine": "sim",
        "min_replicas": 1,
        "max_replicas": 4,
        "capacity": {"decode_tokens_per_s": 60, "prefill_tokens_per_s": 100000},
        "scaling": {
            "policy": "predictive",
            "params": {"down_delay_s": 4, "down_cooldown_s": 2, "peak_window_s": 4, "window_s": 15},
        },
        "worker_env": {"SIM_SPEEDUP": "1", "HEARTBEAT_INTERVAL_S": "0.3", "LEASE_TTL_S": "2"},
        **pool,
    }
    async with httpx.AsyncClient(base_url=front.url, headers=front.headers()) as http:
        assert (await http.post("/v1/models", json={"name": MODEL, "path": str(model_path)})).status_code == 201
        response = await http.post("/v1/pools", json=spec)
        assert response.status_code == 201, response.text


async def wait_for(predicate: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(0.25)
    return False


async def test_a_load_step_grows_the_pool_and_its_end_shrinks_it_without_failures(
    redis_url: str, tiny_model: Path
) -> None:
    async with running_controller(redis_url) as front, running_router(redis_url, tiny_model) as router:
        await setup_pool(front, tiny_model)
        assert await wait_for(lambda: _at_least(front, 1), 60)
        # The router discovers workers on its own clock: load before it sees one would be refused.
        assert await wait_for(lambda: _router_sees_workers(router.url), 10)
        statuses: list[int] = []
        stop = asyncio.Event()

        async def client() -> None:
            async with httpx.AsyncClient(base_url=router.url, timeout=120) as http:
                while not stop.is_set():
                    body = {"model": MODEL, "prompt": "load", "max_tokens": 24, "ignore_eos": True}
                    statuses.append((await http.post("/v1/completions", json=body)).status_code)

        clients = [asyncio.create_task(client()) for _ in range(12)]
        grew = await wait_for(lambda: _at_least(front, 3), 45)
        stop.set()
        await asyncio.gather(*clients)
        assert grew, "the decode pool did not grow under load"
        shrank = await wait_for(lambda: _at_most(front, 1), 90)
        assert shrank, "the decode pool did not shrink after the load"
        assert statuses and set(statuses) == {200}, f"failed requests: {[s for s in statuses if s != 200]}"
        async with httpx.AsyncClient(base_url=front.url, headers=front.headers(OPERATOR)) as http:
            decisions = (await http.get("/v1/scaling/decisions")).json()
        reasons = {d["reason"] for d in decisions}
        assert "scale-up-forecast" in reasons or "scale-up-slo" in reasons
        assert {"scale-down-demand", "scale-down-idle"} & reasons


async def _router_sees_workers(url: str) -> bool:
    async with httpx.AsyncClient(base_url=url) as http:
        return bool((await http.get("/health")).json()["workers"])


async def _at_least(front: RunningController, count: int) -> bool:
    return await ready_workers(front, "decode") >= count


async def _at_most(front: RunningController, count: int) -> bool:
    return await ready_workers(front, "decode") <= count


async def test_the_local_actuator_never_runs_more_processes_than_the_host_allows(
    redis_url: str, tiny_model: Path
) -> None:
    async with running_controller(redis_url, local_max_workers=2) as front:
        await setup_pool(front, tiny_model, min_replicas=5, max_replicas=5)
        assert await wait_for(lambda: _at_least(front, 2), 60)
        await asyncio.sleep(2)  # several launcher ticks later, still only what fits
        assert await ready_workers(front, "decode") == 2
        assert front.app.launcher is not None and front.app.launcher.processes == 2
