"""Prometheus metrics: one registry per service object, served over HTTP.

Services build their metrics on their own `CollectorRegistry` so several
services can live in one test process. gRPC services expose it with
`serve_metrics`; HTTP services mount `render` at /metrics.
"""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, start_http_server

# Latency buckets (seconds) for request paths: sub-millisecond routing up to
# minute-long generations.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip


def new_registry() -> CollectorRegistry:
    return CollectorRegistry(auto_describe=True)


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> tuple[WSGIServer, int]:
    """Serve /metrics on a background thread; returns the server and its port."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server, int(server.server_port)


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The registry in Prometheus text format, with its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST
