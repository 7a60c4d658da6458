"""The router's Prometheus metrics, kept as loop metrics (updated on the request path without locks)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from services.router.keys import KeyMetrics
from shared.openai.completions import EdgeMetrics
from shared.telemetry.loopmetrics import LoopMetrics


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        metrics = LoopMetrics(registry)
        self.keys = KeyMetrics(metrics)
        # Requests, TTFT, TBT, end to end and tokens, as the OpenAI endpoints measure them.
        self.edge = EdgeMetrics(metrics, "shoal_router")
        self.decisions = metrics.counter(
            "shoal_router_routing_decisions",
            "Routing decisions by model, phase and reason",
            ["model", "phase", "reason"],
        )
        self.retries = metrics.counter(
            "shoal_router_retries", "Requests moved to another worker (retry before, resume after a token)", ["kind"]
        )
        self.pd = metrics.counter("shoal_router_pd", "P/D hand-offs by outcome", ["outcome"])
        self.kv_source = metrics.counter("shoal_router_kv_imports", "Requests told to import KV, by source", ["source"])
        self.pins = metrics.counter(
            "shoal_router_session_pins", "Session prefixes copied to the kvstore and pinned, by outcome", ["outcome"]
        )
        self.inflight = metrics.gauge("shoal_router_inflight_requests", "Requests in flight")
        self.stalls = metrics.counter(
            "shoal_router_worker_stalls", "Workers found stalled (no engine progress while holding requests)"
        )
        # Every known label value exported from the start, at zero: a dashboard's or alert's rate() of a
        # counter that has never moved is 0, not "no data".
        for counter, values in (
            (self.retries, ["retry", "resume"]),
            (self.pd, ["disaggregated", "prefill-failed"]),
            (self.kv_source, ["kvstore"]),
            (self.pins, ["stored", "failed"]),
        ):
            for value in values:
                counter.labels(value)
