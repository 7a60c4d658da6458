"""Client interceptors that add metadata to every call of a channel (tokens, trace context)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from grpc import aio

Pairs = Callable[[], Iterable[tuple[str, str]]]


def _with(details: Any, pairs: Iterable[tuple[str, str]]) -> Any:
    extra = list(pairs)
    if not extra:
        return details
    metadata = aio.Metadata(*(details.metadata or ()))
    for key, value in extra:
        metadata.add(key, value)
    return aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials, details.wait_for_ready)


class _UnaryUnary(aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, pairs: Pairs) -> None:
        self._pairs = pairs

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with(details, self._pairs()), request)


class _UnaryStream(aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, pairs: Pairs) -> None:
        self._pairs = pairs

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with(details, self._pairs()), request)


class _StreamUnary(aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, pairs: Pairs) -> None:
        self._pairs = pairs

    async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(_with(details, self._pairs()), request_iterator)


class _StreamStream(aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, pairs: Pairs) -> None:
        self._pairs = pairs

    async def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(_with(details, self._pairs()), request_iterator)


def metadata_interceptors(pairs: Pairs) -> list[aio.ClientInterceptor]:
    """Interceptors adding `pairs()` (evaluated per call) to the metadata of every kind of call."""
    return [_UnaryUnary(pairs), _UnaryStream(pairs), _StreamUnary(pairs), _StreamStream(pairs)]
