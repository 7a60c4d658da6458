"""Faults on the request path: each test injects one and asserts what it explains.

A stalled worker (SIGSTOP) is detected by its missing engine progress and its
stream resumes elsewhere with the same output; a worker that leaves the
registry mid-request finishes it; a client that goes away cancels its
request; a body over the limit is refused however it is framed.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from cli.localstack import Endpoints, local_stack
from cli.supervisor import Supervisor
from shared.config import EngineKind
from shared.rpc.security import Role
from shared.rpc.worker_client import WorkerClient
from tests.e2e.conftest import worker_pid
from tests.support.models import TINY_MODEL_NAME
from tests.support.services import running_router, running_worker

MODEL = TINY_MODEL_NAME
STALL_S = 2.0


def _metric(text: str, name: str) -> float:
    line = next((line for line in text.splitlines() if line.startswith(name + " ")), None)
    return float(line.split()[-1]) if line else 0.0


async def _streamed_text(
    endpoints: Endpoints, body: dict[str, object], on_piece: object = None
) -> tuple[str, str | None]:
    """Stream a completion; `on_piece(n)` (a coroutine function) runs after the n-th text chunk."""
    text, finish, pieces = "", None, 0
    async with (
        httpx.AsyncClient(base_url=endpoints.router, headers=endpoints.api_headers, timeout=120) as http,
        http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response,
    ):
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = httpx.Response(200, content=line[6:]).json()
            assert "error" not in event, event
            choice = event["choices"][0]
            text += choice["text"]
            finish = choice["finish_reason"] or finish
            pieces += 1
            if on_piece is not None:
                await on_piece(pieces)  # type: ignore[operator]
    return text, finish


@pytest.fixture
def slow_pair(tiny_model: Path) -> Iterator[tuple[Endpoints, Supervisor]]:
    env = {"SHOAL_WORKER_SIM_SPEEDUP": "1.0", "SHOAL_ROUTER_STALL_S": str(STALL_S)}
    with local_stack(tiny_model, [("decode", "sim"), ("decode", "sim")], env) as running:
        yield running


@pytest.mark.e2e
@pytest.mark.slow
async def test_a_stalled_worker_is_found_and_its_stream_resumes_elsewhere(
    slow_pair: tuple[Endpoints, Supervisor],
) -> None:
    endpoints, _ = slow_pair
    body = {"model": MODEL, "prompt": "a long story", "max_tokens": 60, "temperature": 0, "ignore_eos": True}
    stopped: list[int] = []

    async def stop_the_busy_worker(pieces: int) -> None:
        if pieces != 5:
            return
        for worker_id, address in endpoints.workers.items():
            client = WorkerClient(address, endpoints.security(Role.CONTROLLER))
            busy = (await client.get_load()).running_requests
            await client.close()
            if busy:
                pid = worker_pid(worker_id)
                os.kill(pid, signal.SIGSTOP)  # alive but silent: no crash, no closed connection
                stopped.append(pid)
                return

    try:
        resumed, finish = await _streamed_text(endpoints, body, stop_the_busy_worker)
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    assert len(stopped) == 1
    assert finish == "length"
    uninterrupted, _ = await _streamed_text(endpoints, body)
    assert resumed == uninterrupted  # greedy: the other worker continued exactly where the first stopped
    async with httpx.AsyncClient() as http:
        metrics = (await http.get(f"{endpoints.router}/metrics")).text
    assert _metric(metrics, "shoal_router_worker_stalls_total") == 1
    assert _metric(metrics, 'shoal_router_retries_total{kind="resume"}') == 1


SLOW = {"engine": EngineKind.SIM, "sim_speedup": 1.0}


async def _until(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    for _ in range(int(timeout_s / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the condition never held")


@pytest.mark.integration
async def test_a_worker_leaving_the_registry_mid_request_still_answers(redis_url: str, tiny_model: Path) -> None:
    async with (
        running_worker(redis_url, model_path=tiny_model, worker_id="leaving", **SLOW) as worker,
        running_router(redis_url, tiny_model) as front,
    ):
        await front.app.directory.refresh()
        body = {"model": MODEL, "prompt": "x", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
        async with httpx.AsyncClient(base_url=front.url, timeout=60) as http:
            request = asyncio.create_task(http.post("/v1/completions", json=body))
            await _until(lambda: worker.engine.load().running_requests > 0)
            assert worker.heartbeat is not None
            await worker.heartbeat.stop(deregister=True)  # its lease is gone while it computes
            await front.app.directory.refresh()
            assert "leaving" not in front.app.directory.records
            response = await request
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 40
        assert front.app.dispatcher.requests == 0
        assert front.app.worker_inflight.total == 0


@pytest.mark.integration
async def test_a_client_gone_before_a_whole_response_cancels_it(redis_url: str, tiny_model: Path) -> None:
    async with (
        running_worker(redis_url, model_path=tiny_model, **SLOW) as worker,
        running_router(redis_url, tiny_model) as front,
    ):
        await front.app.directory.refresh()
        body = {"model": MODEL, "prompt": "x", "max_tokens": 3000, "ignore_eos": True}
        async with httpx.AsyncClient(base_url=front.url, timeout=60) as http:
            request = asyncio.create_task(http.post("/v1/completions", json=body))
            await _until(lambda: worker.engine.load().running_requests > 0)
            request.cancel()  # the client hangs up before any byte of the answer
        for _ in range(200):
            if worker.engine.load().running_requests == 0 and front.app.dispatcher.requests == 0:
                break
            await asyncio.sleep(0.05)
        assert worker.engine.load().running_requests == 0
        assert front.app.dispatcher.requests == 0
        metrics = (await _get(front.url, "/metrics")).text
        cancelled = f'shoal_router_requests_total{{endpoint="completion",model="{MODEL}",status="499"}}'
        assert _metric(metrics, cancelled) == 1


async def _get(base: str, path: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        return await http.get(path)


@pytest.mark.integration
async def test_a_chunked_body_over_the_limit_is_refused(redis_url: str, tiny_model: Path) -> None:
    async with running_router(redis_url, tiny_model) as front:
        host, port = front.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n")
        chunk = b"x" * 2**20
        status = b""
        for _ in range(20):  # 20 MiB against a 16 MiB limit, and no length announced
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await writer.drain()
        status = await reader.readline()
        writer.close()
        assert status.split()[1] == b"413", status
