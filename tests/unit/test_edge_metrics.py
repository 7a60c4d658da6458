"""The OpenAI edge's per-request timings: time between tokens is measured within each choice."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry

from shared.openai.completions import EdgeMetrics, _Tracked
from shared.openai.jobs import Chunk
from shared.telemetry.loopmetrics import LoopMetrics

pytestmark = pytest.mark.unit


def test_tokens_of_interleaved_choices_are_timed_against_their_own_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = CollectorRegistry()
    tracked = _Tracked(EdgeMetrics(LoopMetrics(registry), "edge"), "chat")
    tracked.model = "m"
    clock = iter([10.0, 10.5, 11.0, 11.5, 12.0])  # choice 0 at 10, 11, 12; choice 1 at 10.5, 11.5
    monkeypatch.setattr("shared.openai.completions.time", SimpleNamespace(monotonic=lambda: next(clock)))
    for index in (0, 1, 0, 1, 0):
        tracked.chunk(Chunk(text="x", tokens=1, index=index))
    labels = {"model": "m"}
    # Gaps within a choice: 1 s each, three of them (a choice's first token is no gap).
    assert registry.get_sample_value("edge_tbt_seconds_count", labels) == 3
    assert registry.get_sample_value("edge_tbt_seconds_sum", labels) == pytest.approx(3.0)
    assert registry.get_sample_value("edge_ttft_seconds_count", labels) == 1
    assert tracked.completion_tokens == 5
