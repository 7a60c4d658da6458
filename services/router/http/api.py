"""The OpenAI-compatible HTTP API: chat and text completions, models, health, metrics.

Routes are thin: validate (pydantic), turn the request into a Job, hand it to
the dispatcher, and render its chunks as OpenAI JSON or server-sent events.
A streamed request waits for its first chunk before answering, so errors
that happen before any output still get a proper status (400, 429, 503);
an error after output has started is sent as a final `error` event.
"""

from __future__ import annotations

import hmac
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import orjson
from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from services.router.dispatch import Chunk, Job
from services.router.http.schemas import ChatCompletionRequest, CompletionRequest
from shared.errors import InvalidArgument, NotFound, Overloaded, ShoalError, Unauthenticated
from shared.httpapi import HTTP_STATUS, error_body, install_error_handlers
from shared.rpc.shoal.v1 import common_pb2
from shared.telemetry.metrics import render

if TYPE_CHECKING:
    from services.router.app import RouterApp

MAX_BODY_BYTES = 16 * 2**20


def _router(request: Request) -> RouterApp:
    app: RouterApp = request.app.state.router
    return app


async def _authorize(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
    keys: list[str] = _router(request).settings.api_keys
    if not keys:
        return
    presented = (authorization or "").removeprefix("Bearer ").strip()
    if not any(hmac.compare_digest(presented.encode(), key.encode()) for key in keys):
        raise Unauthenticated("Incorrect API key provided.", param=None)


Authorized = Annotated[None, Depends(_authorize)]
SessionHeader = Annotated[str | None, Header(alias="x-session-id", max_length=256)]
# A preferred pool (agent graphs' placement); requests go elsewhere when it has no serving worker.
PoolHeader = Annotated[str | None, Header(alias="x-shoal-pool", max_length=63)]
# Keep the prompt's prefix pinned in the kvstore this many seconds for the session (an agent's tool call).
PinHeader = Annotated[int | None, Header(alias="x-shoal-pin-s", ge=0, le=3600)]


@dataclass(frozen=True)
class Hints:
    """What a client says of a request beside its body: its session, a preferred pool, a pin."""

    session: str = ""
    pool: str = ""
    pin_s: int = 0


def _hints(session: SessionHeader = None, pool: PoolHeader = None, pin_s: PinHeader = None) -> Hints:
    return Hints(session or "", pool or "", pin_s or 0)


HintHeaders = Annotated[Hints, Depends(_hints)]


def _sampling(body: ChatCompletionRequest | CompletionRequest, max_tokens: int) -> common_pb2.SamplingParams:
    params = common_pb2.SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=body.top_p or 1.0,
        stop=body.stop or [],
        ignore_eos=body.ignore_eos,
    )
    if body.seed is not None:
        params.seed = body.seed % 2**64
    return params


