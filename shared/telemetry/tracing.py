"""Tracing: an OpenTelemetry tracer provider per process, and propagation.

Spans are exported over OTLP/gRPC when `SHOAL_OTLP_ENDPOINT` is set. Context
crosses gRPC through the interceptors from `grpc_server_interceptors` and
`grpc_client_interceptors`, and HTTP through W3C `traceparent` headers
(`inject_headers` / FastAPI instrumentation), so one request is one trace from
the router through prefill, kvstore and decode.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

_configured: TracerProvider | None = None


def setup_tracing(
    service: str, otlp_endpoint: str | None, processors: list[SpanProcessor] | None = None
) -> TracerProvider:
    """Install the process's tracer provider once and return it.

    `processors` lets tests attach an in-memory exporter. Later calls return
    the provider installed first (OpenTelemetry allows one per process) and
    add any new processors to it.
    """
    global _configured
    if _configured is None:
        provider = TracerProvider(resource=Resource.create({"service.name": service}))
        if otlp_endpoint:
            provider.add_span_processor(BatchSpanProcessor(_otlp_exporter(otlp_endpoint)))
        trace.set_tracer_provider(provider)
        _configured = provider
    for processor in processors or []:
        _configured.add_span_processor(processor)
    return _configured


def _otlp_exporter(endpoint: str) -> SpanExporter:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))


def shutdown_tracing() -> None:
    """Flush and stop exporting (called on service shutdown)."""
    if _configured is not None:
        _configured.force_flush(timeout_millis=2000)


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def grpc_server_interceptors() -> list[Any]:
    return [aio_server_interceptor()]  # type: ignore[no-untyped-call]


def grpc_client_interceptors() -> list[Any]:
    """Propagate the caller's trace context on every call of a channel.

    No client span is made per call: the callee's server span is a child of
    the caller's current span directly. On the router's hot path the extra
    span per request cost more than everything else it does but the HTTP
    framework itself.
    """
    from shared.rpc.metadata import metadata_interceptors

    return list(metadata_interceptors(_trace_context))


def _trace_context() -> list[tuple[str, str]]:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return list(carrier.items())


def inject_headers(headers: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """Add the current trace context to outgoing HTTP or Celery headers."""
    propagate.inject(headers)
    return headers


def extract_context(headers: Mapping[str, str]) -> otel_context.Context:
    """The trace context carried by incoming headers."""
    return propagate.extract(headers)
