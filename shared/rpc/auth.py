"""Shared-token authentication for internal gRPC.

When `SHOAL_INTERNAL_TOKEN` is set, every call must carry
`authorization: Bearer <token>`; the health and reflection services stay open
so Kubernetes probes and grpcurl work without it. The comparison is
constant-time. Clients add the header with `TokenClientInterceptor`s.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

_OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def _deny(message: str) -> grpc.RpcMethodHandler:
    async def abort(_request: Any, context: aio.ServicerContext[Any, Any]) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return grpc.unary_unary_rpc_method_handler(abort)


class TokenAuthInterceptor(aio.ServerInterceptor):
    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if handler_call_details.method.startswith(_OPEN_PREFIXES):
            return await continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        presented = str(metadata.get("authorization", "")).encode()
        if not presented:
            return _deny("missing authorization metadata: send 'authorization: Bearer <SHOAL_INTERNAL_TOKEN>'")
        if not hmac.compare_digest(presented, self._expected):
            return _deny("invalid internal token")
        return await continuation(handler_call_details)


def _with_token(details: aio.ClientCallDetails, header: tuple[str, str]) -> aio.ClientCallDetails:
    metadata = aio.Metadata(*(details.metadata or ()))
    metadata.add(*header)
    return aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials, details.wait_for_ready)


class _TokenBase:
    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")


class _UnaryUnary(_TokenBase, aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_token(details, self._header), request)


class _UnaryStream(_TokenBase, aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_token(details, self._header), request)


class _StreamUnary(_TokenBase, aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(_with_token(details, self._header), request_iterator)


class _StreamStream(_TokenBase, aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(_with_token(details, self._header), request_iterator)


def token_client_interceptors(token: str) -> list[aio.ClientInterceptor]:
    """Interceptors that add the shared token to every call of a channel."""
    return [_UnaryUnary(token), _UnaryStream(token), _StreamUnary(token), _StreamStream(token)]
