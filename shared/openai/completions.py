"""The OpenAI completion endpoints: `/v1/chat/completions` and `/v1/completions`.

Served by the router (its hot path) and, for direct access, by a worker,
each through the HTTP server of shared/httpserver.py. Per request: check the
API key, validate the body with its pydantic model (schemas.py, the same
models the OpenAPI document shows), template and tokenize it (in a thread
when the prompt is long), turn it into a Job and run it on the `Backend` (the
router's dispatcher, or a worker's engine), then answer with one JSON object
or with server-sent events rendered from byte templates (no model objects
per token).

A streamed request waits for its first chunk before answering, so errors
that happen before any output still get a proper status (400, 429, 503); an
error after output has started is sent as a final `error` event. A client
that goes away cancels its request, streamed or not.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from contextvars import Token
from dataclasses import replace
from typing import Any, Protocol

import orjson
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from pydantic import BaseModel, ValidationError

from shared.errors import Internal, InvalidArgument, ShoalError
from shared.httpapi import HTTP_STATUS, describe_validation, error_body, error_parts
from shared.httpserver import Request, Responder
from shared.openai.access import OPEN, Access
from shared.openai.jobs import Chunk, Hints, Job
from shared.openai.logprobs import LogprobsRenderer
from shared.openai.models import ServedModel
from shared.openai.prompts import PromptBuilder
from shared.openai.schemas import ChatCompletionRequest, CompletionRequest
from shared.rpc.shoal.v1 import common_pb2
from shared.telemetry.loopmetrics import LoopCounter, LoopHistogram, LoopMetrics
from shared.telemetry.metrics import LATENCY_BUCKETS
from shared.telemetry.tracing import extract_context, recording, tracer

# Longer prompts are templated and tokenized on a thread, off the event loop.
INLINE_PROMPT_CHARS = 16_384
MAX_SESSION_ID = 256
MAX_POOL_NAME = 63
MAX_PIN_S = 3600
# A response sent whole needs its tokens only at the end; progress this often bounds what a resume
# elsewhere recomputes if its worker fails.
WHOLE_RESPONSE_COALESCE_MS = 500
# Between the seeds of a request's choices (the golden ratio's 64-bit stride: far apart, never equal).
SEED_STRIDE = 0x9E3779B97F4A7C15


class EdgeMetrics:
    """Per-request metrics of the OpenAI endpoints, named `{prefix}_requests_total` and so on, by model
    (the model a request ran on; "" for one refused before its model was known)."""

    def __init__(self, metrics: LoopMetrics, prefix: str) -> None:
        self.requests: LoopCounter = metrics.counter(
            f"{prefix}_requests", "Requests by model, endpoint and HTTP status", ["model", "endpoint", "status"]
        )
        self.ttft: LoopHistogram = metrics.histogram(
            f"{prefix}_ttft_seconds", "Request arrival to first token", LATENCY_BUCKETS, ["model"]
        )
        self.tbt: LoopHistogram = metrics.histogram(
            f"{prefix}_tbt_seconds", "Time between streamed tokens", LATENCY_BUCKETS, ["model"]
        )
        self.e2e: LoopHistogram = metrics.histogram(
            f"{prefix}_e2e_seconds", "Request arrival to last token", LATENCY_BUCKETS, ["model"]
        )
        self.tokens: LoopCounter = metrics.counter(f"{prefix}_tokens", "Tokens by model and kind", ["model", "kind"])


class Backend(Protocol):
    """Where the endpoints run requests: the router's dispatcher, or one worker's engine."""

    def model(self, name: str) -> ServedModel:
        """The model (or alias) clients call `name`; raises NotFound (404) for one not served."""

    def models(self) -> list[ServedModel]:
        """Every model and alias served, as `/v1/models` lists them."""

    @property
    def access(self) -> Access:
        """Who may call, and where each request's tokens are charged (shared/openai/access.py)."""

    @property
    def edge_metrics(self) -> EdgeMetrics:
        """Where the endpoints count requests and time tokens."""

    def job(self, model: ServedModel, prompt: list[int], sampling: common_pb2.SamplingParams, hints: Hints) -> Job:
        """The job for a validated, tokenized request (ids, block hashes, deadline)."""

    def stream(self, job: Job) -> AsyncGenerator[Chunk, None]:
        """Run `job` and yield its text as it comes; the first step raises the errors that refuse it
        (Overloaded when full, Unavailable when nothing serves). Closing the stream cancels the job."""


