"""The error taxonomy on gRPC: ShoalError <-> status code, in one place.

Servers raise `ShoalError`s; `ErrorInterceptor` turns them into a status with
the message, plus trailing metadata `shoal-error` (the taxonomy code) and
`shoal-retry-after` when set. Anything else a handler raises becomes INTERNAL
with the exception's type and message (and a logged stack), never a bare
"Unexpected error". Clients turn an `AioRpcError` back with `from_rpc_error`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc import aio

from shared.errors import ErrorCode, Internal, Overloaded, ShoalError, error_for
from shared.rpc.handlers import WrappingInterceptor
from shared.rpc.shoal.v1 import worker_pb2
from shared.telemetry.logging import get_logger

log = get_logger("shoal.rpc.errors")

TO_STATUS: dict[ErrorCode, grpc.StatusCode] = {
    ErrorCode.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    ErrorCode.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorCode.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    ErrorCode.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorCode.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorCode.CANCELLED: grpc.StatusCode.CANCELLED,
    ErrorCode.INTERNAL: grpc.StatusCode.INTERNAL,
}
FROM_STATUS: dict[grpc.StatusCode, ErrorCode] = {status: code for code, status in TO_STATUS.items()}
# Statuses with no taxonomy twin.
FROM_STATUS[grpc.StatusCode.UNKNOWN] = ErrorCode.INTERNAL
FROM_STATUS[grpc.StatusCode.ABORTED] = ErrorCode.UNAVAILABLE
FROM_STATUS[grpc.StatusCode.OUT_OF_RANGE] = ErrorCode.INVALID_ARGUMENT
FROM_STATUS[grpc.StatusCode.UNIMPLEMENTED] = ErrorCode.FAILED_PRECONDITION
FROM_STATUS[grpc.StatusCode.DATA_LOSS] = ErrorCode.INTERNAL

_CODE_KEY = "shoal-error"
_RETRY_KEY = "shoal-retry-after"


def _trailers(error: ShoalError) -> tuple[tuple[str, str], ...]:
    pairs = [(_CODE_KEY, error.code.value)]
    if isinstance(error, Overloaded):
        pairs.append((_RETRY_KEY, f"{error.retry_after_s:g}"))
    return tuple(pairs)


async def abort(context: aio.ServicerContext[Any, Any], error: ShoalError) -> None:
    """End the call with `error`'s status, message and trailers."""
    context.set_trailing_metadata(_trailers(error))
    await context.abort(TO_STATUS[error.code], error.message)


def from_rpc_error(exc: grpc.RpcError, target: str = "") -> ShoalError:
    """The taxonomy error a failed call stands for (`target` names the peer)."""
    status = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else None) or str(status)
    trailers = dict(exc.trailing_metadata() or ()) if hasattr(exc, "trailing_metadata") else {}
    code = FROM_STATUS.get(status, ErrorCode.INTERNAL)
    if _CODE_KEY in trailers:
        code = ErrorCode(str(trailers[_CODE_KEY]))
    fields: dict[str, Any] = {"peer": target} if target else {}
    if code is ErrorCode.RESOURCE_EXHAUSTED:
        return Overloaded(details, retry_after_s=float(trailers.get(_RETRY_KEY, 1.0)), **fields)
    return error_for(code, details, **fields)


def to_stream_error(error: ShoalError, out: worker_pb2.StreamError) -> None:
    """Write `error` into a Serve stream event's error field (a request failed, not the stream)."""
    out.code = error.code.value
    out.message = error.message
    if isinstance(error, Overloaded):
        out.retry_after_s = error.retry_after_s
    param = error.fields.get("param")
    if isinstance(param, str):
        out.param = param


def from_stream_error(error: worker_pb2.StreamError, target: str = "") -> ShoalError:
    """The taxonomy error a Serve stream event's error field stands for."""
    fields: dict[str, Any] = {"peer": target} if target else {}
    if error.param:
        fields["param"] = error.param
    try:
        code = ErrorCode(error.code)
    except ValueError:
        code = ErrorCode.INTERNAL
    if code is ErrorCode.RESOURCE_EXHAUSTED:
        return Overloaded(error.message, retry_after_s=error.retry_after_s or 1.0, **fields)
    return error_for(code, error.message, **fields)


class ErrorInterceptor(WrappingInterceptor):
    """Maps exceptions raised by any handler to gRPC statuses (see module doc)."""

    def wrap_unary(self, fn: Any, method: str) -> Any:
        return _wrap_unary(fn, method)

    def wrap_stream(self, fn: Any, method: str) -> Any:
        return _wrap_stream(fn, method)


async def _map(context: aio.ServicerContext[Any, Any], method: str, exc: Exception) -> None:
    if not isinstance(exc, ShoalError):
        log.exception("rpc raised an unexpected exception", method=method)
        exc = Internal(f"internal error in {method}: {type(exc).__name__}: {exc}")
    elif exc.code is ErrorCode.INTERNAL:
        log.error("rpc failed", method=method, error=exc.message)
    await abort(context, exc)


def _wrap_unary(fn: Any, method: str) -> Any:
    async def wrapper(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await fn(request, context)
        except Exception as exc:
            if _is_abort(exc):
                raise
            await _map(context, method, exc)

    return wrapper


def _wrap_stream(fn: Any, method: str) -> Any:
    async def wrapper(request: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        try:
            async for item in fn(request, context):
                yield item
        except Exception as exc:
            if _is_abort(exc):
                raise
            await _map(context, method, exc)

    return wrapper


def _is_abort(exc: BaseException) -> bool:
    # context.abort() raises an internal exception that must pass through.
    return type(exc).__name__ == "AbortError"
