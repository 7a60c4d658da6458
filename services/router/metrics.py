"""The router's Prometheus metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shared.telemetry.metrics import LATENCY_BUCKETS


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "shoal_router_requests", "Requests by endpoint and HTTP status", ["endpoint", "status"], registry=registry
        )
        self.ttft = Histogram(
            "shoal_router_ttft_seconds", "Request arrival to first token", buckets=LATENCY_BUCKETS, registry=registry
        )
        self.tbt = Histogram(
            "shoal_router_tbt_seconds", "Time between streamed tokens", buckets=LATENCY_BUCKETS, registry=registry
        )
        self.e2e = Histogram(
            "shoal_router_e2e_seconds", "Request arrival to last token", buckets=LATENCY_BUCKETS, registry=registry
        )
        self.decisions = Counter(
            "shoal_router_routing_decisions",
            "Routing decisions by phase and reason",
            ["phase", "reason"],
            registry=registry,
        )
        self.retries = Counter(
            "shoal_router_retries",
            "Requests moved to another worker (retry before, resume after a token)",
            ["kind"],
            registry=registry,
        )
        self.pd = Counter("shoal_router_pd", "P/D hand-offs by outcome", ["outcome"], registry=registry)
        self.kv_source = Counter(
            "shoal_router_kv_imports", "Requests told to import KV, by source", ["source"], registry=registry
        )
        self.pins = Counter(
            "shoal_router_session_pins",
            "Session prefixes copied to the kvstore and pinned, by outcome",
            ["outcome"],
            registry=registry,
        )
        self.inflight = Gauge("shoal_router_inflight_requests", "Requests in flight", registry=registry)
        self.tokens = Counter("shoal_router_tokens", "Tokens by kind", ["kind"], registry=registry)
