"""The caller's side of a worker's `serve` data channel (the router's request path).

A `ServeSession` is one long-lived channel connection to one worker, shared
by every request the caller sends there (protos/shoal/v1/worker.proto,
ServeRequest one way and ServeResponse the other). `start` queues a request
and returns its `RequestStream`, an async iterator of the request's events.
Everything queued during one turn of the event loop leaves in one frame, so
an idle session sends each request at once and a busy one batches them; each
reply frame's events go to their streams. Closing a stream that has not
finished sends a cancel, which aborts the request on the worker.

Failures are per session. When the connection breaks (the worker died or
restarted) or cannot be opened, every stream on it fails with UNAVAILABLE and
the next `start` opens a new one. A worker that holds requests of the
session in its engine and makes no progress for `stall_s` seconds (no reply
at all, or replies whose engine step count stopped) is stalled: the session
breaks the same way, so callers resume the requests elsewhere. A request
still running at its deadline fails with DEADLINE_EXCEEDED. Everything runs
on one event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Mapping

from shared.errors import DeadlineExceeded, ShoalError, Unavailable
from shared.rpc.channel import ClientConnection, connect, parse
from shared.rpc.errors import from_stream_error
from shared.rpc.security import Role, RpcSecurity
from shared.rpc.shoal.v1 import common_pb2, worker_pb2
from shared.telemetry.logging import get_logger

log = get_logger("shoal.rpc.serve")

CHANNEL = "serve"
DEFAULT_STALL_S = 10.0
_UNFINISHED = common_pb2.FINISH_REASON_UNSPECIFIED


class RequestStream:
    """One request's events on a shared session. Iterate it; `close` it when done."""

    __slots__ = ("_error", "_events", "_session", "_waiter", "deadline", "finished", "request_id")

    def __init__(self, request_id: str, session: ServeSession, deadline: float) -> None:
        self.request_id = request_id
        self._session = session
        # time.monotonic() by which the request must have finished (checked with the stall watchdog).
        self.deadline = deadline
        self._events: deque[worker_pb2.StreamEvent] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._error: ShoalError | None = None
        # The request ended (finish reason or error); nothing more will come.
        self.finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> worker_pb2.StreamEvent:
        while not self._events:
            if self._error is not None:
                self.finished = True
                raise self._error
            if self.finished:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        event = self._events.popleft()
        if event.HasField("error"):
            self.finished = True
            raise from_stream_error(event.error, self._session.address)
        if event.finish_reason != _UNFINISHED:
            self.finished = True
        return event

    def close(self) -> None:
        """Stop listening; a request that has not finished is cancelled on the worker."""
        self._session.forget(self)

    def _push(self, event: worker_pb2.StreamEvent) -> None:
        self._events.append(event)
        self._wake()

    def _fail(self, error: ShoalError) -> None:
        self._error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def _final(event: worker_pb2.StreamEvent) -> bool:
    return event.finish_reason != _UNFINISHED or event.HasField("error")


