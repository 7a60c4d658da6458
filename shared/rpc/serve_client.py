"""The caller's side of the Worker's multiplexed Serve stream (the router's data path).

A `ServeSession` is one long-lived Serve call to one worker, shared by every
request the caller sends there. `start` queues a request and returns its
`RequestStream`, an async iterator of the request's events. A writer task
sends everything queued since its previous write in one message, so an idle
session sends each request at once and a busy one batches them; a reader task
hands each event of each reply to its stream. Closing a stream that has not
finished sends a cancel, which aborts the request on the worker.

Failures are per session. When the call breaks (the worker died or
restarted), every stream on it fails with UNAVAILABLE and the next `start`
opens a new call. A worker that holds requests of the session in its engine
and makes no progress for `stall_s` seconds (no reply at all, or replies
whose engine step count stopped) is stalled: the session breaks the same way,
so callers resume the requests elsewhere. Everything runs on one event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Mapping

import grpc
from opentelemetry import context as otel_context

from shared.errors import DeadlineExceeded, ShoalError, Unavailable
from shared.rpc.errors import from_rpc_error, from_stream_error
from shared.rpc.shoal.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from shared.telemetry.logging import get_logger

log = get_logger("shoal.rpc.serve")

DEFAULT_STALL_S = 10.0
_UNFINISHED = common_pb2.FINISH_REASON_UNSPECIFIED


class RequestStream:
    """One request's events on a shared Serve call. Iterate it; `close` it when done."""

    __slots__ = ("_error", "_events", "_session", "_waiter", "deadline", "finished", "request_id")

    def __init__(self, request_id: str, session: ServeSession, deadline: float) -> None:
        self.request_id = request_id
        # time.monotonic() by which the request must have finished (checked with the stall watchdog).
        self.deadline = deadline
        self._session = session
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
    """The Serve call to one worker, opened on first use and reopened after it breaks."""

    def __init__(
        self,
        stub: worker_pb2_grpc.WorkerStub,
        address: str,
        stall_s: float = DEFAULT_STALL_S,
        on_stall: Callable[[], None] | None = None,
    ) -> None:
        self.stub = stub
        self.address = address
        self.stall_s = stall_s
        self.on_stall = on_stall
        self._streams: dict[str, RequestStream] = {}
        self._call: grpc.aio.StreamStreamCall | None = None
        self._outbox = worker_pb2.ServeRequest()
        self._outbox_empty = True
        self._writer_waiter: asyncio.Future[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._watchdog: asyncio.TimerHandle | None = None
        self._last_progress = time.monotonic()
        self._last_steps = -1
        self._in_engine = 0
        self.broken = 0  # calls that broke (worker gone or stalled), for metrics and tests

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
        if self._call is None:
            self._open()
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
            if not stream.finished and self._call is not None:
                self._outbox.cancels.append(stream.request_id)
                self._queued()

    async def close(self) -> None:
        self._break(Unavailable(f"the session to worker {self.address} was closed"))

    # -- the call -----------------------------------------------------------------

    def _open(self) -> None:
        # The call outlives the request that opens it: it belongs to no request's trace (each request
        # carries its own context in its start message).
        token = otel_context.attach(otel_context.Context())
        try:
            call = self.stub.Serve()
        finally:
            otel_context.detach(token)
        self._call = call
        self._last_steps = -1
        self._in_engine = 0
        self._tasks = [asyncio.create_task(self._write(call)), asyncio.create_task(self._read(call))]
        self._arm_watchdog()

    def _queued(self) -> None:
        self._outbox_empty = False
        waiter = self._writer_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _write(self, call: grpc.aio.StreamStreamCall) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if self._outbox_empty:
                    self._writer_waiter = loop.create_future()
                    await self._writer_waiter
                    self._writer_waiter = None
                message, self._outbox = self._outbox, worker_pb2.ServeRequest()
                self._outbox_empty = True
                await call.write(message)
        except (grpc.RpcError, asyncio.InvalidStateError) as exc:
            # The reader sees the same failure and breaks the session; this only stops writing.
            log.debug("serve stream write failed", worker=self.address, error=str(exc))

    async def _read(self, call: grpc.aio.StreamStreamCall) -> None:
        error: ShoalError
        try:
            async for reply in call:
                self._progress(reply)
                streams = self._streams
                for event in reply.events:
                    stream = streams.get(event.request_id)
                    if stream is None:
                        continue  # cancelled by the caller
                    if _final(event):
                        del streams[event.request_id]
                    stream._push(event)
            error = Unavailable(f"worker {self.address} ended the serve stream")
        except grpc.RpcError as exc:
            error = from_rpc_error(exc, self.address)
            if not error.retryable:
                error = Unavailable(f"serve stream to worker {self.address} failed: {error.message}")
        if self._call is call:
            self._break(error)

    def _progress(self, reply: worker_pb2.ServeResponse) -> None:
        if reply.events or reply.engine_steps != self._last_steps or reply.in_engine == 0:
            self._last_progress = time.monotonic()
        self._last_steps = reply.engine_steps
        self._in_engine = reply.in_engine

    def _arm_watchdog(self) -> None:
        loop = asyncio.get_running_loop()
        self._watchdog = loop.call_later(max(0.05, self.stall_s / 4), self._check_stall)

    def _check_stall(self) -> None:
        if self._call is None:
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
        """Fail every stream, drop the call; the next start opens a new one."""
        call, self._call = self._call, None
        if call is not None:
            self.broken += 1
            call.cancel()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        self._tasks = []
        self._outbox = worker_pb2.ServeRequest()
        self._outbox_empty = True
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream._fail(error)
