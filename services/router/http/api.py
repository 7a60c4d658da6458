"""The router's HTTP API: the OpenAI endpoints, models, health, metrics, and its OpenAPI document.

`build_server` returns the router's HTTP server (server.py): the two
completion endpoints go to their handlers (completions.py, the hot path),
every other path to a FastAPI app (`build_api`). The OpenAPI document at
/openapi.json describes both: the completion endpoints are added to it from
the same pydantic models that validate their bodies, so clients and the
fuzzer see one API.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

from services.router.http.completions import (
    MAX_PIN_S,
    MAX_POOL_NAME,
    MAX_SESSION_ID,
    Completions,
    check_api_key,
)
from services.router.http.schemas import ChatCompletionRequest, CompletionRequest
from services.router.http.server import HttpServer
from shared.httpapi import install_error_handlers
from shared.telemetry.metrics import render

if TYPE_CHECKING:
    from services.router.app import RouterApp

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
MAX_BODY_BYTES = 16 * 2**20


def _router(request: Request) -> RouterApp:
    app: RouterApp = request.app.state.router
    return app


def _json(payload: dict[str, Any], status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


def build_server(router: RouterApp) -> HttpServer:
    completions = Completions(router)
    routes = {CHAT_PATH: completions.chat, COMPLETIONS_PATH: completions.text}
    return HttpServer(routes, build_api(router), MAX_BODY_BYTES)


def build_api(router: RouterApp) -> FastAPI:
    """Every route but the completion endpoints, and the whole API's OpenAPI document."""
    api = FastAPI(
        title="Shoal router",
        description="OpenAI-compatible API in front of a Shoal cluster.",
        version="1.0.0",
        telemetry={"metrics": False, "logs": False, "operation_spans": False},
    )
    api.state.router = router
    install_error_handlers(api)

    @api.get("/v1/models")
    async def models(request: Request) -> Response:
        app = _router(request)
        check_api_key(app.settings.api_keys, request.headers.get("authorization"))
        return _json(
            {
                "object": "list",
                "data": [
                    {
                        "id": app.settings.model_name,
                        "object": "model",
                        "created": app.started_at,
                        "owned_by": "shoal",
                    }
                ],
            }
        )

    @api.get("/health")
    async def health(request: Request) -> Response:
        app = _router(request)
        workers = len(app.directory.serving())
        return _json({"status": "ok", "workers": workers, "inflight": app.inflight})

    @api.get("/metrics")
    async def metrics(request: Request) -> Response:
        body, content_type = render(_router(request).metrics.registry)
        return Response(body, media_type=content_type)

    base_openapi = api.openapi

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            document = base_openapi()
            document["paths"][CHAT_PATH] = _operation("Create a chat completion", ChatCompletionRequest, document)
            document["paths"][COMPLETIONS_PATH] = _operation("Create a completion", CompletionRequest, document)
            api.openapi_schema = document
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]
    return api


_ERROR = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
            "required": ["message", "type"],
        }
    },
    "required": ["error"],
}


def _operation(summary: str, body: type[ChatCompletionRequest | CompletionRequest], document: dict[str, Any]) -> Any:
    """The OpenAPI path item of a completion endpoint (its body schema from the pydantic model)."""
    schema = body.model_json_schema(ref_template="#/components/schemas/{model}")
    components = document.setdefault("components", {}).setdefault("schemas", {})
    components.update(schema.pop("$defs", {}))
    components[body.__name__] = schema
    headers = [
        ("x-session-id", {"type": "string", "maxLength": MAX_SESSION_ID}, "Keeps an agent's turns on one worker."),
        ("x-shoal-pool", {"type": "string", "maxLength": MAX_POOL_NAME}, "A preferred pool (falls back)."),
        ("x-shoal-pin-s", {"type": "integer", "minimum": 0, "maximum": MAX_PIN_S}, "Pin the prompt's prefix."),
    ]
    errors = {
        str(status): {"description": text, "content": {"application/json": {"schema": _ERROR}}}
        for status, text in (
            (400, "Invalid request"),
            (401, "Missing or wrong API key"),
            (404, "Unknown model"),
            (413, "Body too large"),
            (429, "Overloaded (Retry-After)"),
            (503, "No worker serves the model (Retry-After)"),
        )
    }
    return {
        "post": {
            "summary": summary,
            "operationId": body.__name__,
            "parameters": [
                {"name": name, "in": "header", "required": False, "schema": spec, "description": text}
                for name, spec, text in headers
            ],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{body.__name__}"}}},
            },
            "responses": {
                "200": {
                    "description": "The completion (JSON), or server-sent events with `stream: true`",
                    "content": {"application/json": {"schema": {"type": "object"}}, "text/event-stream": {}},
                },
                **errors,
            },
        }
    }
