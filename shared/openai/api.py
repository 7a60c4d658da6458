"""The OpenAI API as one HTTP server over a Backend: the completion endpoints, models, the OpenAPI document.

`openai_server` puts the completion endpoints (completions.py) on the
project's HTTP server (shared/httpserver.py) and every other path on a
FastAPI app the service gives (its health and metrics routes); `/v1/models`
is added to that app here. The app's OpenAPI document gains the completion
endpoints, from the same pydantic models that validate their bodies, so
clients and the fuzzer see one API.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

from shared.httpserver import HttpServer
from shared.openai.completions import (
    MAX_PIN_S,
    MAX_POOL_NAME,
    MAX_SESSION_ID,
    Backend,
    Completions,
)
from shared.openai.schemas import ChatCompletionRequest, CompletionRequest

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
MAX_BODY_BYTES = 16 * 2**20


def json_response(payload: dict[str, Any], status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


def openai_server(backend: Backend, api: FastAPI) -> HttpServer:
    """The HTTP server of `backend`'s OpenAI API, with `api` answering every other path."""

    @api.get("/v1/models")
    async def models(request: Request) -> Response:
        await backend.access.admit(request.headers.get("authorization"), request=False)
        return json_response({"object": "list", "data": [model.listing() for model in backend.models()]})

    base_openapi = api.openapi

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            document = base_openapi()
            document["paths"][CHAT_PATH] = _operation("Create a chat completion", ChatCompletionRequest, document)
            document["paths"][COMPLETIONS_PATH] = _operation("Create a completion", CompletionRequest, document)
            api.openapi_schema = document
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]
    completions = Completions(backend)
    return HttpServer({CHAT_PATH: completions.chat, COMPLETIONS_PATH: completions.text}, api, MAX_BODY_BYTES)


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
