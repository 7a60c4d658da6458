"""The OpenAI API's doors: keys made and revoked through the admin API, their limits, across routers.

Real routers (as deployed: SHOAL_ENV=prod), real sim workers over gRPC, a
real redis-server, the controller's admin API for the keys.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.config import EngineKind
from shared.config.base import Environment
from shared.errors import FailedPrecondition
from shared.types.apikeys import APIKeyCreate
from tests.support.models import TINY_MODEL_NAME
from tests.support.services import RunningController, RunningRouter, running_controller, running_router, running_worker

pytestmark = pytest.mark.integration

SIM = {"engine": EngineKind.SIM, "sim_speedup": 50.0}
STATIC = "sk-static-for-internal-callers"


@asynccontextmanager
async def routers(
    redis_url: str, model: Path, count: int = 1
) -> AsyncIterator[tuple[list[RunningRouter], RunningController]]:
    async with AsyncExitStack() as stack:
        controller = await stack.enter_async_context(running_controller(redis_url))
        await stack.enter_async_context(running_worker(redis_url, model_path=model, worker_id="w0", **SIM))
        fronts = [
            await stack.enter_async_context(running_router(redis_url, model, env=Environment.PROD, api_keys=[STATIC]))
            for _ in range(count)
        ]
        for front in fronts:
            for _ in range(200):
                if front.app.directory.serving():
                    break
                await asyncio.sleep(0.05)
        yield fronts, controller


async def make_key(controller: RunningController, **spec: Any) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=controller.url, headers=controller.headers()) as admin:
        response = await admin.post("/v1/keys", json={"name": "tester", **spec})
        assert response.status_code == 201, response.text
        return dict(response.json())


async def complete(front: RunningRouter, key: str | None, max_tokens: int = 2) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key is not None else {}
    body = {"model": TINY_MODEL_NAME, "prompt": "hello", "max_tokens": max_tokens}
    async with httpx.AsyncClient(base_url=front.url, timeout=30) as http:
        return await http.post("/v1/completions", json=body, headers=headers)


def assert_openai_error(response: httpx.Response, status: int, kind: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"]["type"] == kind


async def test_no_key_a_wrong_key_and_a_revoked_key_get_401(redis_url: str, tiny_model: Path) -> None:
    async with routers(redis_url, tiny_model) as ([front], controller):
        assert_openai_error(await complete(front, None), 401, "authentication_error")
        assert_openai_error(await complete(front, "sk-shoal-not-a-key"), 401, "authentication_error")
        async with httpx.AsyncClient(base_url=front.url) as http:
            assert (await http.get("/v1/models")).status_code == 401

        made = await make_key(controller)
        assert made["key"].startswith("sk-shoal-") and made["shown"] == made["key"][: len(made["shown"])]
        # A key made a moment ago works at once: the router reads the keys again when it meets an unknown one.
        assert (await complete(front, made["key"])).status_code == 200
        assert (await complete(front, STATIC)).status_code == 200

        async with httpx.AsyncClient(base_url=controller.url, headers=controller.headers()) as admin:
            listed = (await admin.get("/v1/keys")).json()
            assert [k["id"] for k in listed] == [made["id"]] and "key" not in listed[0] and "digest" not in listed[0]
            revoked = await admin.delete(f"/v1/keys/{made['id']}")
            assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
        for _ in range(100):  # refused within the router's refresh interval
            response = await complete(front, made["key"])
            if response.status_code == 401:
                break
            await asyncio.sleep(0.1)
        assert_openai_error(response, 401, "authentication_error")


async def test_a_key_made_just_after_the_routers_last_read_is_admitted(redis_url: str, tiny_model: Path) -> None:
    """The read an unknown key triggers starts after the request arrived, however recent the last one was."""
    async with routers(redis_url, tiny_model) as ([front], controller):
        for attempt in range(5):
            await front.app.keys.refresh()  # a read has just happened: a new key is not in it
            made = await controller.app.api_keys.create(APIKeyCreate(name=f"fresh-{attempt}"))
            assert (await front.app.keys.admit(f"Bearer {made.key}")).key_id == made.id


async def test_keys_are_stored_as_digests_never_as_secrets(redis_url: str, tiny_model: Path) -> None:
    async with routers(redis_url, tiny_model) as ([front], controller):
        made = await make_key(controller)
        stored = await front.app.redis.hgetall(f"shoal:v1:doc:apikey:{made['id']}")
        assert stored and made["key"].encode() not in b"".join(stored.values())


async def test_over_the_rate_limit_gets_429_across_routers(redis_url: str, tiny_model: Path) -> None:
    """Two requests per second, one second's burst: of five requests at once through two routers, two pass."""
    async with routers(redis_url, tiny_model, count=2) as (fronts, controller):
        made = await make_key(controller, requests_per_s=2)
        responses = await asyncio.gather(*(complete(fronts[i % 2], made["key"]) for i in range(5)))
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [200, 200, 429, 429, 429]
        refused = next(r for r in responses if r.status_code == 429)
        assert_openai_error(refused, 429, "rate_limit_error")
        assert int(refused.headers["retry-after"]) >= 1
        assert "2 requests per second" in refused.json()["error"]["message"]


