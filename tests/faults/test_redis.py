"""Faults at Redis: restarted (from its append-only file) and wiped (FLUSHALL) while serving.

Redis holds cluster state, not requests: the router keeps serving from what
it knows while Redis is away, workers register again with their next
heartbeat, the controller rebuilds what it observes, and desired state
survives a restart (the append-only file) and a wipe (the controller writes
back the desired state it last read).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from cli.localstack import Endpoints, local_stack
from cli.supervisor import Supervisor
from tests.support.models import TINY_MODEL_NAME

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODEL = TINY_MODEL_NAME
CLIENTS = 4
PER_CLIENT = 6


def _metric(text: str, name: str) -> float:
    line = next((line for line in text.splitlines() if line.startswith(name + " ")), None)
    return float(line.split()[-1]) if line else 0.0


async def _load(endpoints: Endpoints, during: asyncio.Event) -> dict[int, str]:
    """CLIENTS clients each send PER_CLIENT greedy requests in turn; `during` is set after a third."""
    outputs: dict[int, str] = {}

    async def client(c: int) -> None:
        async with httpx.AsyncClient(base_url=endpoints.router, headers=endpoints.api_headers, timeout=120) as http:
            for r in range(PER_CLIENT):
                index = c * PER_CLIENT + r
                body = {"model": MODEL, "prompt": f"request {index}", "max_tokens": 24, "temperature": 0}
                response = await http.post("/v1/completions", json={**body, "ignore_eos": True})
                assert response.status_code == 200, response.text
                outputs[index] = response.json()["choices"][0]["text"]
                if len(outputs) >= CLIENTS * PER_CLIENT // 3:
                    during.set()

    await asyncio.gather(*(client(c) for c in range(CLIENTS)))
    return outputs


async def _admin(endpoints: Endpoints, path: str) -> Any:
    headers = {"authorization": f"Bearer {endpoints.admin_token}"}
    async with httpx.AsyncClient(base_url=endpoints.controller, headers=headers, timeout=30) as http:
        response = await http.get(path)
        assert response.status_code == 200, response.text
        return response.json()


async def _until_workers(endpoints: Endpoints, count: int, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    for _ in range(int(timeout_s / 0.25)):
        workers = await _admin(endpoints, "/v1/workers")
        if len(workers) == count:
            return list(workers)
        await asyncio.sleep(0.25)
    raise AssertionError(f"{count} workers never registered again")


@pytest.fixture
def stack(tiny_model: Path) -> Iterator[tuple[Endpoints, Supervisor]]:
    with local_stack(tiny_model, [("decode", "sim"), ("decode", "sim")]) as running:
        yield running


async def _under_fault(endpoints: Endpoints, inject: Any) -> dict[int, str]:
    calm = await _load(endpoints, asyncio.Event())
    fault = asyncio.Event()

    async def when_loaded() -> None:
        await fault.wait()
        await inject()

    injecting = asyncio.create_task(when_loaded())
    outputs = await _load(endpoints, fault)
    await injecting
    assert outputs == calm  # every request answered, each with its uninterrupted text
    return outputs


async def test_redis_restarted_under_load(stack: tuple[Endpoints, Supervisor]) -> None:
    endpoints, supervisor = stack
    pools = await _admin(endpoints, "/v1/pools")
    workers = {w["worker_id"] for w in await _until_workers(endpoints, 2)}

    async def restart() -> None:
        os.killpg(supervisor.pid("redis"), signal.SIGKILL)
        await asyncio.sleep(1.0)  # requests keep coming while it is down
        await asyncio.to_thread(supervisor.restart, "redis")

    await _under_fault(endpoints, restart)
    assert {w["worker_id"] for w in await _until_workers(endpoints, 2)} == workers  # the same two, back
    assert await _admin(endpoints, "/v1/pools") == pools  # desired state came back from the append-only file
    async with httpx.AsyncClient(base_url=endpoints.router, timeout=30) as http:
        metrics = (await http.get("/metrics")).text
    assert _metric(metrics, 'shoal_router_retries_total{kind="resume"}') == 0


async def test_redis_wiped_under_load(stack: tuple[Endpoints, Supervisor]) -> None:
    endpoints, _ = stack
    pools = await _admin(endpoints, "/v1/pools")
    workers = {w["worker_id"] for w in await _until_workers(endpoints, 2)}

    async def wipe() -> None:
        redis = Redis.from_url(endpoints.redis_url)
        await redis.flushall()
        await redis.aclose()

    await _under_fault(endpoints, wipe)
    assert {w["worker_id"] for w in await _until_workers(endpoints, 2)} == workers
    for _ in range(40):  # the controller notices the wipe at its next tick and writes its desired state back
        if await _admin(endpoints, "/v1/pools") == pools:
            break
        await asyncio.sleep(0.25)
    assert await _admin(endpoints, "/v1/pools") == pools
