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

from shared.rpc.metadata import metadata_interceptors

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


def token_client_interceptors(token: str) -> list[aio.ClientInterceptor]:
    """Interceptors that add the shared token to every call of a channel."""
    header = [("authorization", f"Bearer {token}")]
    return metadata_interceptors(lambda: header)