class _Tracked:
    """Timing and counters of one request, reported when it ends."""

    __slots__ = (
        "_last_token",
        "_tbt",
        "_tokens",
        "completion_tokens",
        "endpoint",
        "grant",
        "metrics",
        "model",
        "prompt_tokens",
        "reported",
        "started",
    )

    def __init__(self, metrics: EdgeMetrics, endpoint: str) -> None:
        self.metrics = metrics
        self.endpoint = endpoint
        self.model = ""
        self.started = time.monotonic()
        # Per choice (n > 1 interleaves them): a gap is between two tokens of one choice.
        self._last_token: dict[int, float] = {}
        self.reported = False
        self.grant = OPEN
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def chunk(self, chunk: Chunk) -> None:
        if chunk.tokens:
            now = time.monotonic()
            if not self._last_token:
                # The model's children, looked up once per request rather than once per token.
                self._tbt = self.metrics.tbt.labels(self.model)
                self._tokens = self.metrics.tokens.labels(self.model, "completion")
                self.metrics.ttft.labels(self.model).observe(now - self.started)
            previous = self._last_token.get(chunk.index)
            if previous is not None:
                self._tbt.observe(now - previous)
            self._last_token[chunk.index] = now
            self._tokens.inc(chunk.tokens)
            self.completion_tokens += chunk.tokens

    def done(self, status: int) -> None:
        if self.reported:  # a client that hangs up as its response ends is counted once
            return
        self.reported = True
        if self._last_token:  # the prompt was computed: charge it and what came of it
            self.grant.charge(self.prompt_tokens + self.completion_tokens)
        self.metrics.requests.labels(self.model, self.endpoint, str(status)).inc()
        if status == 200:
            self.metrics.e2e.labels(self.model).observe(time.monotonic() - self.started)


class _Events:
    """One response's server-sent events, rendered from byte templates."""

    def __init__(
        self, chat: bool, completion_id: str, created: int, model: str, logprobs: _LogprobsFactory | None
    ) -> None:
        obj = "chat.completion.chunk" if chat else "text_completion"
        head = orjson.dumps({"id": completion_id, "object": obj, "created": created, "model": model})[:-1]
        self.chat = chat
        self._head = b"data: " + head
        self._choices: dict[int, bytes] = {}
        self._tail = b',"finish_reason":null,"logprobs":null}]}\n\n'
        self._logprobs_factory = logprobs
        self._logprobs: dict[int, LogprobsRenderer] = {}  # per choice: each keeps its own text offset

    def _choice(self, index: int) -> bytes:
        choice = self._choices.get(index)
        if choice is None:
            choice = self._choices[index] = self._head + b',"choices":[{"index":' + str(index).encode() + b","
        return choice

    def role(self, index: int) -> bytes:
        return self._choice(index) + b'"delta":{"role":"assistant","content":""}' + self._tail

    def text(self, chunk: Chunk) -> bytes:
        tail = self._tail
        if self._logprobs_factory is not None:
            renderer = self._logprobs.get(chunk.index)
            if renderer is None:
                renderer = self._logprobs[chunk.index] = self._logprobs_factory()
            rendered = orjson.dumps(renderer.render(chunk.logprobs))
            tail = b',"finish_reason":null,"logprobs":' + rendered + b"}]}\n\n"
        if self.chat:
            return self._choice(chunk.index) + b'"delta":{"content":' + orjson.dumps(chunk.text) + b"}" + tail
        return self._choice(chunk.index) + b'"text":' + orjson.dumps(chunk.text) + tail

    def finish(self, index: int, reason: str) -> bytes:
        payload = b'"delta":{}' if self.chat else b'"text":""'
        return self._choice(index) + payload + b',"finish_reason":"' + reason.encode() + b'","logprobs":null}]}\n\n'

    def usage(self, usage: dict[str, Any]) -> bytes:
        return self._head + b',"choices":[],"usage":' + orjson.dumps(usage) + b"}\n\n"


_LogprobsFactory = Callable[[], LogprobsRenderer]


DONE = b"data: [DONE]\n\n"
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


def _send_error(responder: Responder, error: ShoalError) -> None:
    status, body, headers = error_parts(error)
    responder.send_json(status, orjson.dumps(body), [(k.lower().encode(), v.encode()) for k, v in headers.items()])


def _usage(finals: list[Chunk]) -> dict[str, Any]:
    """The usage of a response from its choices' final chunks: the prompt counts once (as the first
    choice computed it)."""
    first = min(finals, key=lambda chunk: chunk.index)
    completion = sum(chunk.completion_tokens for chunk in finals)
    return {
        "prompt_tokens": first.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": first.prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": first.cached_tokens},
    }


def _error_event(error: ShoalError) -> bytes:
    _status, type_ = HTTP_STATUS[error.code]
    return b"data: " + orjson.dumps(error_body(error.message, type_, None, error.code.value)) + b"\n\n"


def _sampling(body: ChatCompletionRequest | CompletionRequest, max_tokens: int) -> common_pb2.SamplingParams:
    params = common_pb2.SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=body.top_p or 1.0,
        stop=body.stop or [],
        ignore_eos=body.ignore_eos,
        logit_bias={int(token): bias for token, bias in (body.logit_bias or {}).items()},
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=body.repetition_penalty or 1.0,
        min_tokens=body.min_tokens or 0,
    )
    if body.seed is not None:
        params.seed = body.seed % 2**64
    if body.wanted_logprobs is not None:
        params.logprobs = body.wanted_logprobs
    if body.response_format is not None:
        params.json_schema = body.response_format.grammar()
    return params


def _copy_sampling(sampling: common_pb2.SamplingParams, copy: int) -> common_pb2.SamplingParams:
    """Choice `copy`'s parameters: the first is the request's own; a seeded request's other choices
    get seeds of their own, derived from it, so n seeded choices differ and each repeats."""
    if copy == 0 or not sampling.HasField("seed"):
        return sampling
    derived = common_pb2.SamplingParams()
    derived.CopyFrom(sampling)
    derived.seed = (sampling.seed + copy * SEED_STRIDE) % 2**64
    return derived


def _hints(request: Request) -> Hints:
    """The request's headers `x-session-id`, `x-shoal-pool` and `x-shoal-pin-s`, checked."""
    session = request.header(b"x-session-id") or ""
    if len(session) > MAX_SESSION_ID:
        raise InvalidArgument(f"x-session-id is longer than {MAX_SESSION_ID} characters", param="x-session-id")
    pool = request.header(b"x-shoal-pool") or ""
    if len(pool) > MAX_POOL_NAME:
        raise InvalidArgument(f"x-shoal-pool is longer than {MAX_POOL_NAME} characters", param="x-shoal-pool")
    pin = request.header(b"x-shoal-pin-s")
    if pin is not None and (not pin.strip().isdigit() or int(pin) > MAX_PIN_S):
        raise InvalidArgument(f"x-shoal-pin-s must be an integer in [0, {MAX_PIN_S}]", param="x-shoal-pin-s")
    return Hints(session, pool, int(pin) if pin is not None else 0)


def _parse(model: type[BaseModel], body: bytes) -> Any:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        message, param = describe_validation(exc.errors())
        raise InvalidArgument(message, param=param) from None


