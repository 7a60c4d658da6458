"""The router's OpenAI API through real HTTP, real gRPC workers and real Redis."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI

from services.worker.app import WorkerApp
from shared.config import EngineKind, WorkerRole
from tests.support.engines import collect, prompts, reference_engine, request
from tests.support.models import TINY_MODEL_NAME
from tests.support.services import RunningRouter, running_kvstore, running_router, running_worker

pytestmark = pytest.mark.integration

MODEL = TINY_MODEL_NAME
SIM = {"engine": EngineKind.SIM, "sim_speedup": 20.0}


@asynccontextmanager
async def stack(
    redis_url: str, model: Path, workers: list[dict[str, Any]], **router: Any
) -> AsyncIterator[tuple[RunningRouter, list[WorkerApp]]]:
    async with AsyncExitStack() as exit_stack:
        apps = [
            await exit_stack.enter_async_context(running_worker(redis_url, model_path=model, worker_id=f"w{i}", **spec))
            for i, spec in enumerate(workers)
        ]
        front = await exit_stack.enter_async_context(running_router(redis_url, model, **router))
        for _ in range(100):
            if len(front.app.directory.serving()) == len(apps):
                break
            await asyncio.sleep(0.05)
        yield front, apps


def client(front: RunningRouter, key: str = "unused") -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{front.url}/v1", api_key=key, max_retries=0)


async def test_chat_and_completions_streaming_and_not(redis_url: str, tiny_model: Path) -> None:
    async with stack(redis_url, tiny_model, [SIM]) as (front, _apps):
        oai = client(front)
        chat = await oai.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=7, temperature=0
        )
        assert chat.choices[0].finish_reason == "length"
        assert chat.usage is not None and chat.usage.completion_tokens == 7
        assert chat.choices[0].message.content

        stream = await oai.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        assert chunks[0].choices[0].delta.role == "assistant"
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == chat.choices[0].message.content[: len(streamed)]  # greedy: same start

        text = await oai.completions.create(model=MODEL, prompt="once upon", max_tokens=4, temperature=0)
        assert text.choices[0].finish_reason == "length" and text.usage and text.usage.completion_tokens == 4
        ids = await oai.completions.create(model=MODEL, prompt=[20, 30, 40], max_tokens=3, stream=True)
        assert [c.choices[0].finish_reason async for c in ids][-1] == "length"

        models = await oai.models.list()
        assert [m.id for m in models.data] == [MODEL]


async def test_chat_template_matches_transformers(redis_url: str, tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    async with stack(redis_url, tiny_model, [SIM]) as (front, _apps):
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "héllo"}]
        expected = AutoTokenizer.from_pretrained(tiny_model).apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        assert front.app.model(MODEL).prompts.chat(messages) == list(expected)


USER_X = [{"role": "user", "content": "x"}]


async def _post(front: RunningRouter, path: str, body: Any, **headers: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=front.url, timeout=30) as http:
        return await http.post(path, json=body, headers=headers)


async def test_logit_shaping_reaches_the_engine(redis_url: str, tiny_model: Path) -> None:
    """Each shaping parameter, sent with the official client, gives what the engine gives for it alone."""
    prompt = prompts(1, [12], seed=21)[0]
    shaping: list[dict[str, Any]] = [
        {},
        {"logit_bias": {"7": 5.0, "120": -100.0}},
        {"frequency_penalty": 1.5},
        {"presence_penalty": -2.0},
        {"repetition_penalty": 1.8},
        {"min_tokens": 20, "ignore_eos": False},
    ]
    engine = reference_engine(tiny_model)
    await engine.start()
    try:
        expected = []
        for i, fields in enumerate(shaping):
            sampling = {**fields, "logit_bias": tuple((int(t), b) for t, b in fields.get("logit_bias", {}).items())}
            expected.append((await collect(engine, request(f"x{i}", prompt, max_tokens=20, **sampling))).text)
    finally:
        await engine.stop()
    assert len(set(expected[:5])) == 5  # each parameter changes this output, so each is seen to arrive
    async with stack(redis_url, tiny_model, [{}]) as (front, _apps):
        oai = client(front)
        for fields, text in zip(shaping, expected, strict=True):
            standard = {k: v for k, v in fields.items() if k in ("logit_bias", "frequency_penalty", "presence_penalty")}
            extra = {"ignore_eos": True, **{k: v for k, v in fields.items() if k not in standard}}
            got = await oai.completions.create(
                model=MODEL, prompt=prompt, max_tokens=20, temperature=0, **standard, extra_body=extra
            )
            assert got.choices[0].text == text, fields


async def test_logprobs_come_back_in_openai_shape(redis_url: str, tiny_model: Path) -> None:
    """Chat (whole and streamed) and completions logprobs, read with the official client, hold the
    engine's tokens and log-probabilities, each token's exact bytes, and the alternatives asked for."""
    prompt = prompts(1, [10], seed=22)[0]
    engine = reference_engine(tiny_model)
    await engine.start()
    try:
        expected = []
        async for output in engine.generate(request("lp", prompt, max_tokens=12, logprobs=3)):
            expected.extend(output.logprobs)
    finally:
        await engine.stop()
    async with stack(redis_url, tiny_model, [{}]) as (front, _apps):
        pieces = front.app.model(MODEL).prompts.pieces
        oai = client(front)
        text = await oai.completions.create(
            model=MODEL, prompt=prompt, max_tokens=12, temperature=0, logprobs=3, extra_body={"ignore_eos": True}
        )
        got = text.choices[0].logprobs
        assert got is not None and got.tokens is not None and got.token_logprobs is not None
        assert got.tokens == [pieces.piece(entry.token_id)[0] for entry in expected]
        assert got.token_logprobs == pytest.approx([entry.logprob for entry in expected], abs=1e-6)
        assert got.text_offset == [sum(len(t) for t in got.tokens[:i]) for i in range(len(got.tokens))]
        assert got.top_logprobs is not None and all(len(top) <= 3 for top in got.top_logprobs)

        messages: Any = [{"role": "user", "content": "hello"}]
        whole = await oai.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=9, temperature=0, logprobs=True, top_logprobs=2
        )
        content = whole.choices[0].logprobs.content  # type: ignore[union-attr]
        assert content is not None and len(content) == 9
        assert all(len(item.top_logprobs) == 2 for item in content)
        assert all(item.top_logprobs[0].logprob >= item.logprob - 1e-6 for item in content)  # greedy: the best
        stream = await oai.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=9, temperature=0, logprobs=True, top_logprobs=2, stream=True
        )
        streamed = [
            item
            async for chunk in stream
            if chunk.choices and chunk.choices[0].logprobs
            for item in chunk.choices[0].logprobs.content or []
        ]
        assert [(i.token, i.bytes) for i in streamed] == [(i.token, i.bytes) for i in content]
        assert [i.logprob for i in streamed] == pytest.approx([i.logprob for i in content], abs=1e-6)
        plain = await oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=3)
        assert plain.choices[0].logprobs is None


async def test_response_format_gives_json_that_matches_the_schema(redis_url: str, tiny_model: Path) -> None:
    import jsonschema

    schema = {
        "type": "object",
        "properties": {"answer": {"enum": ["yes", "no"]}, "sure": {"type": "boolean"}},
        "required": ["answer", "sure"],
    }
    messages: Any = [{"role": "user", "content": "is it?"}]
    verdict: Any = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema}}
    async with stack(redis_url, tiny_model, [{}]) as (front, _apps):
        oai = client(front)
        answered = await oai.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=60, response_format=verdict
        )
        assert answered.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(answered.choices[0].message.content or ""), schema)
        stream = await oai.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=60,
            temperature=0,
            stream=True,
            response_format=verdict,
        )
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        jsonschema.validate(json.loads(streamed), schema)
        unparsable = await _post(
            front,
            "/v1/chat/completions",
            {"model": MODEL, "messages": messages, "response_format": {"type": "json_schema", "json_schema": {
                "name": "bad", "schema": {"type": "nonsense"}}}},
        )  # fmt: skip
        assert unparsable.status_code == 400
        assert unparsable.json()["error"]["param"] == "response_format"
        assert "cannot be compiled" in unparsable.json()["error"]["message"]


async def test_n_choices_share_the_prompt_and_repeat_with_a_seed(redis_url: str, tiny_model: Path) -> None:
    prompt = [20 + (i * 37) % 200 for i in range(40)]  # byte tokens, within the tokenizer's vocabulary
    sampled: Any = {"model": MODEL, "prompt": prompt, "max_tokens": 10, "temperature": 1.0, "seed": 7}
    sampled["extra_body"] = {"ignore_eos": True}
    async with stack(redis_url, tiny_model, [{}]) as (front, apps):
        oai = client(front)
        three = await oai.completions.create(**sampled, n=3)
        # Two 16-token blocks of the prompt, computed once, reused by the two other choices.
        assert apps[0].engine.load().cached_tokens_total == 2 * 32
        again = await oai.completions.create(**sampled, n=3)
        one = await oai.completions.create(**sampled)
        stream = await oai.completions.create(**sampled, n=3, stream=True, stream_options={"include_usage": True})
        streamed: dict[int, str] = {0: "", 1: "", 2: ""}
        finishes: dict[int, str] = {}
        usage = None
        async for chunk in stream:
            usage = chunk.usage or usage
            for choice in chunk.choices:
                streamed[choice.index] += choice.text
                if choice.finish_reason:
                    finishes[choice.index] = choice.finish_reason
    texts = [choice.text for choice in sorted(three.choices, key=lambda c: c.index)]
    assert [choice.index for choice in sorted(three.choices, key=lambda c: c.index)] == [0, 1, 2]
    assert len(set(texts)) == 3  # each choice has a seed of its own
    assert texts == [choice.text for choice in sorted(again.choices, key=lambda c: c.index)]
    assert one.choices[0].text == texts[0]  # the first choice is the request's own
    assert [streamed[i] for i in range(3)] == texts and finishes == {0: "length", 1: "length", 2: "length"}
    assert three.usage is not None and usage is not None
    assert (three.usage.prompt_tokens, three.usage.completion_tokens) == (40, 30)
    assert (usage.prompt_tokens, usage.completion_tokens) == (40, 30)


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "does not exist"),
        ({"model": MODEL, "messages": []}, 400, "messages"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": 5}, 400, "temperature"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 17}, 400, "n"),
        ({"model": MODEL, "messages": USER_X, "top_logprobs": 3}, 400, "top_logprobs needs logprobs"),
        ({"model": MODEL, "messages": USER_X, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
        ({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 5000}, 400, "context length"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x" * 5000}]}, 400, "context length"),
        ({"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
        ({"model": MODEL, "messages": USER_X, "response_format": {"type": "json_schema"}}, 400, "json_schema is"),
        # Not implemented, so refused rather than ignored.
        ({"model": MODEL, "messages": USER_X, "suffix": "x", "top_k": 5}, 400, "suffix, top_k are not"),
        ({"model": MODEL, "messages": USER_X, "typical_p": 0.9}, 400, "typical_p is not"),
        ({"model": MODEL, "messages": USER_X, "logit_bias": {"a7": 1}}, 400, "token ids"),
        ({"model": MODEL, "messages": USER_X, "logit_bias": {"7": 101}}, 400, "logit_bias"),
        ({"model": MODEL, "messages": USER_X, "logit_bias": {"99999999": 1}}, 400, "token id 99999999"),
        ({"model": MODEL, "messages": USER_X, "presence_penalty": 2.5}, 400, "presence_penalty"),
        ({"model": MODEL, "messages": USER_X, "repetition_penalty": 0}, 400, "repetition_penalty"),
        ({"model": MODEL, "messages": USER_X, "max_tokens": 4, "min_tokens": 5}, 400, "min_tokens (5) exceeds"),
    ],
    ids=[
        "model",
        "empty",
        "temperature",
        "n",
        "top-logprobs-alone",
        "top-logprobs-many",
        "role",
        "max-tokens",
        "long-prompt",
        "no-model",
        "response-format-no-schema",
        "unimplemented",
        "unknown",
        "bias-key",
        "bias-value",
        "bias-vocab",
        "presence",
        "repetition",
        "min-tokens",
    ],
)
async def test_bad_requests_get_openai_errors(
    redis_url: str, tiny_model: Path, body: dict[str, Any], status: int, fragment: str
) -> None:
    async with stack(redis_url, tiny_model, [SIM]) as (front, _apps):
        response = await _post(front, "/v1/chat/completions", body)
        assert response.status_code == status
        error = response.json()["error"]
        assert fragment in error["message"] or fragment == error["param"]
        assert error["type"]


async def test_parameters_at_their_no_op_values_are_accepted(redis_url: str, tiny_model: Path) -> None:
    """What SDKs send by default asks for nothing Shoal lacks: it is served, not refused."""
    no_ops = {"logprobs": False, "response_format": {"type": "text"}, "tools": [], "store": False, "n": 1}
    async with stack(redis_url, tiny_model, [SIM]) as (front, _apps):
        response = await _post(front, "/v1/chat/completions", {"model": MODEL, "messages": USER_X, **no_ops})
        assert response.status_code == 200, response.text


async def test_unparseable_json_and_oversized_bodies(redis_url: str, tiny_model: Path) -> None:
    async with stack(redis_url, tiny_model, [SIM]) as (front, _apps), httpx.AsyncClient(base_url=front.url) as http:
        broken = await http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert broken.status_code == 400
        assert (
            await _raw_status(front, b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 1000000000\r\n\r\n")
        ) == 413
        token_ids = await http.post("/v1/completions", json={"model": MODEL, "prompt": [1, 999999]})
        assert token_ids.status_code == 400 and "vocabulary" in token_ids.json()["error"]["message"]


async def _raw_status(front: RunningRouter, request: bytes) -> int:
    """Send raw HTTP (a client library would refuse a body shorter than its length)."""
    host, port = front.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    await writer.drain()
    status_line = await reader.readline()
    writer.close()
    return int(status_line.split()[1])


async def test_no_worker_gives_503_with_retry_after(redis_url: str, tiny_model: Path) -> None:
    async with stack(redis_url, tiny_model, []) as (front, _apps):
        response = await _post(front, "/v1/completions", {"model": MODEL, "prompt": "x"})
        assert response.status_code == 503
        assert int(response.headers["retry-after"]) >= 1


async def test_overload_gives_429_never_an_unbounded_queue(redis_url: str, tiny_model: Path) -> None:
    slow = {"engine": EngineKind.SIM, "sim_speedup": 0.5}
    async with stack(redis_url, tiny_model, [slow], max_inflight=1) as (front, _apps):
        first = asyncio.create_task(_post(front, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 40}))
        await asyncio.sleep(0.5)
        second = await _post(front, "/v1/completions", {"model": MODEL, "prompt": "y", "max_tokens": 2})
        assert second.status_code == 429
        assert second.headers["retry-after"] == "1"
        assert (await first).status_code == 200


async def test_a_repeated_conversation_goes_to_the_worker_holding_its_prefix(redis_url: str, tiny_model: Path) -> None:
    async with stack(redis_url, tiny_model, [SIM, SIM], routing_preset="prefix-aware") as (front, apps):
        oai = client(front)
        history = [{"role": "system", "content": "You are a patient assistant. " * 8}]
        for turn in range(4):
            history.append({"role": "user", "content": f"question number {turn}"})
            reply = await oai.chat.completions.create(model=MODEL, messages=history, max_tokens=4, temperature=0)  # type: ignore[arg-type]
            history.append({"role": "assistant", "content": reply.choices[0].message.content or ""})
            await asyncio.sleep(0.4)  # let the KV events reach the router's index
        served = [app.engine.load().requests_finished for app in apps]
        cached = [app.engine.load().cached_tokens_total for app in apps]
        assert sorted(served) == [0, 4]  # every turn on one worker
        assert max(cached) >= 3 * 64


async def test_session_header_keeps_an_agent_on_one_worker(redis_url: str, tiny_model: Path) -> None:
    async with stack(redis_url, tiny_model, [SIM, SIM], routing_preset="session-affinity") as (front, apps):
        for turn in range(5):
            response = await _post(
                front,
                "/v1/completions",
                {"model": MODEL, "prompt": f"turn {turn}", "max_tokens": 2},
                **{"x-session-id": "agent-42"},
            )
            assert response.status_code == 200
        assert sorted(app.engine.load().requests_finished for app in apps) == [0, 5]


async def test_pool_header_prefers_that_pool_and_falls_back_when_it_has_none(redis_url: str, tiny_model: Path) -> None:
    workers = [{**SIM, "pool": "older"}, {**SIM, "pool": "newer"}]
    async with stack(redis_url, tiny_model, workers, routing_preset="least-load") as (front, apps):
        for turn in range(4):
            body = {"model": MODEL, "prompt": f"step {turn}", "max_tokens": 2}
            assert (await _post(front, "/v1/completions", body, **{"x-shoal-pool": "newer"})).status_code == 200
        assert [app.engine.load().requests_finished for app in apps] == [0, 4]
        body = {"model": MODEL, "prompt": "anywhere", "max_tokens": 2}
        assert (await _post(front, "/v1/completions", body, **{"x-shoal-pool": "gone"})).status_code == 200
        assert sum(app.engine.load().requests_finished for app in apps) == 5


async def test_disaggregated_output_equals_colocated(redis_url: str, tiny_model: Path) -> None:
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 6
    body = {"model": MODEL, "prompt": long_prompt, "max_tokens": 24, "temperature": 0, "logprobs": 2}
    async with running_kvstore(redis_url) as store:
        pd_workers = [{"role": WorkerRole.PREFILL}, {"role": WorkerRole.DECODE}]
        async with stack(
            redis_url, tiny_model, pd_workers, kvstore_address=store.address, pd_min_uncached_tokens=64
        ) as (front, apps):
            disaggregated = (await _post(front, "/v1/completions", body)).json()
            assert front.app.metrics.pd.labels("disaggregated").value == 1
            prefill, decode = apps
            assert prefill.engine.load().requests_finished == 1
            assert decode.engine.load().cached_tokens_total > 0  # decoded from handed-over KV
        async with stack(redis_url, tiny_model, [{"role": WorkerRole.MIXED}], pd_min_uncached_tokens=10**6) as (
            front,
            _apps,
        ):
            colocated = (await _post(front, "/v1/completions", body)).json()
    assert disaggregated["choices"][0]["text"] == colocated["choices"][0]["text"]
    assert disaggregated["usage"]["completion_tokens"] == colocated["usage"]["completion_tokens"] == 24
    # The first token's logprobs come from the prefill worker, the rest from the decode worker.
    split, whole = disaggregated["choices"][0]["logprobs"], colocated["choices"][0]["logprobs"]
    assert split["tokens"] == whole["tokens"] and len(whole["tokens"]) == 24
    assert split["token_logprobs"] == pytest.approx(whole["token_logprobs"], abs=1e-4)


async def test_pd_with_the_kvstore_down_falls_back_to_recomputing(redis_url: str, tiny_model: Path) -> None:
    pd_workers = [{"role": WorkerRole.PREFILL, **SIM}, {"role": WorkerRole.DECODE, **SIM}]
    async with stack(
        redis_url,
        tiny_model,
        pd_workers,
        kvstore_address="127.0.0.1:1",
        pd_min_uncached_tokens=16,
        kv_transfer_timeout_s=1.0,
    ) as (front, _apps):
        response = await _post(front, "/v1/completions", {"model": MODEL, "prompt": "z" * 200, "max_tokens": 6})
        assert response.status_code == 200
        assert response.json()["usage"]["completion_tokens"] == 6


async def test_a_worker_dying_mid_stream_is_resumed_on_another(redis_url: str, tiny_model: Path) -> None:
    slow = {"engine": EngineKind.SIM, "sim_speedup": 1.0}
    async with stack(redis_url, tiny_model, [slow, slow], routing_preset="round-robin") as (front, apps):
        stream = await client(front).completions.create(model=MODEL, prompt="tell me", max_tokens=60, stream=True)
        texts: list[str] = []
        finish = None
        killed = False
        async for chunk in stream:
            texts.append(chunk.choices[0].text)
            if chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            if len(texts) == 5 and not killed:
                victim = next(app for app in apps if app.engine.load().running_requests)
                assert victim.server is not None
                await victim.channels.stop()  # the worker's servers vanish mid-stream
                await victim.server.server.stop(0)
                killed = True
        assert killed
        assert finish == "length"
        assert front.app.metrics.retries.labels("resume").value >= 1


async def test_choices_on_a_dying_worker_resume_to_the_uninterrupted_text(redis_url: str, tiny_model: Path) -> None:
    """n = 2, seeded: the worker serving the choices dies mid-stream; each choice it held resumes once
    elsewhere, and every choice's text is what the uninterrupted request gave."""
    slow = {"engine": EngineKind.SIM, "sim_speedup": 1.0}
    body: Any = {"model": MODEL, "prompt": "tell me", "max_tokens": 40, "temperature": 1.0, "seed": 3, "n": 2}
    async with stack(redis_url, tiny_model, [slow, slow]) as (front, apps):
        oai = client(front)
        whole = await oai.completions.create(**body)
        expected = {choice.index: choice.text for choice in whole.choices}
        stream = await oai.completions.create(**body, stream=True)
        texts = {0: "", 1: "", 2: ""}
        chunks = 0
        held = 0
        async for chunk in stream:
            for choice in chunk.choices:
                texts[choice.index] += choice.text
            chunks += 1
            if chunks == 6 and not held:
                victim = max(apps, key=lambda app: app.engine.load().running_requests)
                held = victim.engine.load().running_requests
                assert victim.server is not None
                await victim.channels.stop()
                await victim.server.server.stop(0)
        assert held >= 1
        assert front.app.metrics.retries.labels("resume").value == held
    assert {0: texts[0], 1: texts[1]} == expected and texts[2] == ""


