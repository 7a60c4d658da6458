"""Many models behind one endpoint, end to end: real processes, real Redis, Celery and reference workers.

The stack serves two unlike tiny models (8 experts and 4, different
vocabularies and tokenizers) behind one router, as `make run` does; the tests
add a third through the admin API, delete it under load, move an alias
between the two under load, and restart the router.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tokenizers import Tokenizer
from typer.testing import CliRunner

from cli.localstack import Endpoints
from cli.main import app
from cli.supervisor import Supervisor
from tests.e2e.conftest import local_stack
from tests.support.models import TINY_MODEL_B_NAME, TINY_MODEL_NAME, transformers_greedy, transformers_model

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

A, B = TINY_MODEL_NAME, TINY_MODEL_B_NAME
PROMPT = "Shoal serves many models"
TOKENS = 12


def _greedy(model_path: Path) -> str:
    """What transformers' own greedy generation makes of PROMPT with this checkpoint and its tokenizer."""
    tokenizer = Tokenizer.from_file(str(model_path / "tokenizer.json"))
    prompt = tokenizer.encode(PROMPT, add_special_tokens=False).ids
    out = transformers_greedy(transformers_model(model_path), prompt, TOKENS)
    return str(tokenizer.decode(out, skip_special_tokens=True))


@pytest.fixture(scope="module")
def greedy(tiny_model: Path, tiny_model_b: Path) -> dict[str, str]:
    return {A: _greedy(tiny_model), B: _greedy(tiny_model_b)}


@pytest.fixture(scope="module")
def stack(tiny_model: Path, tiny_model_b: Path) -> Iterator[tuple[Endpoints, Supervisor]]:
    with local_stack(tiny_model, [("mixed", "reference")], more_models=[(B, tiny_model_b)]) as running:
        yield running


def _admin(endpoints: Endpoints) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=endpoints.controller, headers={"authorization": f"Bearer {endpoints.admin_token}"}, timeout=30
    )


async def _complete(http: httpx.AsyncClient, model: str, tokens: int = TOKENS) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    return await http.post("/v1/completions", json=body)


