"""Agent graphs end to end on the local stack: router, controller, its Celery worker, sim workers."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from cli.localstack import Endpoints, http_ready
from cli.main import app
from cli.supervisor import Supervisor
from shared.processes import free_port
from shared.rpc.kvstore_client import KVStoreClient
from shared.rpc.security import Role
from tests.e2e.conftest import local_stack
from tests.support.models import TINY_MODEL_NAME

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "graphs" / "research.yaml"
# A shared context long enough to fill several KV blocks.
CONTEXT = "The fleet serves mixtures of experts on pools of workers. " * 4
OTHER_CONTEXT = "A different agent reads a different document all day long. " * 4


@pytest.fixture(scope="module")
def running(tiny_model: Path) -> Iterator[tuple[Endpoints, Supervisor]]:
    # Session affinity without prefix scoring: only the session keeps an agent's steps together.
    with local_stack(
        tiny_model,
        [("decode", "sim"), ("decode", "sim")],
        {"SHOAL_WORKER_SIM_SPEEDUP": "4.0", "SHOAL_ROUTER_ROUTING_PRESET": "session-affinity"},
    ) as stack:
        yield stack


@pytest.fixture(scope="module")
def stack(running: tuple[Endpoints, Supervisor]) -> Endpoints:
    return running[0]


def second_router(running: tuple[Endpoints, Supervisor], model: Path, preset: str) -> str:
    """Another router on the same cluster (it finds the workers in Redis) with its own routing preset."""
    endpoints, supervisor = running
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "SHOAL_REDIS_URL": endpoints.redis_url,
        "SHOAL_INTERNAL_TOKEN": endpoints.internal_token,
        **endpoints.service_env(Role.ROUTER),
        "SHOAL_ROUTER_HTTP_PORT": str(port),
        "SHOAL_ROUTER_ROUTING_PRESET": preset,
        "SHOAL_LOG_LEVEL": "WARNING",
    }
    supervisor.start(
        f"router-{preset}", [sys.executable, "-m", "services.router"], env, ready=lambda: http_ready(f"{url}/health")
    )
    return url


async def admin(stack: Endpoints, method: str, path: str, **kw: Any) -> httpx.Response:
    headers = {"authorization": f"Bearer {stack.admin_token}"}
    async with httpx.AsyncClient(base_url=stack.controller, headers=headers, timeout=30) as http:
        return await http.request(method, path, **kw)


async def finished(stack: Endpoints, graph_id: str, timeout_s: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        record: dict[str, Any] = (await admin(stack, "GET", f"/v1/graphs/{graph_id}")).json()
        if record["state"] in ("succeeded", "failed", "cancelled"):
            return record
        await asyncio.sleep(0.2)
    raise TimeoutError(f"graph {graph_id} still running after {timeout_s}s")


async def submit(stack: Endpoints, spec: dict[str, Any]) -> dict[str, Any]:
    response = await admin(stack, "POST", "/v1/graphs", json=spec)
    assert response.status_code == 202, response.text
    return response.json()  # type: ignore[no-any-return]


async def test_a_graph_of_llm_tool_and_retrieval_steps_runs_end_to_end(stack: Endpoints) -> None:
    spec = yaml.safe_load(EXAMPLE.read_text())
    record = await finished(stack, (await submit(stack, spec))["id"])
    assert record["state"] == "succeeded", (record["error"], {k: v["error"] for k, v in record["steps"].items()})
    steps = record["steps"]
    assert steps["budget"]["output"] == "16.8"  # the calculator ran on the Celery worker
    assert "pool" in steps["find"]["output"].lower()  # passages of the docs about pools
    assert steps["draft"]["pool"] == "decode" and steps["draft"]["output"]
    # The answer read both the draft and the tool: it started after both finished.
    assert steps["answer"]["started_at"] >= max(steps["draft"]["finished_at"], steps["budget"]["finished_at"])
    assert record["result"] == steps["answer"]["output"]
    assert (await admin(stack, "GET", f"/v1/graphs/{record['id']}/result")).json()["result"] == record["result"]
    assert len(record["trace_id"]) == 32 and record["plan_solver"] == "milp"
    catalogue = (await admin(stack, "GET", "/v1/catalogue")).json()
    assert [h["pool"] for h in catalogue] == ["decode"]
    env = {"SHOAL_CONTROLLER_URL": stack.controller, "SHOAL_ADMIN_TOKEN": stack.admin_token, "COLUMNS": "200"}
    shown = await asyncio.to_thread(CliRunner().invoke, app, ["graph", "status", record["id"]], env=env)
    assert shown.exit_code == 0 and "budget" in shown.output and "succeeded" in shown.output
    listed = await asyncio.to_thread(CliRunner().invoke, app, ["catalogue"], env=env)
    assert listed.exit_code == 0 and "decode" in listed.output
    # The graph has a tool step: the router copied its LLM steps' prefixes to the kvstore, pinned.
    kvstore = KVStoreClient(stack.kvstore, stack.security(Role.WORKER), local=False)
    try:
        for _ in range(100):
            if (await kvstore.stats()).pinned_blocks > 0:
                break
            await asyncio.sleep(0.05)
        assert (await kvstore.stats()).pinned_blocks > 0
    finally:
        await kvstore.close()


async def test_a_failing_tool_is_retried_then_fails_the_graph(stack: Endpoints) -> None:
    spec = {
        "sla": {"deadline_s": 60},
        "steps": [
            {"id": "broken", "kind": "tool", "tool": "always-fails", "retries": 2, "args": {"message": "disk on fire"}},
            {"id": "after", "kind": "llm", "model": TINY_MODEL_NAME, "prompt": "{{steps.broken}}"},
        ],
    }
    record = await finished(stack, (await submit(stack, spec))["id"])
    assert record["state"] == "failed"
    assert record["steps"]["broken"]["attempts"] == 3
    assert "disk on fire" in record["steps"]["broken"]["error"]
    assert "step 'broken' failed after 3 attempt(s)" in record["error"]
    unfinished = await admin(stack, "GET", f"/v1/graphs/{record['id']}/result")
    assert unfinished.status_code == 409 and "is failed: step 'broken'" in unfinished.json()["error"]["message"]
    assert record["steps"]["after"]["state"] == "pending" and record["steps"]["after"]["started_at"] is None


async def test_a_cancelled_graph_stops(stack: Endpoints) -> None:
    spec = {
        "sla": {"deadline_s": 300},
        "steps": [
            {"id": "long", "kind": "llm", "model": TINY_MODEL_NAME, "prompt": "tell a long story", "max_tokens": 3000},
            {"id": "next", "kind": "tool", "tool": "word-count", "args": {"text": "{{steps.long}}"}},
        ],
    }
    graph_id = (await submit(stack, spec))["id"]
    for _ in range(200):
        if (await admin(stack, "GET", f"/v1/graphs/{graph_id}")).json()["steps"]["long"]["state"] == "running":
            break
        await asyncio.sleep(0.05)
    cancelled = await admin(stack, "POST", f"/v1/graphs/{graph_id}/cancel")
    assert cancelled.status_code == 200
    record = await finished(stack, graph_id, timeout_s=10)
    assert record["state"] == "cancelled"
    assert record["steps"]["long"]["state"] == "cancelled" and record["steps"]["next"]["started_at"] is None
    again = await admin(stack, "POST", f"/v1/graphs/{graph_id}/cancel")
    assert again.status_code == 409 and "already cancelled" in again.json()["error"]["message"]


def _cpu_s(celery: int) -> float:
    """CPU seconds used so far by the Celery worker, its finished children, and any tool process alive."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = sum(int(f) for f in Path(f"/proc/{celery}/stat").read_text().rsplit(")", 1)[1].split()[11:15])
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"agents.sandbox" in (proc / "cmdline").read_bytes():
                total += sum(int(f) for f in (proc / "stat").read_text().rsplit(")", 1)[1].split()[11:13])
        except OSError:
            continue  # it ended while we looked
    return total / ticks


