"""The worker's side of the `serve` data channel: many requests on one connection.

A `ServeStream` lives as long as one channel connection (a router's). It
takes the caller's starts and cancels frame by frame, and replies with
batches of events. The engine hands each request's outputs to a sink on the
loop thread (no task or queue per request); the sink only appends to
`pending` and schedules one flush for this turn of the loop, which sends
everything pending in one frame, one event per request (outputs of several
steps merged). Under load, one frame therefore carries the tokens of every
request that produced any since the last one: frames follow engine steps,
not requests. When idle, a token goes out as soon as it exists. A request
started with `coalesce_ms` has its tokens held until that long after its
previous event (a non-streamed response needs no event per token).

While requests of the connection are in the engine, a frame also goes out at
least every HEARTBEAT_S with the engine's step count, so the caller can tell
a stalled worker (no frame, or a step count that stopped) from a slow
request. When the connection closes, everything still running on it is
aborted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from opentelemetry import trace
from outlines_core import Index

from services.worker.engines.base import Engine, KVBlock, TokenLogprob, TokenOutput
from services.worker.server import logprobs_to_wire
from shared.errors import Internal, InvalidArgument, ShoalError
from shared.rpc.channel import ServerConnection, parse
from shared.rpc.errors import to_stream_error
from shared.rpc.shoal.v1 import worker_pb2
from shared.telemetry.tracing import extract_context, tracer

if TYPE_CHECKING:
    from services.worker.server import WorkerServicer

HEARTBEAT_S = 1.0


class ServeStream:
    """One serve connection (see module doc). Created and used on the server's event loop only."""

    def __init__(self, servicer: WorkerServicer, conn: ServerConnection) -> None:
        self.servicer = servicer
        self.conn = conn
        self.engine: Engine = servicer.engine
        self.loop = asyncio.get_running_loop()
        self.pending: list[tuple[str, TokenOutput | ShoalError]] = []
        # Requests admitted to the engine and not finished.
        self.running: set[str] = set()
        # Requests importing KV before admission (P/D decode).
        self.importing: dict[str, asyncio.Task[None]] = {}
        self.spans: dict[str, trace.Span] = {}
        # Requests whose tokens are held between events: request id -> what is held.
        self.held: dict[str, _Held] = {}
        self._flush_scheduled = False
        self._heartbeat = self.loop.call_later(HEARTBEAT_S, self._beat)

    # -- reading ------------------------------------------------------------------

    def frame(self, payload: memoryview | bytearray) -> None:
        """A ServeRequest from the caller: admit its starts, apply its cancels."""
        message = parse(worker_pb2.ServeRequest(), payload)
        for start in message.starts:
            self._start(start)
        for request_id in message.cancels:
            self._cancel(request_id)

    def _start(self, start: worker_pb2.ServeStart) -> None:
        request_id = start.request.request_id
        if request_id in self.running or request_id in self.importing:
            self._emit(request_id, InvalidArgument(f"request id {request_id!r} is already running on this stream"))
            return
        decode = start.HasField("kv_source") and bool(start.kv_source.block_hashes)
        if start.trace_context:
            self.spans[request_id] = _span(start.trace_context, "Decode" if decode else "Generate")
        if decode or start.request.sampling.json_schema:
            # Importing KV and compiling a grammar take a while: the stream serves others meanwhile.
            task = asyncio.create_task(self._prepare_then_submit(start, decode))
            self.importing[request_id] = task
            return
        self._submit(start.request, [], start.coalesce_ms / 1000)

    async def _prepare_then_submit(self, start: worker_pb2.ServeStart, decode: bool) -> None:
        request_id = start.request.request_id
        try:
            blocks = await self.servicer.import_kv(start.kv_source) if decode else []
            schema = start.request.sampling.json_schema
            grammar = await self.engine.compile_grammar(schema) if schema else None
        except ShoalError as exc:
            self._emit(request_id, exc)
            return
        finally:
            self.importing.pop(request_id, None)
        self._submit(start.request, blocks, start.coalesce_ms / 1000, grammar)

    def _submit(
        self,
        request: worker_pb2.GenerateRequest,
        imported: list[KVBlock],
        coalesce_s: float,
        grammar: Index | None = None,
    ) -> None:
        request_id = request.request_id
        try:
            engine_request = self.servicer.engine_request(request, imported)
            engine_request.grammar = grammar
            done = self.servicer.already_done(engine_request)
            if done is not None:
                self._emit(request_id, done)
                return
            if coalesce_s > 0:
                self.held[request_id] = _Held(coalesce_s, time.monotonic())
            self.engine.submit(engine_request, lambda item: self._output(request_id, item))
        except ShoalError as exc:
            self.held.pop(request_id, None)
            self._emit(request_id, exc)
            return
        self.running.add(request_id)

    def _cancel(self, request_id: str) -> None:
        if request_id in self.running:
            self.engine.abort(request_id)
        task = self.importing.pop(request_id, None)
        if task is not None:
            task.cancel()
            self._emit(request_id, InvalidArgument("cancelled by the caller"))

    # -- outputs ------------------------------------------------------------------

    def _output(self, request_id: str, item: TokenOutput | BaseException) -> None:
        """The engine's sink for one request (loop thread)."""
        if isinstance(item, BaseException):
            error = item if isinstance(item, ShoalError) else Internal(f"{type(item).__name__}: {item}")
            self._emit(request_id, error)
            return
        held = self.held.get(request_id)
        if held is not None:
            held.token_ids.extend(item.token_ids)
            held.logprobs.extend(item.logprobs)
            held.text += item.text
            now = time.monotonic()
            if item.finish is None and now - held.since < held.window_s:
                return
            item.token_ids, item.logprobs, item.text = held.token_ids, held.logprobs, held.text
            held.token_ids, held.logprobs, held.text, held.since = [], [], "", now
        self._emit(request_id, item)

    def _emit(self, request_id: str, item: TokenOutput | ShoalError) -> None:
        if isinstance(item, ShoalError) or item.finish is not None:
            self.running.discard(request_id)
            self.held.pop(request_id, None)
            span = self.spans.pop(request_id, None)
            if span is not None:
                span.end()
        self.pending.append((request_id, item))
        self._schedule()

    def _schedule(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _beat(self) -> None:
        if self.running or self.importing:
            self._schedule()
        self._heartbeat = self.loop.call_later(HEARTBEAT_S, self._beat)

    # -- writing ------------------------------------------------------------------

    def _flush(self) -> None:
        """Send what is pending (or, from the heartbeat, the step count alone) in one frame."""
        self._flush_scheduled = False
        self.conn.send(self._reply().SerializeToString())

    def _reply(self) -> worker_pb2.ServeResponse:
        pending, self.pending = self.pending, []
        reply = worker_pb2.ServeResponse(engine_steps=self.engine.step_count, in_engine=len(self.running))
        events: dict[str, worker_pb2.StreamEvent] = {}  # one event per request: several steps merged
        for request_id, item in pending:
            event = events.get(request_id)
            if event is None:
                event = events[request_id] = reply.events.add()
                event.request_id = request_id
            if isinstance(item, ShoalError):
                to_stream_error(item, event.error)
                continue
            event.token_ids.extend(item.token_ids)
            if item.logprobs:
                event.logprobs.extend(logprobs_to_wire(item.logprobs))
            event.text += item.text
            if item.finish is not None:
                self.servicer.finish_fields(item, event)
        return reply

    def closed(self, error: Exception | None) -> None:
        """The connection ended: abort what still runs on it."""
        self._heartbeat.cancel()
        for request_id in self.running:
            self.engine.abort(request_id)
        self.running.clear()
        for task in self.importing.values():
            task.cancel()
        for span in self.spans.values():
            span.end()
        self.spans.clear()


class _Held:
    """Tokens of one request held since its previous event (see `coalesce_ms`)."""

    __slots__ = ("logprobs", "since", "text", "token_ids", "window_s")

    def __init__(self, window_s: float, since: float) -> None:
        self.window_s = window_s
        self.since = since
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.text = ""


def _span(context: Mapping[str, str], kind: str) -> trace.Span:
    """A request's span, child of the caller's (the stream's own span belongs to no request)."""
    return tracer("shoal.rpc").start_span(
        f"/shoal.v1.Worker/Serve {kind}", context=extract_context(dict(context)), kind=trace.SpanKind.SERVER
    )
