"""The admin API: roles, desired state, validation, workers, jobs (real Redis, real HTTP)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from shared.config import EngineKind, WorkerRole
from shared.types.workers import WorkerLoad
from tests.support.services import ADMIN, OPERATOR, VIEWER, RunningController, running_controller, running_worker
from tests.support.workers import worker_info

pytestmark = pytest.mark.integration

MODEL = {"name": "tiny", "path": "/models/tiny"}
POOL = {"name": "decode", "model": "tiny", "role": "decode", "engine": "sim", "min_replicas": 0, "max_replicas": 0}


async def call(front: RunningController, method: str, path: str, token: str = ADMIN, **kw: Any) -> httpx.Response:
    async with httpx.AsyncClient(base_url=front.url) as http:
        return await http.request(method, path, headers=front.headers(token), **kw)


async def test_tokens_and_roles(redis_url: str) -> None:
    async with running_controller(redis_url) as front:
        async with httpx.AsyncClient(base_url=front.url) as http:
            anonymous = await http.get("/v1/pools")
        assert anonymous.status_code == 401
        assert anonymous.json()["error"]["type"] == "authentication_error"
        assert (await call(front, "GET", "/v1/pools", token="wrong")).status_code == 401
        assert (await call(front, "GET", "/v1/pools", token=VIEWER)).status_code == 200
        refused = await call(front, "POST", "/v1/models", token=OPERATOR, json=MODEL)
        assert refused.status_code == 403 and "admin role" in refused.json()["error"]["message"]
        assert (await call(front, "POST", "/v1/scaling/pause", token=VIEWER)).status_code == 403
        assert (await call(front, "POST", "/v1/scaling/pause", token=OPERATOR)).json() == {"paused": True}
        for token, role in ((VIEWER, "viewer"), (OPERATOR, "operator"), (ADMIN, "admin")):
            assert (await call(front, "GET", "/v1/whoami", token=token)).json() == {"role": role}
        assert (await call(front, "GET", "/v1/whoami", token="wrong")).status_code == 401


async def test_the_console_is_served_under_a_strict_content_security_policy(redis_url: str) -> None:
    async with running_controller(redis_url) as front, httpx.AsyncClient(base_url=front.url) as http:
        page = await http.get("/ui", follow_redirects=True)
        assert page.status_code == 200 and '<script type="module" src="/ui/console.js">' in page.text
        policy = page.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy and "unsafe" not in policy
        script = await http.get("/ui/console.js")
        assert script.headers["content-type"].startswith("text/javascript") and ".innerHTML" not in script.text
        assert (await http.get("/ui/../routes.py")).status_code == 404
        assert "/ui/" not in (await http.get("/openapi.json")).text  # not an API operation


async def test_models_and_pools_crud_with_versions(redis_url: str) -> None:
    async with running_controller(redis_url) as front:
        assert (await call(front, "POST", "/v1/models", json=MODEL)).status_code == 201
        assert (await call(front, "POST", "/v1/models", json=MODEL)).status_code == 409
        created = await call(front, "POST", "/v1/pools", json=POOL)
        assert created.status_code == 201, created.text
        assert created.json()["version"] == 1
        patched = await call(front, "PATCH", "/v1/pools/decode", json={"max_replicas": 3, "slo": {"tbt_p90_s": 0.1}})
        assert patched.json()["max_replicas"] == 3 and patched.json()["slo"]["tbt_p90_s"] == 0.1
        assert patched.json()["version"] == 2
        scaled = await call(front, "POST", "/v1/pools/decode/scale", token=OPERATOR, json={"replicas": 2})
        assert scaled.json()["replicas_override"] == 2
        assert (await call(front, "DELETE", "/v1/pools/decode")).status_code == 204
        assert (await call(front, "GET", "/v1/pools/decode", token=VIEWER)).status_code == 404
        assert (await call(front, "DELETE", "/v1/models/tiny")).status_code == 204  # no pool: gone at once
        assert (await call(front, "GET", "/v1/models/tiny", token=VIEWER)).status_code == 404


async def test_aliases_and_deleting_a_served_model(redis_url: str) -> None:
    async with running_controller(redis_url) as front:
        assert (await call(front, "POST", "/v1/models", json=MODEL)).status_code == 201
        assert (await call(front, "POST", "/v1/pools", json=POOL)).status_code == 201
        alias = await call(front, "PUT", "/v1/aliases/stable", json={"model": "tiny"})
        assert alias.status_code == 200 and alias.json() == {"name": "stable", "model": "tiny", "version": 1}
        assert (await call(front, "GET", "/v1/aliases", token=VIEWER)).json() == [alias.json()]
        assert (await call(front, "PUT", "/v1/aliases/tiny", json={"model": "tiny"})).status_code == 409  # a model
        assert (await call(front, "PUT", "/v1/aliases/other", json={"model": "missing"})).status_code == 404
        assert (await call(front, "POST", "/v1/models", json={**MODEL, "name": "stable"})).status_code == 409
        pointed = await call(front, "DELETE", "/v1/models/tiny")
        assert pointed.status_code == 409 and "stable" in pointed.text  # move the alias first
        assert (await call(front, "DELETE", "/v1/aliases/stable")).status_code == 204
        # A registered worker keeps the pool, so the model stays `deleting` while it is asked about: a pool
        # with none is retired at the next tick, which a slow machine reaches between two calls.
        holder = worker_info("w-hold", "decode", "tiny", WorkerRole.DECODE)
        await front.app.registry.heartbeat(holder, WorkerLoad(), lease_ttl_s=60)
        deleting = await call(front, "DELETE", "/v1/models/tiny")
        assert deleting.status_code == 202 and deleting.json()["state"] == "deleting"
        assert (await call(front, "POST", "/v1/pools", json={**POOL, "name": "more"})).status_code == 409
        assert (await call(front, "PUT", "/v1/aliases/late", json={"model": "tiny"})).status_code == 409
        assert (await call(front, "GET", "/v1/models/tiny", token=VIEWER)).json()["state"] == "deleting"
        await front.app.registry.deregister("w-hold")
        # Its pool has no worker left to drain: the reconcile loop retires the pool, then the model.
        for _ in range(200):
            if (await call(front, "GET", "/v1/models/tiny", token=VIEWER)).status_code == 404:
                break
            await asyncio.sleep(0.05)
        assert (await call(front, "GET", "/v1/models/tiny", token=VIEWER)).status_code == 404
        assert (await call(front, "GET", "/v1/pools/decode", token=VIEWER)).status_code == 404


@pytest.mark.parametrize(
    ("path", "body", "fragment"),
    [
        ("/v1/pools", {**POOL, "name": "Bad_Name"}, "DNS label"),
        ("/v1/pools", {**POOL, "name": "b", "min_replicas": 5, "max_replicas": 2}, "exceeds max_replicas"),
        ("/v1/pools", {**POOL, "name": "b", "model": "missing"}, "no model named"),
        ("/v1/pools", {**POOL, "name": "b", "scaling": {"policy": "magic"}}, "unknown scaling policy"),
        ("/v1/pools", {**POOL, "name": "b", "scaling": {"policy": "fixed", "params": {}}}, "replicas"),
        ("/v1/pools", {**POOL, "name": "b", "role": "chef"}, "role"),
        ("/v1/pools", {**POOL, "name": "b", "extra": 1}, "extra"),
        ("/v1/pools", POOL, "exists"),
        ("/v1/pools/decode/scale", {"replicas": 99}, "outside the pool's bounds"),
    ],
    ids=["name", "bounds", "model", "policy", "params", "role", "extra", "duplicate", "override"],
)
async def test_bad_desired_state_gets_clear_4xx(redis_url: str, path: str, body: dict[str, Any], fragment: str) -> None:
    async with running_controller(redis_url) as front:
        await call(front, "POST", "/v1/models", json=MODEL)
        await call(front, "POST", "/v1/pools", json={**POOL, "max_replicas": 2})
        response = await call(front, "POST", path, json=body)
        assert 400 <= response.status_code < 500, response.text
        assert fragment in response.text


async def test_workers_are_listed_cordoned_and_removed_by_a_drain_first_job(redis_url: str, tiny_model: Any) -> None:
    async with running_controller(redis_url) as front:
        await call(front, "POST", "/v1/models", json={"name": "shoal-tiny-moe"})
        await call(front, "POST", "/v1/pools", json={**POOL, "model": "shoal-tiny-moe", "name": "default"})
        async with running_worker(redis_url, engine=EngineKind.SIM, model_path=tiny_model, worker_id="w-1"):
            listed = (await call(front, "GET", "/v1/workers", token=VIEWER)).json()
            assert [w["worker_id"] for w in listed] == ["w-1"]
            # Prometheus's HTTP service discovery: the worker's metrics endpoint with its pool and id.
            targets = (await call(front, "GET", "/v1/monitoring/targets", token=VIEWER)).json()
            assert len(targets) == 1 and targets[0]["labels"] == {
                "pool": "default",
                "worker": "w-1",
                "role": "mixed",
                "model": "shoal-tiny-moe",
            }
            async with httpx.AsyncClient() as http:
                metrics = (await http.get(f"http://{targets[0]['targets'][0]}/metrics")).text
            assert 'shoal_worker_slo_events_total{result="met",slo="ttft"}' in metrics
            assert (await call(front, "POST", "/v1/workers/w-1/cordon", token=OPERATOR)).json()["cordoned"]
            assert (await call(front, "GET", "/v1/workers", token=VIEWER)).json()[0]["cordoned"]
            assert (await call(front, "POST", "/v1/workers/w-1/uncordon", token=OPERATOR)).status_code == 200
            job = (await call(front, "DELETE", "/v1/workers/w-1", token=OPERATOR)).json()
            for _ in range(100):
                state = (await call(front, "GET", f"/v1/jobs/{job['id']}", token=VIEWER)).json()
                if state["phase"] == "remove":
                    break
                await asyncio.sleep(0.05)
            assert state["phase"] == "remove"  # drained; the (in-process) worker is ours to stop
        assert (await call(front, "DELETE", "/v1/workers/nobody", token=OPERATOR)).status_code == 404
        assert (await call(front, "POST", "/v1/jobs/nope/cancel", token=OPERATOR)).status_code == 404


async def test_invalid_graphs_are_refused_with_located_errors(redis_url: str) -> None:
    async with running_controller(redis_url) as front:
        await call(front, "POST", "/v1/models", json=MODEL)
        graph = {
            "sla": {"deadline_s": 10},
            "steps": [
                {"id": "a", "kind": "llm", "model": "tiny", "prompt": "{{steps.b}}"},
                {"id": "b", "kind": "tool", "tool": "calculator", "args": {"expression": "{{steps.a}}"}},
                {"id": "c", "kind": "retrieval", "retriever": "web", "query": "{{inputs.q}}"},
            ],
        }
        refused = await call(front, "POST", "/v1/graphs", token=OPERATOR, json=graph)
        assert refused.status_code == 400
        error = refused.json()["error"]
        assert error["param"] == "steps[2].query"
        assert "steps[2].retriever: unknown retriever 'web'; known: docs" in error["message"]
        assert "steps[0]: cycle: a -> b -> a" in error["message"]
        schema = await call(front, "POST", "/v1/graphs", token=OPERATOR, json={"steps": [], "sla": {"deadline_s": 1}})
        assert schema.status_code in (400, 422) and "steps" in schema.text
        no_pool = await call(
            front, "POST", "/v1/graphs", token=OPERATOR,
            json={"sla": {"deadline_s": 10}, "steps": [{"id": "a", "kind": "llm", "model": "tiny", "prompt": "hi"}]},
        )  # fmt: skip
        assert no_pool.status_code == 409 and "no pool serves model 'tiny'" in no_pool.json()["error"]["message"]
        viewer = await call(front, "POST", "/v1/graphs", token=VIEWER, json=graph)
        assert viewer.status_code == 403
        assert (await call(front, "GET", "/v1/graphs/nope", token=VIEWER)).status_code == 404


async def test_the_catalogue_reports_each_pools_queueing_from_schedulable_workers(redis_url: str) -> None:
    async with running_controller(redis_url) as front:
        assert (await call(front, "POST", "/v1/scaling/pause", token=OPERATOR)).json() == {"paused": True}
        assert (await call(front, "POST", "/v1/models", json=MODEL)).status_code == 201
        assert (await call(front, "POST", "/v1/pools", json=POOL)).status_code == 201

        async def report(worker_id: str, load: WorkerLoad) -> float:
            info = worker_info(worker_id, "decode", "tiny", WorkerRole.DECODE)
            await front.app.registry.heartbeat(info, load, lease_ttl_s=60)
            (entry,) = (await call(front, "GET", "/v1/catalogue", token=VIEWER)).json()
            return float(entry["wait_s"])

        assert await report("w1", WorkerLoad(waiting_requests=2, ttft_p90_s=1.5)) == 1.5
        assert await report("w2", WorkerLoad(waiting_requests=1, ttft_p90_s=0.8)) == 0.8
        # A draining worker takes no new step, so its empty queue offers nothing.
        assert await report("w3", WorkerLoad(draining=True)) == 0.8
        assert await report("w4", WorkerLoad(running_requests=5)) == 0.0
