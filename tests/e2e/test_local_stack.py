"""End to end through real processes: redis, kvstore, reference workers, router."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import AsyncOpenAI
from tokenizers import Tokenizer

from cli.localstack import Endpoints
from cli.supervisor import Supervisor
from shared.rpc.security import Role
from shared.rpc.shoal.v1 import common_pb2, worker_pb2
from shared.rpc.worker_client import WorkerClient
from tests.e2e.conftest import local_stack, worker_pid
from tests.support.models import TINY_MODEL_NAME

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODEL = TINY_MODEL_NAME


@pytest.fixture(scope="module")
def pd_stack(tiny_model: Path) -> Iterator[Endpoints]:
    with local_stack(tiny_model, [("prefill", "reference"), ("decode", "reference")]) as (endpoints, _):
        yield endpoints


async def test_streaming_chat_through_processes(pd_stack: Endpoints) -> None:
    oai = AsyncOpenAI(base_url=f"{pd_stack.router}/v1", api_key=pd_stack.api_key, max_retries=0)
    stream = await oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi there"}], max_tokens=12, stream=True, temperature=0
    )
    chunks = [c async for c in stream]
    assert chunks[-1].choices[0].finish_reason == "length"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    whole = await oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi there"}], max_tokens=12, temperature=0
    )
    assert whole.choices[0].message.content == text


async def test_pd_output_equals_colocated_through_processes(pd_stack: Endpoints, tiny_model: Path) -> None:
    prompt = [16 + (i * 7) % 200 for i in range(400)]  # 400 tokens: past the P/D threshold
    async with httpx.AsyncClient(base_url=pd_stack.router, headers=pd_stack.api_headers, timeout=120) as http:
        response = await http.post(
            "/v1/completions",
            json={"model": MODEL, "prompt": prompt, "max_tokens": 20, "temperature": 0, "ignore_eos": True},
        )
        metrics = (await http.get("/metrics")).text
    assert response.status_code == 200
    assert 'shoal_router_pd_total{outcome="disaggregated"} 1.0' in metrics
    decode = WorkerClient(
        next(a for w, a in pd_stack.workers.items() if w.startswith("decode-")), pd_stack.security(Role.CONTROLLER)
    )
    colocated = [
        t
        async for r in decode.generate(
            worker_pb2.GenerateRequest(
                request_id="reference",
                model=MODEL,
                prompt_token_ids=prompt,
                sampling=common_pb2.SamplingParams(max_tokens=20, ignore_eos=True),
            ),
            timeout_s=120,
        )
        for t in r.token_ids
    ]
    await decode.close()
    assert len(colocated) == 20
    expected = Tokenizer.from_file(str(tiny_model / "tokenizer.json")).decode(colocated, skip_special_tokens=True)
    assert response.json()["choices"][0]["text"] == expected


@pytest.fixture
def sim_stack(tiny_model: Path) -> Iterator[tuple[Endpoints, Supervisor]]:
    with local_stack(
        tiny_model, [("decode", "sim"), ("decode", "sim")], {"SHOAL_WORKER_SIM_SPEEDUP": "1.0"}
    ) as running:
        yield running


async def test_a_killed_worker_process_is_resumed_mid_stream(sim_stack: tuple[Endpoints, Supervisor]) -> None:
    endpoints, _ = sim_stack
    oai = AsyncOpenAI(base_url=f"{endpoints.router}/v1", api_key=endpoints.api_key, max_retries=0)
    stream = await oai.completions.create(model=MODEL, prompt="a long story", max_tokens=80, stream=True)
    pieces = 0
    finish = None
    async for chunk in stream:
        pieces += 1
        if chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
        if pieces == 5:
            for worker_id, address in endpoints.workers.items():
                client = WorkerClient(address, endpoints.security(Role.CONTROLLER))
                busy = (await client.get_load()).running_requests
                await client.close()
                if busy:
                    os.killpg(worker_pid(worker_id), signal.SIGKILL)
                    break
    assert finish == "length"
    async with httpx.AsyncClient() as http:
        metrics = (await http.get(f"{endpoints.router}/metrics")).text
    assert 'shoal_router_retries_total{kind="resume"} 1.0' in metrics


async def test_a_disconnecting_client_aborts_on_the_worker(sim_stack: tuple[Endpoints, Supervisor]) -> None:
    endpoints, _ = sim_stack
    async with (
        httpx.AsyncClient(base_url=endpoints.router, headers=endpoints.api_headers, timeout=30) as http,
        http.stream(
            "POST", "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 3000, "stream": True}
        ) as response,
    ):
        async for _ in response.aiter_lines():
            break
    running = 1
    for _ in range(100):
        loads = []
        for address in endpoints.workers.values():
            client = WorkerClient(address, endpoints.security(Role.CONTROLLER))
            loads.append((await client.get_load()).running_requests)
            await client.close()
        running = sum(loads)
        if running == 0:
            break
        await asyncio.sleep(0.1)
    assert running == 0
