"""The worker's Prometheus metrics, fed by the engine's observer hooks."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from services.worker.engines.base import Finish
from services.worker.engines.engine import EngineObserver
from shared.telemetry.metrics import LATENCY_BUCKETS
from shared.types.pools import SLO
from shared.types.workers import WorkerLoad


class _LoadCollector(Collector):
    def __init__(self, load: Callable[[], WorkerLoad]) -> None:
        self._load = load

    def collect(self) -> Iterator[GaugeMetricFamily]:
        load = self._load()
        yield GaugeMetricFamily("shoal_worker_running_requests", "Requests being decoded", load.running_requests)
        yield GaugeMetricFamily("shoal_worker_waiting_requests", "Requests queued", load.waiting_requests)
        yield GaugeMetricFamily("shoal_worker_kv_blocks_used", "KV blocks held by requests", load.kv_blocks_used)
        yield GaugeMetricFamily("shoal_worker_kv_blocks_total", "KV blocks in the cache", load.kv_blocks_total)
        yield GaugeMetricFamily("shoal_worker_draining", "1 while draining", float(load.draining))
        yield GaugeMetricFamily(
            "shoal_worker_decode_tokens_per_second", "Decode throughput, recent", load.decode_tokens_per_s
        )


class WorkerMetrics(EngineObserver):
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        # The pool's SLO (its p90 targets), refreshed from its document: a pool meets its SLO when 90% of
        # first tokens and of token gaps are within target, so each event is counted met or missed and the
        # alert rules turn the counts into burn rates (deploy/helm/shoal/monitoring/alerts.yaml). The pool
        # comes from the scrape as a target label, like the worker's id.
        self.slo = SLO()
        slo_events = Counter(
            "shoal_worker_slo_events",
            "First tokens (slo=ttft) and token gaps (slo=tbt) within (met) or over (missed) the pool's SLO target",
            ["slo", "result"],
            registry=registry,
        )
        self._ttft_events = (slo_events.labels("ttft", "met"), slo_events.labels("ttft", "missed"))
        self._tbt_events = (slo_events.labels("tbt", "met"), slo_events.labels("tbt", "missed"))
        self.step_seconds = Histogram(
            "shoal_worker_step_seconds", "Engine step duration", buckets=LATENCY_BUCKETS, registry=registry
        )
        self.ttft_seconds = Histogram(
            "shoal_worker_ttft_seconds", "Arrival to first token", buckets=LATENCY_BUCKETS, registry=registry
        )
        self.tbt_seconds = Histogram(
            "shoal_worker_tbt_seconds", "Time between tokens", buckets=LATENCY_BUCKETS, registry=registry
        )
        self.requests = Counter(
            "shoal_worker_requests", "Finished requests by finish reason", ["finish"], registry=registry
        )
        self.tokens = Counter("shoal_worker_tokens", "Tokens by kind", ["kind"], registry=registry)
        self.kv_imports = Counter(
            "shoal_worker_kv_imports",
            "P/D KV imports by result (imported, fallback)",
            ["result"],
            registry=registry,
        )
        self.expert_bytes = Counter(
            "shoal_worker_expert_bytes",
            "Expert weight bytes moved by live migration (staged, released, discarded), all ranks",
            ["action"],
            registry=registry,
        )
        self.expert_commit_stall = Histogram(
            "shoal_worker_expert_commit_stall_seconds",
            "Serving pause while every rank switched expert maps",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.expert_regroup_stall = Histogram(
            "shoal_worker_expert_regroup_stall_seconds",
            "Serving pause while the ranks regrouped into a larger or smaller instance (KV copy included)",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.expert_ranks = Gauge(
            "shoal_worker_expert_ranks", "Ranks this expert-parallel instance spans", registry=registry
        )
        self.expert_balance = Gauge(
            "shoal_worker_expert_balance",
            "Max / mean routed tokens per rank over the stats window, per MoE layer (1 is perfect)",
            ["layer"],
            registry=registry,
        )
        # Every known label value exported from the start, at zero: a dashboard's or alert's rate() of a
        # counter that has never moved is 0, not "no data".
        for counter, values in (
            (self.requests, [finish.value for finish in Finish]),
            (self.tokens, ["prompt", "generated", "cached"]),
            (self.kv_imports, ["imported", "fallback"]),
            (self.expert_bytes, ["staged", "released", "discarded"]),
        ):
            for value in values:
                counter.labels(value)

    def watch_load(self, load: Callable[[], WorkerLoad]) -> None:
        self.registry.register(_LoadCollector(load))

    def on_step(self, seconds: float, items: int, prefill_tokens: int, decode_tokens: int) -> None:
        self.step_seconds.observe(seconds)

    def on_first_token(self, seconds: float) -> None:
        self.ttft_seconds.observe(seconds)
        self._ttft_events[seconds > self.slo.ttft_p90_s].inc()

    def on_token_gap(self, seconds: float) -> None:
        self.tbt_seconds.observe(seconds)
        self._tbt_events[seconds > self.slo.tbt_p90_s].inc()

    def on_finish(self, finish: Finish, prompt_tokens: int, generated_tokens: int, cached_tokens: int) -> None:
        self.requests.labels(finish.value).inc()
        self.tokens.labels("prompt").inc(prompt_tokens)
        self.tokens.labels("generated").inc(generated_tokens)
        self.tokens.labels("cached").inc(cached_tokens)
