"""Rebuilding a gRPC method handler around wrapped behaviour (for server interceptors)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

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
