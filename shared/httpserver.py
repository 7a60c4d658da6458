"""The router's HTTP/1.1 server: httptools parsing on an asyncio Protocol, without a framework.

Why not uvicorn: per request it costs about twice this server in Python
(measured in docs/routing.md), and an ASGI app learns that its client went
away only from a pending `receive()`, which takes a task per request to
watch. Here a connection that closes cancels its request's task directly.

What it does: keep-alive and pipelined requests (answered in order, one at a
time per connection); `Expect: 100-continue`; bodies framed by length or
chunked, refused with 413 past the limit (however framed) and headers past
theirs with 431; a malformed request gets 400 and the connection closes;
idle connections close after KEEPALIVE_S; streamed responses use chunked
transfer encoding and wait when the client reads slower than they write.
The hot endpoints are plain handlers `(Request, Responder)`; every other path
goes to an ASGI app (the FastAPI routes) through a small bridge.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, cast

import httptools
import orjson
from starlette.types import ASGIApp, Message

from shared.httpapi import error_body
from shared.telemetry.logging import get_logger

log = get_logger("shoal.router.http")

# Longer than clients and proxies keep an idle connection (aiohttp 15 s, load balancers 60 s): a server
# that closes first races a request the client is sending on it, and the client sees a reset.
KEEPALIVE_S = 75.0
LINGER_S = 2.0
MAX_HEADER_BYTES = 64 * 2**10
_REASONS = {
    100: b"Continue", 200: b"OK", 204: b"No Content", 400: b"Bad Request", 401: b"Unauthorized",
    403: b"Forbidden", 404: b"Not Found", 405: b"Method Not Allowed", 409: b"Conflict",
    413: b"Content Too Large", 422: b"Unprocessable Content", 429: b"Too Many Requests",
    431: b"Request Header Fields Too Large", 499: b"Client Closed Request", 500: b"Internal Server Error",
    503: b"Service Unavailable", 504: b"Gateway Timeout",
}  # fmt: skip


class Request:
    """One parsed request. Header names are lower-case bytes."""

    __slots__ = ("body", "headers", "keep_alive", "method", "path", "query")

    def __init__(
        self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes, keep_alive: bool
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive

    def header(self, name: bytes) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value.decode("latin-1")
        return None


class Responder:
    """Writes one request's response: whole (`send`) or streamed (`start`, `write`, `end`)."""

    __slots__ = ("_conn", "_head", "_keep_alive", "_streaming", "done", "started", "status")

    def __init__(self, conn: _Connection, keep_alive: bool, head: bool) -> None:
        self._conn = conn
        self._keep_alive = keep_alive
        self._head = head
        self._streaming = False
        self.started = False
        self.done = False
        self.status = 0

    @property
    def disconnected(self) -> bool:
        """The client closed the connection."""
        return self._conn.closed

    def _status_line(self, status: int, headers: Iterable[tuple[bytes, bytes]]) -> bytearray:
        self.started = True
        self.status = status
        out = bytearray(b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown")))
        for name, value in headers:
            out += name + b": " + value + b"\r\n"
        if not self._keep_alive:
            out += b"connection: close\r\n"
        return out

    def send(self, status: int, body: bytes, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
        """The whole response at once (the body's length is its content-length)."""
        out = self._status_line(status, headers)
        out += b"content-length: %d\r\n\r\n" % len(body)
        if not self._head:
            out += body
        self._conn.write(bytes(out))
        self._finish()

    def send_json(self, status: int, payload: bytes, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
        self.send(status, payload, [(b"content-type", b"application/json"), *headers])

    def start(self, status: int, headers: Iterable[tuple[bytes, bytes]]) -> None:
        """Begin a streamed response (chunked transfer encoding)."""
        out = self._status_line(status, headers)
        out += b"transfer-encoding: chunked\r\n\r\n"
        self._streaming = True
        self._conn.write(bytes(out))

    async def write(self, data: bytes) -> None:
        """One chunk of a streamed response; waits while the client's buffer is full."""
        if data and not self._head:
            self._conn.write(b"%x\r\n%s\r\n" % (len(data), data))
        await self._conn.drain()

    def end(self, data: bytes = b"") -> None:
        """The last chunk of a streamed response."""
        tail = b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data) if data else b"0\r\n\r\n"
        self._conn.write(tail if not self._head else b"")
        self._finish()

    def _finish(self) -> None:
        self.done = True
        self._conn.response_done(self._keep_alive)

    def abort(self) -> None:
        """Give up on a response already started: close the connection (the client sees it cut)."""
        self._conn.close()


Handler = Callable[[Request, Responder], Awaitable[None]]


class _Connection(asyncio.Protocol):
    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.closed = False
        self.idle_since = 0.0
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._body: list[bytes] = []
        self._body_bytes = 0
        self._refused = False
        self._queue: deque[Request] = deque()
        self._task: asyncio.Task[None] | None = None
        self._writable: asyncio.Future[None] | None = None
        self._paused = False

    # -- transport callbacks ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport; they have its methods.
        self.transport = cast(asyncio.Transport, transport)
        self.idle_since = self.server.loop.time()
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as exc:
            self._refuse(400, f"malformed HTTP request: {exc}")

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    # -- parser callbacks ----------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._header_bytes = 0
        self._body = []
        self._body_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_HEADER_BYTES:
            self._refuse(431, f"request headers larger than {MAX_HEADER_BYTES} bytes")
            return
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        for name, value in self._headers:
            if name == b"content-length" and (not value.isdigit() or int(value) > self.server.body_limit):
                self._refuse(413, f"request body larger than {self.server.body_limit} bytes")
                return
            if name == b"expect" and value.lower() == b"100-continue" and self.transport is not None:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if self._refused:
            return
        self._body_bytes += len(body)
        if self._body_bytes > self.server.body_limit:
            self._refuse(413, f"request body larger than {self.server.body_limit} bytes")
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        parsed = httptools.parse_url(self._url)
        method = self.parser.get_method().decode("latin-1")
        path = parsed.path.decode("latin-1")
        body = b"".join(self._body) if len(self._body) != 1 else self._body[0]
        request = Request(method, path, parsed.query or b"", self._headers, body, self.parser.should_keep_alive())
        if self._task is None:
            self._run(request)
        else:
            self._queue.append(request)  # pipelined: answered after the one in progress

    # -- requests -----------------------------------------------------------------

    def _run(self, request: Request) -> None:
        responder = Responder(self, request.keep_alive, request.method == "HEAD")
        self._task = self.server.loop.create_task(self.server.dispatch(request, responder))

    def response_done(self, keep_alive: bool) -> None:
        self._task = None
        if self._refused:
            self._linger()
            return
        if not keep_alive:
            self.close()
            return
        if self._queue:
            self._run(self._queue.popleft())
        else:
            self.idle_since = self.server.loop.time()

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    async def drain(self) -> None:
        if self._paused and not self.closed:
            self._writable = self.server.loop.create_future()
            await self._writable

    def _refuse(self, status: int, message: str) -> None:
        """Answer a request that will not be served, and close the connection."""
        self._refused = True
        if self._task is None and self.transport is not None and not self.closed:
            body = orjson.dumps(error_body(message, "invalid_request_error"))
            Responder(self, False, False).send_json(status, body)
        else:
            self.close()

    def _linger(self) -> None:
        """After refusing a request: send our end's FIN and keep reading (and dropping) what the client still
        sends for a moment, so it reads the refusal instead of a connection reset."""
        if self.transport is not None and not self.closed and self.transport.can_write_eof():
            self.transport.write_eof()
        self.server.loop.call_later(LINGER_S, self.close)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True

    @property
    def busy(self) -> bool:
        return self._task is not None or bool(self._queue)

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task


class HttpServer:
    """Serves `routes` (path -> handler, POST only) and sends every other request to `fallback`."""

    def __init__(
        self, routes: Mapping[str, Handler], fallback: ASGIApp, body_limit: int, keepalive_s: float = KEEPALIVE_S
    ) -> None:
        self.routes = routes
        self.fallback = fallback
        self.body_limit = body_limit
        self.keepalive_s = keepalive_s
        self.connections: set[_Connection] = set()
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "the server is not started"
        return self._loop

    async def start(self, host: str, port: int, sock: socket.socket | None = None) -> int:
        """Listen (port 0 picks one; `sock` is a socket to listen on instead); returns the port."""
        self._loop = asyncio.get_running_loop()
        if sock is not None:
            self._server = await self.loop.create_server(lambda: _Connection(self), sock=sock, backlog=2048)
        else:
            self._server = await self.loop.create_server(lambda: _Connection(self), host, port, backlog=2048)
        self._sweep()
        bound: int = self._server.sockets[0].getsockname()[1]
        return bound

    async def stop(self, grace_s: float) -> None:
        """Stop accepting, let requests in progress finish within `grace_s`, then close every connection."""
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        running = [c.task for c in self.connections if c.task is not None]
        if running:
            await asyncio.wait(running, timeout=grace_s)
        for conn in list(self.connections):
            conn.close()

    def _sweep(self) -> None:
        """Close connections idle for longer than the keep-alive timeout (one timer for all)."""
        cutoff = self.loop.time() - self.keepalive_s
        for conn in [c for c in self.connections if not c.busy and c.idle_since < cutoff]:
            conn.close()
        self._sweeper = self.loop.call_later(1.0, self._sweep)

    async def dispatch(self, request: Request, responder: Responder) -> None:
        try:
            handler = self.routes.get(request.path)
            if handler is None:
                await _asgi(self.fallback, request, responder)
            elif request.method != "POST":
                body = orjson.dumps(error_body("Method Not Allowed", "invalid_request_error"))
                responder.send_json(405, body, [(b"allow", b"POST")])
            else:
                await handler(request, responder)
        except asyncio.CancelledError:
            if not responder.disconnected:
                raise
        except Exception:
            log.exception("request failed", path=request.path)
            if not responder.started:
                responder.send_json(500, orjson.dumps(error_body("internal error", "internal_error")))
                return
            responder.abort()
        if not responder.done and not responder.disconnected:
            log.error("handler returned without a complete response", path=request.path)
            responder.abort()


async def _asgi(app: ASGIApp, request: Request, responder: Responder) -> None:
    """Run an ASGI app for one request (the FastAPI routes)."""
    disconnected: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    received = False
    status = 200
    headers: list[tuple[bytes, bytes]] = []
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.path,
        "raw_path": request.path.encode("latin-1"),
        "query_string": request.query,
        "root_path": "",
        "headers": request.headers,
        "client": None,
        "server": None,
    }

    async def receive() -> Message:
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await disconnected
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status = message["status"]
            headers = [(bytes(k).lower(), bytes(v)) for k, v in message.get("headers", [])]
        elif message["type"] == "http.response.body":
            body, more = message.get("body", b""), message.get("more_body", False)
            if not responder.started and not more:
                responder.send(status, body, [(k, v) for k, v in headers if k != b"content-length"])
            elif not responder.started:
                responder.start(status, [(k, v) for k, v in headers if k != b"content-length"])
                await responder.write(body)
            elif more:
                await responder.write(body)
            else:
                responder.end(body)

    try:
        await app(scope, receive, send)
    finally:
        disconnected.set_result(None)
