"""Several routers in front of the same workers: they share a port, sessions and P/D decisions."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import pytest

from services.worker.app import WorkerApp
from shared.config import EngineKind, WorkerRole
from shared.hashing import BlockHasher
from shared.processes import free_port
from tests.support.models import TINY_MODEL_NAME
from tests.support.services import RunningRouter, running_kvstore, running_router, running_worker

pytestmark = pytest.mark.integration

MODEL = TINY_MODEL_NAME
SIM = {"engine": EngineKind.SIM, "sim_speedup": 50.0}


async def _ready(routers: list[RunningRouter], workers: int) -> None:
    for _ in range(200):
        if all(len(r.app.directory.serving()) == workers for r in routers):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the routers did not see every worker")


async def _post(url: str, body: dict[str, object], **headers: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=60) as http:  # a new connection per request
        return await http.post(f"{url}/v1/completions", json=body, headers=headers)


async def test_routers_on_one_port_share_the_connections(redis_url: str, tiny_model: Path) -> None:
    port = free_port()
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(running_worker(redis_url, model_path=tiny_model, **SIM))
        routers = [
            await stack.enter_async_context(
                running_router(redis_url, tiny_model, http_port=port, reuse_port=True, host="127.0.0.1")
            )
            for _ in range(2)
        ]
        await _ready(routers, 1)
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 2}
        for _ in range(24):
            assert (await _post(f"http://127.0.0.1:{port}", body)).status_code == 200
        served = [r.app.metrics.edge.requests.labels(MODEL, "completion", "200").value for r in routers]
        assert sum(served) == 24
        assert min(served) > 0  # the kernel spread new connections over both processes


async def test_a_session_keeps_its_worker_whichever_router_takes_it(redis_url: str, tiny_model: Path) -> None:
    async with AsyncExitStack() as stack:
        workers: list[WorkerApp] = [
            await stack.enter_async_context(running_worker(redis_url, model_path=tiny_model, worker_id=f"w{i}", **SIM))
            for i in range(2)
        ]
        routers = [
            await stack.enter_async_context(running_router(redis_url, tiny_model, routing_preset="session-affinity"))
            for _ in range(2)
        ]
        await _ready(routers, 2)
        for turn in range(8):
            router = routers[turn % 2]  # alternate, as a load balancer in front of replicas would
            body = {"model": MODEL, "prompt": f"turn {turn}", "max_tokens": 2}
            response = await _post(router.url, body, **{"x-session-id": "agent-7"})
            assert response.status_code == 200
            await routers[0].app.sessions.flush()  # what the routers' 100 ms flush does
            await routers[1].app.sessions.flush()
        assert sorted(w.engine.load().requests_finished for w in workers) == [0, 8]


async def test_pd_decisions_agree_across_routers(redis_url: str, tiny_model: Path) -> None:
    prompt = "The quick brown fox jumps over the lazy dog. " * 6
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0}
    async with AsyncExitStack() as stack:
        store = await stack.enter_async_context(running_kvstore(redis_url))
        for role in (WorkerRole.PREFILL, WorkerRole.DECODE):
            await stack.enter_async_context(running_worker(redis_url, model_path=tiny_model, role=role, **SIM))
        options = {"kvstore_address": store.address, "pd_min_uncached_tokens": 64}
        first, second = [
            await stack.enter_async_context(running_router(redis_url, tiny_model, **options)) for _ in range(2)
        ]
        await _ready([first, second], 2)
        assert (await _post(first.url, body)).status_code == 200
        assert first.app.metrics.pd.labels("disaggregated").value == 1
        # The decode worker now holds the prompt: the other router learns it from the KV events and, as the first
        # router would, serves the repeat without a hand-off.
        for _ in range(100):
            served = second.app.model(MODEL)
            hashes = BlockHasher(MODEL, served.block_size).hashes(served.prompts.encode(prompt))
            if second.app.index.prefix_lengths(hashes, list(second.app.directory.records)).get(
                next(w for w, r in second.app.directory.records.items() if r.info.role is WorkerRole.DECODE), 0
            ):
                break
            await asyncio.sleep(0.05)
        assert (await _post(second.url, body)).status_code == 200
        assert second.app.metrics.pd.labels("disaggregated").value == 0
        assert (await _post(first.url, body)).status_code == 200
        assert first.app.metrics.pd.labels("disaggregated").value == 1


async def test_a_worker_full_with_another_routers_requests_is_busy_not_failed(redis_url: str, tiny_model: Path) -> None:
    # Router A fills the worker's one running slot and one queue place; router B cannot know yet and
    # sends a third request, which the worker refuses at once. That is backpressure (429, retry
    # shortly), not a fault: B must not set the worker aside as failed, and takes it again once it
    # has room (a failed worker stays out of B's decisions for seconds: "no worker is serving").
    one_slot = {"engine": EngineKind.SIM, "sim_speedup": 0.5, "max_running": 1, "max_waiting": 1}
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(running_worker(redis_url, model_path=tiny_model, **one_slot))
        a, b = [await stack.enter_async_context(running_router(redis_url, tiny_model)) for _ in range(2)]
        await _ready([a, b], 1)
        long = {"model": MODEL, "prompt": "x", "max_tokens": 40}
        short = {**long, "max_tokens": 2}
        running = asyncio.create_task(_post(a.url, long))
        await asyncio.sleep(0.1)
        queued = asyncio.create_task(_post(a.url, long))
        await asyncio.sleep(0.1)
        refused = await _post(b.url, short)
        assert refused.status_code == 429, refused.text
        assert refused.headers["retry-after"] == "1"
        assert [(await running).status_code, (await queued).status_code] == [200, 200]
        assert (await _post(b.url, short)).status_code == 200
