"""Rebuilding a gRPC method handler around wrapped behaviour (for server interceptors)."""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

Wrap = Callable[[Any, str], Any]
"""(the handler's behaviour function, the method name) -> a replacement with the same signature."""


def rewrap(handler: grpc.RpcMethodHandler, method: str, unary: Wrap, stream: Wrap) -> grpc.RpcMethodHandler:
    """The same handler with its behaviour passed through `unary` or `stream` (by response kind)."""
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary, method), **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream(handler.unary_stream, method), **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary, method), **kwargs)
    return grpc.stream_stream_rpc_method_handler(stream(handler.stream_stream, method), **kwargs)


class WrappingInterceptor(aio.ServerInterceptor, abc.ABC):
    """A server interceptor that wraps the behaviour of every handler except those of `skip`'s prefixes."""

    skip: tuple[str, ...] = ()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(self.skip):
            return handler
        return rewrap(handler, handler_call_details.method, self.wrap_unary, self.wrap_stream)

    @abc.abstractmethod
    def wrap_unary(self, fn: Any, method: str) -> Any:
        """A replacement for a unary-response behaviour `fn`."""

    @abc.abstractmethod
    def wrap_stream(self, fn: Any, method: str) -> Any:
        """A replacement for a streaming-response behaviour `fn` (an async generator)."""