async def test_a_client_that_disconnects_aborts_its_request(redis_url: str, tiny_model: Path) -> None:
    slow = {"engine": EngineKind.SIM, "sim_speedup": 1.0}
    async with stack(redis_url, tiny_model, [slow]) as (front, apps):
        async with (
            httpx.AsyncClient(base_url=front.url) as http,
            http.stream(
                "POST", "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2000, "stream": True}
            ) as response,
        ):
            async for _line in response.aiter_lines():
                break  # read a little, then hang up
        for _ in range(100):
            if apps[0].engine.load().running_requests == 0:
                break
            await asyncio.sleep(0.05)
        assert apps[0].engine.load().running_requests == 0
        assert front.app.dispatcher.requests == 0


async def test_one_trace_spans_router_prefill_kvstore_and_decode(redis_url: str, tiny_model: Path) -> None:
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from shared.telemetry.tracing import setup_tracing

    exporter = InMemorySpanExporter()
    setup_tracing("test", None, [SimpleSpanProcessor(exporter)])
    pd_workers = [{"role": WorkerRole.PREFILL, **SIM}, {"role": WorkerRole.DECODE, **SIM}]
    async with (
        running_kvstore(redis_url) as store,
        stack(redis_url, tiny_model, pd_workers, kvstore_address=store.address, pd_min_uncached_tokens=16) as (
            front,
            _apps,
        ),
    ):
        exporter.clear()
        response = await _post(front, "/v1/completions", {"model": MODEL, "prompt": "q" * 100, "max_tokens": 3})
        assert response.status_code == 200
    spans = exporter.get_finished_spans()
    http = next(s for s in spans if s.kind.name == "SERVER" and "/v1/completions" in s.name)
    assert http.attributes is not None and http.attributes["gen_ai.request.model"] == MODEL
    trace_id = http.context.trace_id
    names = {s.name for s in spans if s.context.trace_id == trace_id}
    assert "/shoal.v1.Worker/Prefill" in names
    assert "/shoal.v1.Worker/Serve Decode" in names  # the decode's own span on the shared Serve stream
    assert "/shoal.v1.Worker/Serve" not in names  # the stream itself belongs to no request
    assert any(name.startswith("kvstore.") or name.startswith("/shoal.v1.KVStore/") for name in names), names
