"""The error taxonomy on HTTP: ShoalError -> status + OpenAI-style body, in one place.

Every HTTP edge (router and controller) installs these handlers, so any
error leaves as `{"error": {"message", "type", "param", "code"}}` with the
right status, and validation failures are 400s that name the bad field.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Sequence
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.errors import ErrorCode, Overloaded, ShoalError
from shared.telemetry.logging import get_logger

log = get_logger("shoal.http")

# status, OpenAI error type
HTTP_STATUS: dict[ErrorCode, tuple[int, str]] = {
    ErrorCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    ErrorCode.NOT_FOUND: (404, "not_found_error"),
    ErrorCode.ALREADY_EXISTS: (409, "conflict_error"),
    ErrorCode.UNAUTHENTICATED: (401, "authentication_error"),
    ErrorCode.PERMISSION_DENIED: (403, "permission_error"),
    ErrorCode.FAILED_PRECONDITION: (409, "conflict_error"),
    ErrorCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    ErrorCode.UNAVAILABLE: (503, "service_unavailable_error"),
    ErrorCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
    ErrorCode.CANCELLED: (499, "cancelled_error"),
    ErrorCode.INTERNAL: (500, "internal_error"),
}

_STARLETTE_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_parts(error: ShoalError) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, OpenAI-style body, headers) of an error: Retry-After on 429/503, WWW-Authenticate on 401."""
    status, type_ = HTTP_STATUS[error.code]
    headers: dict[str, str] = {}
    if isinstance(error, Overloaded) or error.code is ErrorCode.UNAVAILABLE:
        retry_after = float(error.fields.get("retry_after_s", 1.0))
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    if error.code is ErrorCode.UNAUTHENTICATED:
        headers["WWW-Authenticate"] = "Bearer"
    param = error.fields.get("param")
    return status, error_body(error.message, type_, param, error.code.value), headers


def error_response(error: ShoalError) -> JSONResponse:
    status, body, headers = error_parts(error)
    return JSONResponse(body, status_code=status, headers=headers)


def describe_validation(errors: Sequence[Any]) -> tuple[str, str | None]:
    """A one-line message naming the bad fields of a validation failure, and the first field."""
    parts: list[str] = []
    first_param: str | None = None
    for err in errors[:5]:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "header")]
        param = ".".join(loc) or None
        first_param = first_param or param
        parts.append(f"{param or 'request'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request", first_param


def install_error_handlers(app: FastAPI) -> None:
    async def on_shoal_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ShoalError)
        if exc.code is ErrorCode.INTERNAL:
            log.error("request failed", error=exc.message)
        return error_response(exc)

    async def on_validation(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        message, param = describe_validation(exc.errors())
        return JSONResponse(error_body(message, "invalid_request_error", param, "invalid_argument"), 400)

    async def on_http(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        type_ = _STARLETTE_TYPES.get(exc.status_code, "invalid_request_error")
        return JSONResponse(error_body(str(exc.detail), type_), status_code=exc.status_code, headers=exc.headers)

    async def on_unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error", error=f"{type(exc).__name__}: {exc}")
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "internal_error"), 500)

    app.add_exception_handler(ShoalError, on_shoal_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)


def listening_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket that other processes may bind too (SO_REUSEPORT): the kernel spreads
    new connections over every process listening on the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def http_server(app: Any, host: str, port: int, graceful_s: int | None = None) -> uvicorn.Server:
    """The uvicorn server every HTTP service runs (uvloop, httptools, no access log: metrics count requests)."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        # Shoal reads no client address; the proxy-headers middleware would cost every request a layer.
        proxy_headers=False,
        timeout_graceful_shutdown=graceful_s,
    )
    return uvicorn.Server(config)