async def _cpu_used(celery: int, window_s: float) -> float:
    before = _cpu_s(celery)
    await asyncio.sleep(window_s)
    return _cpu_s(celery) - before


@pytest.mark.parametrize("stop", ["timeout", "cancel"])
async def test_a_tool_that_is_given_up_on_stops_working(running: tuple[Endpoints, Supervisor], stop: str) -> None:
    stack, supervisor = running
    step = {"id": "busy", "kind": "tool", "tool": "spin", "args": {"seconds": "600"}, "retries": 0}
    spec = {"sla": {"deadline_s": 900}, "steps": [{**step, "timeout_s": 1 if stop == "timeout" else 600}]}
    graph_id = (await submit(stack, spec))["id"]
    celery = supervisor.pid("celery")
    for _ in range(200):
        if await _cpu_used(celery, 0.1) > 0.05:
            break  # the tool is computing
    if stop == "cancel":
        assert (await admin(stack, "POST", f"/v1/graphs/{graph_id}/cancel")).status_code == 200
    record = await finished(stack, graph_id, timeout_s=30)
    assert record["state"] == ("failed" if stop == "timeout" else "cancelled")
    if stop == "timeout":
        assert "timed out" in record["steps"]["busy"]["error"]
    await asyncio.sleep(1.0)  # the task sees the revoke within its poll
    # A thread left spinning would use a whole core: the stopped tool uses none.
    assert await _cpu_used(celery, 2.0) < 0.5


async def test_session_affinity_raises_prefix_cache_hits(
    running: tuple[Endpoints, Supervisor], tiny_model: Path
) -> None:
    # An agent's turns: each prompt is the context plus every earlier answer, so each turn's prompt
    # extends the last one's.
    stack = running[0]
    turns = 8
    steps = [
        {
            "id": f"turn{i}",
            "kind": "llm",
            "model": TINY_MODEL_NAME,
            "prompt": "{{inputs.context}}" + "".join(f" {{{{steps.turn{j}}}}}" for j in range(i)),
            "max_tokens": 48,
        }
        for i in range(turns)
    ]
    spec = {"sla": {"deadline_s": 120}, "inputs": {"context": CONTEXT}, "steps": steps}
    record = await finished(stack, (await submit(stack, spec))["id"])
    assert record["state"] == "succeeded", record["error"]
    with_session = [record["steps"][f"turn{i}"]["cached_tokens"] for i in range(1, turns)]
    # The same conversation, on a fresh context, through a router with no affinity at all
    # (round-robin): consecutive turns alternate between the two workers.
    baseline = second_router(running, tiny_model, "round-robin")
    without_session = []
    answers: list[str] = []
    async with httpx.AsyncClient(base_url=baseline, headers=stack.api_headers, timeout=30) as http:
        for i in range(turns):
            body = {"model": TINY_MODEL_NAME, "prompt": " ".join([OTHER_CONTEXT, *answers]), "max_tokens": 48}
            answer = (await http.post("/v1/completions", json=body)).json()
            answers.append(answer["choices"][0]["text"])
            if i:
                without_session.append(answer["usage"]["prompt_tokens_details"]["cached_tokens"])
    assert sum(with_session) > sum(without_session)
    # With the session every turn found at least the previous turn's prompt (less its last partial block).
    assert all(hits > 0 for hits in with_session)