class ServeSession:
    """The serve channel to one worker, opened on first use and reopened after it breaks."""

    def __init__(
        self,
        address: str,
        security: RpcSecurity,
        stall_s: float = DEFAULT_STALL_S,
        on_stall: Callable[[], None] | None = None,
    ) -> None:
        # The worker's data address (host:port of its data channels).
        self.address = address
        self.security = security
        self.stall_s = stall_s
        self.on_stall = on_stall
        self._streams: dict[str, RequestStream] = {}
        self._conn: ClientConnection | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._outbox = worker_pb2.ServeRequest()
        self._flush_scheduled = False
        self._watchdog: asyncio.TimerHandle | None = None
        self._last_progress = time.monotonic()
        self._last_steps = -1
        self.broken = 0  # connections that broke (worker gone or stalled), for metrics and tests

    @property
    def active(self) -> int:
        """Requests on the session that have not finished."""
        return len(self._streams)

    def start(
        self,
        request: worker_pb2.GenerateRequest,
        deadline_s: float,
        kv_source: worker_pb2.KVSource | None = None,
        trace_context: Mapping[str, str] | None = None,
        coalesce_ms: int = 0,
    ) -> RequestStream:
        """Send `request` on the session (batched with others) and return its event stream, which
        fails with DEADLINE_EXCEEDED when the request runs longer than `deadline_s`. With
        `coalesce_ms`, the worker sends the request's tokens at most that often (and at its end)."""
        if self._conn is None and self._connecting is None:
            self._connecting = asyncio.create_task(self._connect())
        now = time.monotonic()
        if not self._streams:
            self._last_progress = now  # the stall clock runs only while something waits
        stream = RequestStream(request.request_id, self, now + deadline_s)
        self._streams[request.request_id] = stream
        start = self._outbox.starts.add()
        start.request.CopyFrom(request)
        if kv_source is not None:
            start.kv_source.CopyFrom(kv_source)
        if trace_context:
            start.trace_context.update(trace_context)
        start.coalesce_ms = coalesce_ms
        self._queued()
        return stream

    def forget(self, stream: RequestStream) -> None:
        if self._streams.get(stream.request_id) is stream:
            del self._streams[stream.request_id]
            if not stream.finished:
                self._outbox.cancels.append(stream.request_id)
                self._queued()

    async def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None
        self._break(Unavailable(f"the session to worker {self.address} was closed"))

    # -- the connection -------------------------------------------------------------

    async def _connect(self) -> None:
        try:
            conn = await connect(self.address, CHANNEL, Role.WORKER, self.security, self._received, self._lost)
        except ShoalError as exc:
            self._connecting = None
            self._break(exc if exc.retryable else Unavailable(exc.message))
            return
        self._connecting = None
        self._conn = conn
        self._last_steps = -1
        self._arm_watchdog()
        self._flush()

    def _queued(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Send everything queued this turn of the loop as one frame (once connected)."""
        self._flush_scheduled = False
        conn = self._conn
        if conn is None or (not self._outbox.starts and not self._outbox.cancels):
            return
        message, self._outbox = self._outbox, worker_pb2.ServeRequest()
        conn.send(message.SerializeToString())

    def _received(self, payload: memoryview | bytearray) -> None:
        reply = parse(worker_pb2.ServeResponse(), payload)
        if reply.events or reply.engine_steps != self._last_steps or reply.in_engine == 0:
            self._last_progress = time.monotonic()
        self._last_steps = reply.engine_steps
        streams = self._streams
        for event in reply.events:
            stream = streams.get(event.request_id)
            if stream is None:
                continue  # cancelled by the caller
            if _final(event):
                del streams[event.request_id]
            stream._push(event)

    def _lost(self) -> None:
        if self._conn is not None:
            self._break(Unavailable(f"worker {self.address} closed the serve channel"))

    def _arm_watchdog(self) -> None:
        self._watchdog = asyncio.get_running_loop().call_later(max(0.05, self.stall_s / 4), self._check)

    def _check(self) -> None:
        if self._conn is None:
            return
        now = time.monotonic()
        quiet = now - self._last_progress
        if self._streams and quiet > self.stall_s:
            log.warning("worker stalled; failing its requests over", worker=self.address, quiet_s=round(quiet, 1))
            if self.on_stall is not None:
                self.on_stall()
            self._break(Unavailable(f"worker {self.address} made no progress for {quiet:.1f}s (stalled)"))
            return
        late = [stream for stream in self._streams.values() if stream.deadline < now]
        for stream in late:
            self.forget(stream)
            stream._fail(DeadlineExceeded(f"request {stream.request_id} did not finish in time"))
        self._arm_watchdog()

    def _break(self, error: ShoalError) -> None:
        """Fail every stream and drop the connection; the next start opens a new one."""
        conn, self._conn = self._conn, None
        if conn is not None:
            self.broken += 1
            conn.close()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._outbox = worker_pb2.ServeRequest()
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream._fail(error)
