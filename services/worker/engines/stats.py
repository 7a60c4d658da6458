"""Sliding-window statistics an engine reports: rates, latency quantiles, expert load.

Written by the engine thread, read by the asyncio loop (heartbeats, RPCs).
Each structure holds its own lock, so readers never see a half update.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np


class RateWindow:
    """Events per second over the last `horizon_s` seconds."""

    def __init__(self, horizon_s: float = 10.0) -> None:
        self.horizon_s = horizon_s
        self._events: deque[tuple[float, int]] = deque()
        self._total = 0
        self._lock = threading.Lock()

    def add(self, count: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._events.append((now, count))
            self._total += count
            self._trim(now)

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._trim(now)
            return self._total / self.horizon_s

    def _trim(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self.horizon_s:
            self._total -= self._events.popleft()[1]


class QuantileWindow:
    """Quantiles of the most recent `size` samples."""

    def __init__(self, size: int = 2000) -> None:
        self._samples: deque[float] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, value: float) -> None:
        with self._lock:
            self._samples.append(value)

    def quantile(self, q: float) -> float:
        with self._lock:
            if not self._samples:
                return 0.0
            return float(np.quantile(np.fromiter(self._samples, dtype=np.float64), q))


class ExpertLoadWindow:
    """Routed tokens per (layer, expert), kept in one-second buckets over `horizon_s`."""

    def __init__(self, num_layers: int, num_experts: int, horizon_s: float = 600.0, bucket_s: float = 1.0) -> None:
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.horizon_s = horizon_s
        self.bucket_s = bucket_s
        self._buckets: deque[tuple[float, np.ndarray]] = deque()
        self._lock = threading.Lock()

    def add(self, counts: np.ndarray, now: float | None = None) -> None:
        """Add a [layers, experts] array of token counts from one step."""
        now = time.monotonic() if now is None else now
        start = now - now % self.bucket_s
        with self._lock:
            if self._buckets and self._buckets[-1][0] == start:
                self._buckets[-1][1][...] += counts
            else:
                self._buckets.append((start, counts.astype(np.int64, copy=True)))
            while self._buckets and self._buckets[0][0] < now - self.horizon_s:
                self._buckets.popleft()

    def totals(self, window_s: float = 0.0, now: float | None = None) -> tuple[np.ndarray, float]:
        """Summed counts over the last `window_s` seconds (0 = whole horizon) and the span covered."""
        now = time.monotonic() if now is None else now
        span = self.horizon_s if window_s <= 0 else min(window_s, self.horizon_s)
        total = np.zeros((self.num_layers, self.num_experts), dtype=np.int64)
        oldest = now
        with self._lock:
            for start, counts in self._buckets:
                if start >= now - span:
                    total += counts
                    oldest = min(oldest, start)
        return total, max(now - oldest, 0.0)