async def test_over_the_token_quota_gets_429_saying_when_it_refills(redis_url: str, tiny_model: Path) -> None:
    """A request is admitted while the key has tokens left and charged what it used when it ends."""
    async with routers(redis_url, tiny_model) as ([front], controller):
        made = await make_key(controller, tokens_per_min=30)  # a minute's burst: 30 tokens, then one per 2 s
        first = await complete(front, made["key"], max_tokens=40)
        assert first.status_code == 200
        used = first.json()["usage"]["total_tokens"]
        assert used > 30  # admitted with tokens left, it used more than the whole burst
        refused = await complete(front, made["key"])
        assert_openai_error(refused, 429, "rate_limit_error")
        assert "30 tokens per minute" in refused.json()["error"]["message"]
        # The balance is about 30 - used: it is positive again after (used - 30 + 1) tokens at one per 2 s.
        assert int(refused.headers["retry-after"]) >= 2 * (used - 30)


async def test_usage_per_key_is_a_metric(redis_url: str, tiny_model: Path) -> None:
    async with routers(redis_url, tiny_model) as ([front], controller):
        made = await make_key(controller)
        response = await complete(front, made["key"], max_tokens=3)
        used = response.json()["usage"]["total_tokens"]
        async with httpx.AsyncClient(base_url=front.url) as http:
            text = (await http.get("/metrics")).text
        assert f'shoal_router_key_requests_total{{key="{made["id"]}",name="tester"}} 1.0' in text
        assert f'shoal_router_key_tokens_total{{key="{made["id"]}",name="tester"}} {float(used)}' in text


async def test_a_workers_own_api_needs_the_internal_token(redis_url: str, tiny_model: Path) -> None:
    with pytest.raises(FailedPrecondition, match="SHOAL_INTERNAL_TOKEN"):
        async with running_worker(redis_url, model_path=tiny_model, worker_id="open", http_port=0, **SIM):
            pass
    token = "worker-direct-token-for-tests"
    async with running_worker(
        redis_url, model_path=tiny_model, worker_id="direct", http_port=0, internal_token=token, **SIM
    ) as worker:
        body = {"model": TINY_MODEL_NAME, "prompt": "hello", "max_tokens": 2}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{worker.http_port}", timeout=30) as http:
            assert (await http.post("/v1/completions", json=body)).status_code == 401
            wrong = await http.post("/v1/completions", json=body, headers={"authorization": "Bearer nope"})
            assert wrong.status_code == 401
            right = await http.post("/v1/completions", json=body, headers={"authorization": f"Bearer {token}"})
            assert right.status_code == 200, right.text