async def _listed(http: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    return {m["id"]: m for m in (await http.get("/v1/models")).json()["data"]}


async def _until(check: Any, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, f"not within {timeout_s:g}s"
        await asyncio.sleep(0.25)


def _metric(text: str, name: str) -> float:
    line = next((line for line in text.splitlines() if line.startswith(name + " ")), None)
    return float(line.split()[-1]) if line else 0.0


async def test_one_router_serves_both_models_as_their_own_greedy_runs(
    stack: tuple[Endpoints, Supervisor], greedy: dict[str, str]
) -> None:
    endpoints, _ = stack
    assert greedy[A] != greedy[B]
    async with httpx.AsyncClient(base_url=endpoints.router, headers=endpoints.api_headers, timeout=120) as http:
        listed = await _listed(http)
        assert {name: m["context_length"] for name, m in listed.items()} == {A: 4096, B: 4096}
        for model in (A, B):
            response = await _complete(http, model)
            assert response.status_code == 200, response.text
            assert response.json()["model"] == model
            assert response.json()["choices"][0]["text"] == greedy[model]
        missing = await _complete(http, "no-such-model")
        assert missing.status_code == 404
        assert missing.json()["error"]["param"] == "model" and "no-such-model" in missing.json()["error"]["message"]
        metrics = (await http.get("/metrics")).text
    for model in (A, B):
        assert _metric(metrics, f'shoal_router_requests_total{{endpoint="completion",model="{model}",status="200"}}')
        assert _metric(metrics, f'shoal_router_ttft_seconds_count{{model="{model}"}}')


async def test_a_model_added_is_served_from_zero_and_a_deleted_one_drains_losing_nothing(
    stack: tuple[Endpoints, Supervisor], tiny_model_b: Path
) -> None:
    endpoints, _ = stack
    name = "shoal-tiny-moe-c"
    async with (
        _admin(endpoints) as admin,
        httpx.AsyncClient(base_url=endpoints.router, headers=endpoints.api_headers, timeout=120) as http,
    ):
        created = await admin.post("/v1/models", json={"name": name, "path": str(tiny_model_b)})
        assert created.status_code == 201, created.text
        # A pool that may be empty: the first requests are refused (503) and bring up its first worker.
        pool = {
            "name": name,
            "model": name,
            "role": "mixed",
            "engine": "sim",
            "min_replicas": 0,
            "max_replicas": 1,
            "worker_env": {"SIM_SPEEDUP": "1.0"},
        }
        assert (await admin.post("/v1/pools", json=pool)).status_code == 201
        await _until(lambda: _has(http, name))
        refused = await _complete(http, name)
        assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["message"]

        async def served() -> bool:
            return (await _complete(http, name)).status_code == 200

        await _until(served, timeout_s=120)

        # Load, then the delete: every request sent before it answers whole; later ones are told 404.
        outcomes: list[tuple[bool, int, int]] = []
        deleted_at: list[float] = []

        async def client() -> None:
            for _ in range(200):
                sent_before = not deleted_at
                response = await _complete(http, name, tokens=30)
                tokens = response.json()["usage"]["completion_tokens"] if response.status_code == 200 else 0
                outcomes.append((sent_before, response.status_code, tokens))
                if response.status_code == 404:
                    return

        clients = [asyncio.create_task(client()) for _ in range(4)]
        await _until(lambda: _ready(len(outcomes) >= 4))
        deleting = await admin.delete(f"/v1/models/{name}")
        deleted_at.append(time.monotonic())
        assert deleting.status_code == 202 and deleting.json()["state"] == "deleting"
        await asyncio.wait_for(asyncio.gather(*clients), timeout=120)

        async def gone() -> bool:
            return (await admin.get(f"/v1/models/{name}")).status_code == 404

        await _until(gone, timeout_s=120)
        assert (await admin.get(f"/v1/pools/{name}")).status_code == 404
        assert not [w for w in (await admin.get("/v1/workers")).json() if w["model"] == name]
        assert name not in await _listed(http)
    assert {status for _, status, _ in outcomes} <= {200, 404}, outcomes
    assert all(status == 200 and tokens == 30 for before, status, tokens in outcomes if before), outcomes
    assert sum(1 for _, status, _ in outcomes if status == 200) >= 8


async def _has(http: httpx.AsyncClient, model: str) -> bool:
    return model in await _listed(http)


async def _ready(value: bool) -> bool:
    return value


async def test_an_alias_moved_under_load_loses_nothing_and_new_requests_get_the_new_model(
    stack: tuple[Endpoints, Supervisor], greedy: dict[str, str]
) -> None:
    endpoints, _ = stack
    async with (
        _admin(endpoints) as admin,
        httpx.AsyncClient(base_url=endpoints.router, headers=endpoints.api_headers, timeout=120) as http,
    ):
        assert (await admin.put("/v1/aliases/tiny", json={"model": A})).status_code == 200
        await _until(lambda: _has(http, "tiny"))
        assert (await _listed(http))["tiny"]["root"] == A
        answers: list[tuple[int, str, str]] = []
        moved_at: list[int] = []

        async def client() -> None:
            after_move = 0
            for _ in range(300):
                response = await _complete(http, "tiny")
                body = response.json()
                if response.status_code != 200:
                    answers.append((response.status_code, "", response.text))
                    return
                answers.append((200, body["model"], body["choices"][0]["text"]))
                after_move += body["model"] == B
                if after_move >= 3:
                    return

        clients = [asyncio.create_task(client()) for _ in range(2)]
        await _until(lambda: _ready(len(answers) >= 4))
        moved_at.append(len(answers))
        assert (await admin.put("/v1/aliases/tiny", json={"model": B})).status_code == 200
        await asyncio.wait_for(asyncio.gather(*clients), timeout=120)
        # Roll back: new requests go to the first model again.
        assert (await admin.put("/v1/aliases/tiny", json={"model": A})).status_code == 200

        async def rolled_back() -> bool:
            response = await _complete(http, "tiny")
            return response.status_code == 200 and response.json()["model"] == A

        await _until(rolled_back, timeout_s=30)
    assert all(status == 200 for status, _, _ in answers), answers
    assert all(text == greedy[model] for _, model, text in answers), answers  # each answer is its model's own
    assert [model for _, model, _ in answers[: moved_at[0]]] == [A] * moved_at[0]
    assert answers[-1][1] == B


async def test_the_cli_lists_the_models_and_moves_an_alias(stack: tuple[Endpoints, Supervisor]) -> None:
    endpoints, _ = stack
    env = {"SHOAL_CONTROLLER_URL": endpoints.controller, "SHOAL_ADMIN_TOKEN": endpoints.admin_token}
    runner = CliRunner()

    def shoal(*args: str) -> str:
        result = runner.invoke(app, list(args), env=env)
        assert result.exit_code == 0, result.output
        return result.output

    listing = await asyncio.to_thread(shoal, "model", "list")
    assert A in listing and B in listing and "serving" in listing
    await asyncio.to_thread(shoal, "alias", "set", "stable", B)
    assert "stable" in await asyncio.to_thread(shoal, "alias", "list")
    async with httpx.AsyncClient(base_url=endpoints.router, headers=endpoints.api_headers, timeout=120) as http:
        await _until(lambda: _has(http, "stable"))
        assert (await _listed(http))["stable"]["root"] == B
        await asyncio.to_thread(shoal, "alias", "delete", "stable")

        async def dropped() -> bool:
            return not await _has(http, "stable")

        await _until(dropped)
    unknown = await asyncio.to_thread(runner.invoke, app, ["alias", "set", "other", "no-such-model"], env=env)
    assert unknown.exit_code == 1 and "404" in unknown.output


async def test_a_restarted_router_serves_every_model(
    stack: tuple[Endpoints, Supervisor], greedy: dict[str, str]
) -> None:
    endpoints, supervisor = stack
    supervisor.restart("router", grace_s=5)
    async with httpx.AsyncClient(base_url=endpoints.router, headers=endpoints.api_headers, timeout=120) as http:
        for model in (A, B):
            response = await _complete(http, model)
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["text"] == greedy[model]
