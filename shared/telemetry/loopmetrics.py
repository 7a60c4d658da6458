"""Prometheus metrics for one event loop's hot path: counters, gauges and histograms without locks.

prometheus_client takes a lock on every update and finds a histogram's
bucket by scanning its bounds in Python; on the router's path (several
updates per request, one per streamed token) that cost more than routing the
request. These keep plain numbers, updated only from the thread that owns
them (one asyncio loop: not thread-safe, by design), and are read at scrape
time by a collector registered on the service's registry, so /metrics shows
them exactly as it shows prometheus_client's own (same names, types,
labels and buckets). A scrape served by the same loop sees a consistent
state.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector


class _Value:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def set(self, value: float) -> None:
        self.value = value


class _Family:
    def __init__(self, name: str, documentation: str, labelnames: Sequence[str]) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.children: dict[tuple[str, ...], _Value] = {}
        self._unlabelled = _Value() if not labelnames else None
        if self._unlabelled is not None:
            self.children[()] = self._unlabelled

    def labels(self, *values: str) -> _Value:
        child = self.children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
            child = self.children[values] = _Value()
        return child

    def _one(self) -> _Value:
        if self._unlabelled is None:
            raise ValueError(f"{self.name} has labels {self.labelnames}: use .labels(...)")
        return self._unlabelled


class LoopCounter(_Family):
    def inc(self, amount: float = 1.0) -> None:
        self._one().value += amount

    def metric(self) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, child in self.children.items():
            family.add_metric(list(labels), child.value)
        return family


class LoopGauge(_Family):
    def set(self, value: float) -> None:
        self._one().value = value

    def metric(self) -> Metric:
        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, child in self.children.items():
            family.add_metric(list(labels), child.value)
        return family


class _Buckets:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: list[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        out, total = [], 0
        for bound, count in zip([*self.bounds, float("inf")], self.counts, strict=True):
            total += count
            out.append((_bound(bound), float(total)))
        return out


class LoopHistogram:
    """A histogram: `observe` is one bisect and two additions (on a child, with labels)."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float], labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = sorted(buckets)
        self.labelnames = tuple(labelnames)
        self.children: dict[tuple[str, ...], _Buckets] = {}
        if not labelnames:
            self.children[()] = _Buckets(self.bounds)

    def labels(self, *values: str) -> _Buckets:
        child = self.children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
            child = self.children[values] = _Buckets(self.bounds)
        return child

    def _one(self) -> _Buckets:
        if self.labelnames:
            raise ValueError(f"{self.name} has labels {self.labelnames}: use .labels(...)")
        return self.children[()]

    def observe(self, value: float) -> None:
        self._one().observe(value)

    @property
    def count(self) -> int:
        return sum(child.count for child in self.children.values())

    def metric(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, child in self.children.items():
            family.add_metric(list(labels), child.cumulative(), child.sum)
        return family


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(float(value))


_LoopMetric = LoopCounter | LoopGauge | LoopHistogram
M = TypeVar("M", LoopCounter, LoopGauge, LoopHistogram)


class LoopMetrics(Collector):
    """The loop metrics of one service, registered as one collector."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._metrics: list[_LoopMetric] = []
        registry.register(self)

    def counter(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> LoopCounter:
        # prometheus_client appends _total to counters; the family name is without it.
        return self._add(LoopCounter(name, documentation, labelnames))

    def gauge(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> LoopGauge:
        return self._add(LoopGauge(name, documentation, labelnames))

    def histogram(
        self, name: str, documentation: str, buckets: Sequence[float], labelnames: Sequence[str] = ()
    ) -> LoopHistogram:
        return self._add(LoopHistogram(name, documentation, buckets, labelnames))

    def _add(self, metric: M) -> M:
        self._metrics.append(metric)
        return metric

    def collect(self) -> Iterator[Metric]:
        for metric in self._metrics:
            yield metric.metric()