class Completions:
    """The two endpoints' handlers (`chat`, `text`) over one backend."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    async def chat(self, request: Request, responder: Responder) -> None:
        await self._handle(request, responder, "chat")

    async def text(self, request: Request, responder: Responder) -> None:
        await self._handle(request, responder, "completion")

    # -- request -> job -------------------------------------------------------------

    async def _jobs(self, kind: str, body: bytes, hints: Hints) -> tuple[list[Job], bool, bool]:
        """The jobs a request body asks for (one per choice, `n`), and whether to stream them and
        include usage."""
        request: ChatCompletionRequest | CompletionRequest
        if kind == "chat":
            chat: ChatCompletionRequest = _parse(ChatCompletionRequest, body)
            model = self.backend.model(chat.model)
            prompt = await self._chat_prompt(model.prompts, chat)
            request, wanted = chat, chat.wanted_tokens
        else:
            text: CompletionRequest = _parse(CompletionRequest, body)
            model = self.backend.model(text.model)
            prompt = await self._completion_prompt(model.prompts, text)
            request, wanted = text, text.max_tokens
        copies = request.n or 1
        if copies > 1 and not hints.session:
            # The copies share one session, so they go where the first one's prompt KV is.
            hints = replace(hints, session=f"choices-{uuid.uuid4().hex}")
        sampling = self._sampling_checked(model, request, prompt, wanted)
        jobs = [self.backend.job(model, prompt, _copy_sampling(sampling, k), hints) for k in range(copies)]
        if not request.stream:
            for job in jobs:
                job.coalesce_ms = WHOLE_RESPONSE_COALESCE_MS
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return jobs, request.stream, include_usage

    @staticmethod
    async def _chat_prompt(prompts: PromptBuilder, request: ChatCompletionRequest) -> list[int]:
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        if sum(len(m["content"]) for m in messages) > INLINE_PROMPT_CHARS:
            return await asyncio.to_thread(prompts.chat, messages)
        return prompts.chat(messages)

    @staticmethod
    async def _completion_prompt(prompts: PromptBuilder, request: CompletionRequest) -> list[int]:
        if isinstance(request.prompt, str):
            if len(request.prompt) > INLINE_PROMPT_CHARS:
                prompt = await asyncio.to_thread(prompts.encode, request.prompt)
            else:
                prompt = prompts.encode(request.prompt)
            if not prompt:
                raise InvalidArgument("prompt is empty", param="prompt")
            return prompt
        ids = [int(token) for token in request.prompt]
        if any(token >= prompts.vocab_size for token in ids):
            vocab = prompts.vocab_size
            raise InvalidArgument(f"prompt holds token ids outside the vocabulary (< {vocab})", param="prompt")
        return ids

    @staticmethod
    def _sampling_checked(
        model: ServedModel,
        request: ChatCompletionRequest | CompletionRequest,
        prompt: list[int],
        wanted: int | None,
    ) -> common_pb2.SamplingParams:
        context = model.max_context
        if len(prompt) >= context:
            raise InvalidArgument(
                f"This model's maximum context length is {context} tokens; the prompt has {len(prompt)}.",
                param="messages",
            )
        max_tokens = wanted if wanted is not None else context - len(prompt)
        if len(prompt) + max_tokens > context:
            raise InvalidArgument(
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{len(prompt) + max_tokens} tokens ({len(prompt)} in the prompt, {max_tokens} for the completion).",
                param="max_tokens",
            )
        if (request.min_tokens or 0) > max_tokens:
            raise InvalidArgument(
                f"min_tokens ({request.min_tokens}) exceeds the {max_tokens} tokens the completion may hold",
                param="min_tokens",
            )
        return _sampling(request, max_tokens)

    # -- serving --------------------------------------------------------------------

    async def _handle(self, request: Request, responder: Responder, kind: str) -> None:
        tracked = _Tracked(self.backend.edge_metrics, kind)
        span, token = _start_span(request, kind)
        try:
            await self._serve(request, responder, kind, tracked, span)
        finally:
            if span is not None and token is not None:
                span.end()
                otel_context.detach(token)

    async def _serve(
        self, request: Request, responder: Responder, kind: str, tracked: _Tracked, span: trace.Span | None
    ) -> None:
        try:
            await self._answer(request, responder, kind, tracked, span)
        except asyncio.CancelledError:
            if not responder.disconnected:
                raise
            tracked.done(499)  # the client went away: closing its chunks cancelled the request on its worker

    async def _answer(
        self, request: Request, responder: Responder, kind: str, tracked: _Tracked, span: trace.Span | None
    ) -> None:
        try:
            tracked.grant = await self.backend.access.admit(request.header(b"authorization"))
            jobs, stream, include_usage = await self._jobs(kind, request.body, _hints(request))
            job = jobs[0]
            tracked.model = job.model
            tracked.prompt_tokens = len(job.prompt)
            if span is not None:
                # The OpenTelemetry GenAI convention's name: traces filter by model as metrics do.
                span.set_attribute("gen_ai.request.model", job.model)
                for each in jobs:
                    propagate.inject(each.trace_context)
            first, chunks = await self._start(jobs, tracked)
        except ShoalError as exc:
            tracked.done(HTTP_STATUS[exc.code][0])
            _send_error(responder, exc)
            return
        try:
            logprobs = self._logprobs(kind, job)
            if stream:
                await self._stream(responder, kind, jobs, first, chunks, include_usage, tracked, logprobs)
            else:
                collected = await self._rest(len(jobs), first, chunks, tracked)
                self._whole(responder, kind, jobs, collected, tracked, logprobs)
        except ShoalError as exc:
            tracked.done(HTTP_STATUS[exc.code][0])
            _send_error(responder, exc)
        finally:
            await chunks.aclose()

    async def _start(self, jobs: list[Job], tracked: _Tracked) -> tuple[Chunk, AsyncGenerator[Chunk, None]]:
        """Run the jobs and wait for the first chunk (so early errors keep their status)."""
        chunks = self.backend.stream(jobs[0]) if len(jobs) == 1 else self._choices(jobs)
        try:
            first = await anext(chunks)
        except BaseException:
            await chunks.aclose()
            raise
        tracked.chunk(first)
        return first, chunks

    async def _choices(self, jobs: list[Job]) -> AsyncGenerator[Chunk, None]:
        """The chunks of n choices as they come, each marked with its index.

        The first choice runs alone until its first chunk: its prompt's KV is then in its worker's
        prefix cache, and the other choices (same session, so routed there) reuse it instead of
        computing the prompt n times. A choice that fails fails the response; closing this stream
        cancels every choice still running.
        """
        queue: asyncio.Queue[tuple[int, Chunk | Exception | None]] = asyncio.Queue()

        async def run(index: int) -> None:
            stream = self.backend.stream(jobs[index])
            try:
                async for chunk in stream:
                    chunk.index = index
                    queue.put_nowait((index, chunk))
                queue.put_nowait((index, None))
            except Exception as exc:  # handed to the reader, which raises it
                queue.put_nowait((index, exc))
            finally:
                await stream.aclose()  # a cancelled choice is cancelled on its worker

        tasks = [asyncio.create_task(run(0))]
        running = len(jobs)
        try:
            while running:
                index, item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                if item is None:
                    running -= 1
                    continue
                if index == 0 and len(tasks) == 1:
                    tasks += [asyncio.create_task(run(k)) for k in range(1, len(jobs))]
                yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    @staticmethod
    async def _rest(choices: int, first: Chunk, chunks: AsyncGenerator[Chunk, None], tracked: _Tracked) -> list[Chunk]:
        """Every chunk of a response sent whole (raises the error that ended it early)."""
        collected = [first]
        open_choices = choices - (first.finish is not None)
        while open_choices:
            chunk = await anext(chunks)
            tracked.chunk(chunk)
            collected.append(chunk)
            open_choices -= chunk.finish is not None
        return collected

    def _logprobs(self, kind: str, job: Job) -> _LogprobsFactory | None:
        if not job.sampling.HasField("logprobs"):
            return None
        pieces = self.backend.model(job.model).prompts.pieces
        return lambda: LogprobsRenderer(kind == "chat", pieces)

    @staticmethod
    def _whole(
        responder: Responder,
        kind: str,
        jobs: list[Job],
        collected: list[Chunk],
        tracked: _Tracked,
        logprobs: _LogprobsFactory | None,
    ) -> None:
        tracked.done(200)
        choices: list[dict[str, Any]] = []
        finals: list[Chunk] = []
        for index in range(len(jobs)):
            mine = [chunk for chunk in collected if chunk.index == index]
            text = "".join(chunk.text for chunk in mine)
            finals.append(mine[-1])
            choice: dict[str, Any] = {"index": index, "finish_reason": mine[-1].finish, "logprobs": None}
            if logprobs is not None:
                choice["logprobs"] = logprobs().render(entry for chunk in mine for entry in chunk.logprobs)
            if kind == "chat":
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            choices.append(choice)
        payload = {
            "id": _completion_id(kind, jobs[0]),
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()),
            "model": jobs[0].model,
            "choices": choices,
            "usage": _usage(finals),
        }
        responder.send_json(200, orjson.dumps(payload))

    async def _stream(
        self,
        responder: Responder,
        kind: str,
        jobs: list[Job],
        first: Chunk,
        chunks: AsyncGenerator[Chunk, None],
        include_usage: bool,
        tracked: _Tracked,
        logprobs: _LogprobsFactory | None,
    ) -> None:
        job = jobs[0]
        events = _Events(kind == "chat", _completion_id(kind, job), int(time.time()), job.model, logprobs)
        responder.start(200, SSE_HEADERS)
        status = 200
        finals: list[Chunk] = []
        try:
            opening = b"".join(events.role(index) for index in range(len(jobs))) if kind == "chat" else b""
            chunk = first
            while True:
                out = opening + self._render(events, chunk)
                opening = b""
                if chunk.finish is not None:
                    finals.append(chunk)
                await responder.write(out)
                if len(finals) == len(jobs):
                    break
                chunk = await anext(chunks)
                tracked.chunk(chunk)
            tail = (events.usage(_usage(finals)) if include_usage else b"") + DONE
        except ShoalError as exc:
            status = HTTP_STATUS[exc.code][0]
            tail = _error_event(exc) + DONE
        except StopAsyncIteration:  # the dispatcher ends only after a finish: a bug if reached
            status = 500
            tail = _error_event(Internal("the request ended without a finish reason")) + DONE
        tracked.done(status)
        responder.end(tail)

    @staticmethod
    def _render(events: _Events, chunk: Chunk) -> bytes:
        out = events.text(chunk) if chunk.text or chunk.logprobs or chunk.finish is None else b""
        if chunk.finish is not None:
            out += events.finish(chunk.index, chunk.finish)
        return out


def _completion_id(kind: str, job: Job) -> str:
    """The OpenAI id of a response: the request's own id (which the workers' logs and traces show too)."""
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{job.request_id}"


def _start_span(request: Request, kind: str) -> tuple[trace.Span | None, Token[otel_context.Context] | None]:
    """A server span for the request, child of the caller's trace, made current; none when nothing
    records spans (the hot path skips that work)."""
    if not recording():
        return None, None
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in request.headers}
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    span = tracer("shoal.openai").start_span(
        f"POST {path}", context=extract_context(headers), kind=trace.SpanKind.SERVER
    )
    return span, otel_context.attach(trace.set_span_in_context(span))
