"""A trace begun in one service continues as a child span in another, over gRPC."""

from __future__ import annotations

from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared.config import EngineKind
from shared.rpc.worker_client import WorkerClient
from shared.telemetry.tracing import setup_tracing
from tests.support.pki import as_controller
from tests.support.services import running_worker

pytestmark = pytest.mark.integration


async def test_worker_span_is_a_child_of_the_callers_span(redis_url: str, tiny_model: Path) -> None:
    exporter = InMemorySpanExporter()
    setup_tracing("test", None, [SimpleSpanProcessor(exporter)])
    async with running_worker(redis_url, engine=EngineKind.SIM, model_path=tiny_model) as app:
        client = WorkerClient(app.address, as_controller())
        with trace.get_tracer("router").start_as_current_span("route request") as root:
            await client.get_load()
        await client.close()
    spans = exporter.get_finished_spans()
    server = [s for s in spans if s.kind is trace.SpanKind.SERVER and s.name.endswith("/GetLoad")]
    assert server, [s.name for s in spans]
    root_ctx = root.get_span_context()
    assert server[0].context.trace_id == root_ctx.trace_id
    # The worker's server span is a child of the caller's span across the process boundary.
    assert server[0].parent is not None
    assert server[0].parent.span_id == root_ctx.span_id
    assert server[0].parent.is_remote