def _json(payload: dict[str, Any], status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else orjson.dumps(payload).decode()
    return f"data: {data}\n\n".encode()


def _usage(chunk: Chunk) -> dict[str, Any]:
    return {
        "prompt_tokens": chunk.prompt_tokens,
        "completion_tokens": chunk.completion_tokens,
        "total_tokens": chunk.prompt_tokens + chunk.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": chunk.cached_tokens},
    }


class _Tracked:
    """Timing and counters of one request, reported when it ends."""

    def __init__(self, router: RouterApp, endpoint: str) -> None:
        self.router = router
        self.endpoint = endpoint
        self.started = time.monotonic()
        self.last_token: float | None = None

    def chunk(self, chunk: Chunk) -> None:
        now = time.monotonic()
        if chunk.tokens:
            metrics = self.router.metrics
            if self.last_token is None:
                metrics.ttft.observe(now - self.started)
            else:
                metrics.tbt.observe(now - self.last_token)
            self.last_token = now
            metrics.tokens.labels("completion").inc(chunk.tokens)

    def done(self, status: int) -> None:
        metrics = self.router.metrics
        metrics.requests.labels(self.endpoint, str(status)).inc()
        if status == 200:
            metrics.e2e.observe(time.monotonic() - self.started)


async def _start(router: RouterApp, job: Job, tracked: _Tracked) -> tuple[Chunk, AsyncGenerator[Chunk, None]]:
    """Admit the job and wait for its first chunk (so early errors keep their status)."""
    if router.inflight >= router.settings.max_inflight:
        raise Overloaded(f"{router.settings.max_inflight} requests in flight; retry shortly", retry_after_s=1.0)
    stream = router.dispatcher.stream(job)
    router.inflight += 1
    router.metrics.inflight.set(router.inflight)
    try:
        first = await anext(stream)
    except BaseException:
        router.inflight -= 1
        router.metrics.inflight.set(router.inflight)
        await stream.aclose()
        raise
    tracked.chunk(first)
    return first, stream


async def _chunks(
    router: RouterApp, first: Chunk, stream: AsyncGenerator[Chunk, None], tracked: _Tracked
) -> AsyncIterator[Chunk]:
    try:
        yield first
        if first.finish is not None:
            return
        async for chunk in stream:
            tracked.chunk(chunk)
            yield chunk
            if chunk.finish is not None:
                return
    finally:
        router.inflight -= 1
        router.metrics.inflight.set(router.inflight)
        await stream.aclose()


def _error_event(error: ShoalError) -> bytes:
    _status, type_ = HTTP_STATUS[error.code]
    return _sse(error_body(error.message, type_, None, error.code.value))


async def _serve(router: RouterApp, job: Job, stream_mode: bool, include_usage: bool, kind: str) -> Response:
    tracked = _Tracked(router, kind)
    try:
        first, rest = await _start(router, job, tracked)
    except ShoalError as exc:
        tracked.done(HTTP_STATUS[exc.code][0])
        raise
    completion_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    model = job.model
    chunks = _chunks(router, first, rest, tracked)
    if not stream_mode:
        text: list[str] = []
        last = first
        try:
            async for chunk in chunks:
                text.append(chunk.text)
                last = chunk
        except ShoalError as exc:
            tracked.done(HTTP_STATUS[exc.code][0])
            raise
        tracked.done(200)
        choice: dict[str, Any] = {"index": 0, "finish_reason": last.finish, "logprobs": None}
        if kind == "chat":
            choice["message"] = {"role": "assistant", "content": "".join(text)}
            obj = "chat.completion"
        else:
            choice["text"] = "".join(text)
            obj = "text_completion"
        return _json(
            {
                "id": completion_id,
                "object": obj,
                "created": created,
                "model": model,
                "choices": [choice],
                "usage": _usage(last),
            }
        )

    async def events() -> AsyncIterator[bytes]:
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        base = {"id": completion_id, "object": obj, "created": created, "model": model}
        status = 200
        try:
            if kind == "chat":
                yield _sse(
                    {
                        **base,
                        "choices": [
                            {
                                "index": 0,
                                "delta": {"role": "assistant", "content": ""},
                                "finish_reason": None,
                                "logprobs": None,
                            }
                        ],
                    }
                )
            async for chunk in chunks:
                if chunk.text or chunk.finish is None:
                    payload: dict[str, Any] = {"content": chunk.text} if kind == "chat" else {"text": chunk.text}
                    yield _sse({**base, "choices": [_choice(kind, payload, None)]})
                if chunk.finish is not None:
                    yield _sse({**base, "choices": [_choice(kind, {}, chunk.finish)]})
                    if include_usage:
                        yield _sse({**base, "choices": [], "usage": _usage(chunk)})
            yield _sse("[DONE]")
        except ShoalError as exc:
            status = HTTP_STATUS[exc.code][0]
            yield _error_event(exc)
            yield _sse("[DONE]")
        finally:
            tracked.done(status)

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _choice(kind: str, payload: dict[str, Any], finish: str | None) -> dict[str, Any]:
    if kind == "chat":
        return {"index": 0, "delta": payload, "finish_reason": finish, "logprobs": None}
    return {"index": 0, "text": payload.get("text", ""), "finish_reason": finish, "logprobs": None}


def _check_model(router: RouterApp, model: str) -> None:
    if model != router.settings.model_name:
        raise NotFound(f"The model `{model}` does not exist.", param="model")


def _job(
    router: RouterApp,
    model: str,
    prompt: list[int],
    body: Any,
    wanted: int | None,
    hints: Hints,
) -> Job:
    context = router.max_context
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
    return router.job(model, prompt, _sampling(body, max_tokens), hints.session, hints.pool, hints.pin_s)


class BodyLimit:
    """Refuses bodies declared larger than MAX_BODY_BYTES with 413 (a plain ASGI middleware: cheap)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for name, value in scope["headers"]:
                if name == b"content-length" and (not value.isdigit() or int(value) > MAX_BODY_BYTES):
                    body = error_body(f"request body larger than {MAX_BODY_BYTES} bytes", "invalid_request_error")
                    await JSONResponse(body, 413)(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def build_api(router: RouterApp) -> FastAPI:
    api = FastAPI(
        title="Shoal router",
        description="OpenAI-compatible API in front of a Shoal cluster.",
        version="1.0.0",
        # Server spans carry the trace into the workers; metrics are Prometheus's.
        telemetry={"metrics": False, "logs": False, "operation_spans": False},
    )
    api.state.router = router
    install_error_handlers(api)
    v1 = APIRouter(prefix="/v1")

    api.add_middleware(BodyLimit)

    @v1.post("/chat/completions")
    async def chat_completions(
        body: ChatCompletionRequest,
        request: Request,
        _auth: Authorized,
        hints: HintHeaders,
    ) -> Response:
        router = _router(request)
        _check_model(router, body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        prompt = router.prompts.chat(messages)
        job = _job(router, body.model, prompt, body, body.wanted_tokens, hints)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await _serve(router, job, body.stream, include_usage, "chat")

    @v1.post("/completions")
    async def completions(
        body: CompletionRequest,
        request: Request,
        _auth: Authorized,
        hints: HintHeaders,
    ) -> Response:
        router = _router(request)
        _check_model(router, body.model)
        if isinstance(body.prompt, str):
            prompt = router.prompts.encode(body.prompt)
            if not prompt:
                raise InvalidArgument("prompt is empty", param="prompt")
        else:
            prompt = list(body.prompt)  # type: ignore[arg-type]
            vocab = router.prompts.vocab_size
            if any(token >= vocab for token in prompt):
                raise InvalidArgument(f"prompt holds token ids outside the vocabulary (< {vocab})", param="prompt")
        job = _job(router, body.model, prompt, body, body.max_tokens, hints)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await _serve(router, job, body.stream, include_usage, "completion")

    @v1.get("/models")
    async def models(request: Request, _auth: Authorized) -> Response:
        router = _router(request)
        return _json(
            {
                "object": "list",
                "data": [
                    {
                        "id": router.settings.model_name,
                        "object": "model",
                        "created": router.started_at,
                        "owned_by": "shoal",
                    }
                ],
            }
        )

    api.include_router(v1)

    @api.get("/health")
    async def health(request: Request) -> Response:
        router = _router(request)
        workers = len(router.directory.serving())
        return _json({"status": "ok", "workers": workers, "inflight": router.inflight})

    @api.get("/metrics")
    async def metrics(request: Request) -> Response:
        body, content_type = render(_router(request).metrics.registry)
        return Response(body, media_type=content_type)

    return api
