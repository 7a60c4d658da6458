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
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

_configured: TracerProvider | None = None
_recording = False


def setup_tracing(
    service: str, otlp_endpoint: str | None, processors: list[SpanProcessor] | None = None
) -> TracerProvider:
    """Install the process's tracer provider once and return it.

    `processors` lets tests attach an in-memory exporter. Later calls return
    the provider installed first (OpenTelemetry allows one per process) and
    add any new processors to it.
    """
    global _configured, _recording
    if _configured is None:
        provider = TracerProvider(resource=Resource.create({"service.name": service}))
        if otlp_endpoint:
            provider.add_span_processor(BatchSpanProcessor(_otlp_exporter(otlp_endpoint)))
            _recording = True
        trace.set_tracer_provider(provider)
        _configured = provider
    for processor in processors or []:
        _configured.add_span_processor(processor)
        _recording = True
    return _configured


def recording() -> bool:
    """Whether spans go anywhere. Hot paths skip making spans nobody would see."""
    return _recording


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
    return [TracingServerInterceptor().interceptor]


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


class TracingServerInterceptor:
    """A server span per call, child of the caller's span (from the metadata).

    Streaming handlers get the span's context attached around each step of
    their generator, never across steps: a stream the client abandons is
    finalized in another context, where detaching a context attached earlier
    fails (the error the OpenTelemetry aio interceptor logs).
    """

    def __init__(self) -> None:
        from grpc import aio

        class _Interceptor(aio.ServerInterceptor):  # type: ignore[misc]
            async def intercept_service(self, continuation: Any, details: Any) -> Any:
                from shared.rpc.handlers import rewrap

                handler = await continuation(details)
                if handler is None:
                    return handler
                parent = extract_context({k: v for k, v in (details.invocation_metadata or ()) if isinstance(v, str)})
                return rewrap(handler, details.method, _traced_unary(parent), _traced_stream(parent))

        self.interceptor = _Interceptor()


def _traced_unary(parent: otel_context.Context) -> Any:
    def wrap(fn: Any, method: str) -> Any:
        async def call(request: Any, context: Any) -> Any:
            with tracer("shoal.rpc").start_as_current_span(method, context=parent, kind=trace.SpanKind.SERVER):
                return await fn(request, context)

        return call

    return wrap


def _traced_stream(parent: otel_context.Context) -> Any:
    def wrap(fn: Any, method: str) -> Any:
        async def call(request: Any, context: Any) -> Any:
            span = tracer("shoal.rpc").start_span(method, context=parent, kind=trace.SpanKind.SERVER)
            scope = trace.set_span_in_context(span, parent)
            stream = fn(request, context)
            try:
                while True:
                    token = otel_context.attach(scope)
                    try:
                        item = await anext(stream)
                    except StopAsyncIteration:
                        return
                    finally:
                        otel_context.detach(token)
                    yield item
            finally:
                await stream.aclose()
                span.end()

        return call

    return wrap
