"""Data channels: length-prefixed frames on one TCP connection, for traffic too heavy for grpc-python.

Measured on this project's machines (docs/routing.md): a message on a
grpc.aio stream costs about 75 µs of CPU at each end, a frame on a plain
asyncio connection under 10. The router's request stream to each worker and
KV bytes to and from the kvstore therefore run on data channels; gRPC keeps
every control call. The wire format is in protos/shoal/v1/common.proto
(`ChannelHello`): 4-byte little-endian lengths, a hello with the internal
token first, then the channel's own messages. Connections run over mutual TLS
with the same certificates and caller rules as gRPC (shared/rpc/security.py),
or plaintext in development.

`ChannelServer` serves named channels on one port: each accepted connection
that says hello gets a `ChannelHandler` from the channel's factory, which
receives the connection's frames. `connect` opens a client connection and
hands its frames to a callback. Everything runs on the event loop; frames
are delivered in order, and `send` never blocks (a connection whose peer
reads slowly buffers; callers that stream bulk data wait on `drain`).
"""

from __future__ import annotations

import abc
import asyncio
import ctypes
import hmac
import struct
from collections import deque
from collections.abc import Callable, Mapping
from typing import Protocol, TypeVar

from google.protobuf.message import Message

from shared.errors import ErrorCode, Unavailable, error_for
from shared.rpc.security import Role, RpcSecurity
from shared.rpc.shoal.v1 import common_pb2
from shared.telemetry.logging import get_logger

log = get_logger("shoal.rpc.channel")

_LENGTH = struct.Struct("<I")
MAX_FRAME_BYTES = 64 * 2**20
HELLO_TIMEOUT_S = 5.0
LINGER_S = 2.0
# How often a connection with `after_sent` callbacks checks whether its transport has sent everything.
SENT_POLL_S = 0.002


M = TypeVar("M", bound=Message)


def parse(message: M, payload: memoryview | bytearray) -> M:
    """Parse a frame into `message` without copying it to bytes first (protobuf reads any buffer)."""
    message.ParseFromString(payload)  # type: ignore[arg-type]
    return message


class ChannelHandler(Protocol):
    """The server side of one accepted connection."""

    def frame(self, payload: memoryview | bytearray) -> None:
        """One frame from the client (a bytearray is the handler's to keep; a view is valid only during
        the call)."""

    def closed(self, error: Exception | None) -> None:
        """The connection ended (error: why, when it was not a clean close)."""


# Frames at least this large are read straight into a buffer of their own (no copy in user space);
# smaller ones are parsed out of a shared receive buffer, many per read.
BIG_FRAME_BYTES = 64 * 2**10
_SCRATCH_BYTES = 4 * BIG_FRAME_BYTES
# One read into the shared buffer takes at most this much: the start of a big frame that arrives in
# it must be copied out, so reading less there bounds that copy (a read still holds ~100 small frames).
_SCRATCH_READ_BYTES = 16 * 2**10
# Big payloads go to the transport in writes of at most this much, each once it has room. A TLS
# transport encrypts all it is handed into one growing buffer before sending any: a 64 MiB reply
# handed over whole passes through memory several more times than one sent in cache-sized pieces
# (docs/architecture.md, "Inside the kvstore"). uvloop's plaintext transport sends from the parts
# themselves, so there a piece only bounds what waits on a slow peer, and a 2 MiB block with its
# reply goes in one system call (256 KiB pieces split a 256 KiB block's reply in two: 3% of a Get).
_TLS_WRITE_BYTES = 256 * 2**10
_PLAIN_WRITE_BYTES = 4 * 2**20

Piece = bytes | bytearray | memoryview

# A bytearray whose bytes are not zeroed first: a big frame's buffer is written whole by the socket
# before anyone sees it, and zeroing megabytes per frame costs as much as a tenth of the transfer.
_new_bytearray = ctypes.pythonapi.PyByteArray_FromStringAndSize
_new_bytearray.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
_new_bytearray.restype = ctypes.py_object


def _unfilled(length: int) -> bytearray:
    buffer: bytearray = _new_bytearray(None, length)
    return buffer


class _Framer(asyncio.BufferedProtocol, abc.ABC):
    """Splits the byte stream into frames; subclasses decide what a frame means.

    Reads go into a receive buffer where small frames are parsed in place, many per read. When a
    frame's length says it is big (KV payloads), the rest of it is read straight into a bytearray
    of its own, which the subclass receives and may keep: the kernel's copy is the only one.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._scratch = bytearray(_SCRATCH_BYTES)
        self._start = 0  # unparsed bytes are _scratch[_start:_end]
        self._end = 0
        self._big: bytearray | None = None
        self._big_got = 0
        self._paused = False
        self._drained: asyncio.Future[None] | None = None
        # Frames not yet handed to the transport, in order (see send_parts).
        self._outbox: deque[Piece] = deque()
        self._eof_when_sent = False
        self._discarding = False
        self.is_closed = False
        self._after_sent: list[Callable[[], None]] = []
        self._write_bytes = _TLS_WRITE_BYTES

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport; they have its methods.
        self.transport = transport  # type: ignore[assignment]
        tls = transport.get_extra_info("sslcontext") is not None
        self._write_bytes = _TLS_WRITE_BYTES if tls else _PLAIN_WRITE_BYTES

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._big is not None:
            return memoryview(self._big)[self._big_got :]
        if self._end > len(self._scratch) - _SCRATCH_READ_BYTES:  # move the unparsed tail to the front
            self._scratch[: self._end - self._start] = self._scratch[self._start : self._end]
            self._end -= self._start
            self._start = 0
        return memoryview(self._scratch)[self._end : self._end + _SCRATCH_READ_BYTES]

    def buffer_updated(self, nbytes: int) -> None:
        if self._discarding:
            self._start = self._end = 0
            self._big = None
            return
        big = self._big
        if big is not None:
            self._big_got += nbytes
            if self._big_got == len(big):
                self._big = None
                self.on_frame(big)
            return
        self._end += nbytes
        self._parse()

    def _parse(self) -> None:
        scratch = self._scratch
        while not self.is_closed and not self._discarding and self._end - self._start >= 4:
            start = self._start
            (length,) = _LENGTH.unpack_from(scratch, start)
            if length > MAX_FRAME_BYTES:
                self._fail(f"frame of {length} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
                return
            have = self._end - start - 4
            if length >= BIG_FRAME_BYTES:
                big = _unfilled(length)
                taken = min(have, length)
                big[:taken] = scratch[start + 4 : start + 4 + taken]
                self._start = start + 4 + taken
                if taken < length:
                    self._big, self._big_got = big, taken
                    break
                self.on_frame(big)
                continue
            if have < length:
                break
            with memoryview(scratch) as view:
                self.on_frame(view[start + 4 : start + 4 + length])
            self._start = start + 4 + length
        if self._start == self._end:
            self._start = self._end = 0

    @abc.abstractmethod
    def on_frame(self, payload: memoryview | bytearray) -> None:
        """One whole frame. A bytearray (a big frame) is the receiver's to keep; a memoryview is valid
        only during the call."""

    def send(self, payload: bytes) -> None:
        """Queue one frame (never blocks; see `drain`)."""
        if self.transport is None or self.is_closed:
            return
        frame = _LENGTH.pack(len(payload)) + payload
        if self._outbox:
            self._outbox.append(frame)
        else:
            self.transport.write(frame)

    def send_parts(self, parts: list[Piece]) -> None:
        """Queue one frame per part without joining them (big payloads are not copied here). The parts are
        read as the transport takes them, so they must not change until the peer has answered."""
        if self.transport is None or self.is_closed:
            return
        pieces = [piece for part in parts for piece in (_LENGTH.pack(len(part)), part)]
        if not self._outbox and sum(len(piece) for piece in pieces) <= self._write_bytes:
            self.transport.writelines(pieces)
            return
        self._outbox.extend(pieces)
        self._pump()

    def _pump(self) -> None:
        """Hand the transport the outbox in writes of up to `_write_bytes` while it has room."""
        transport, outbox = self.transport, self._outbox
        while outbox and not self._paused and not self.is_closed and transport is not None:
            batch: list[Piece] = []
            room = self._write_bytes
            while outbox and room > 0:
                piece = outbox.popleft()
                if len(piece) > room:
                    view = memoryview(piece)
                    outbox.appendleft(view[room:])
                    piece = view[:room]
                batch.append(piece)
                room -= len(piece)
            transport.writelines(batch)
        if not outbox and self._eof_when_sent:
            self._eof_when_sent = False
            self._write_eof()

    async def drain(self) -> None:
        """Wait while the peer reads more slowly than we send."""
        if (self._paused or self._outbox) and not self.is_closed:
            self._drained = asyncio.get_running_loop().create_future()
            await self._drained

    @property
    def sending(self) -> bool:
        """Frames queued earlier are still on their way out of this process."""
        return bool(self._outbox) or (self.transport is not None and self.transport.get_write_buffer_size() > 0)

    def after_sent(self, callback: Callable[[], None]) -> None:
        """Call `callback` once every frame queued so far has left this process (the kernel holds its bytes,
        or the connection is gone): until then the transport may still read the parts given to `send_parts`."""
        if self.is_closed or self.transport is None or not self.sending:
            callback()
            return
        self._after_sent.append(callback)
        if len(self._after_sent) == 1:
            asyncio.get_running_loop().call_later(SENT_POLL_S, self._poll_sent)

    def _poll_sent(self) -> None:
        # Polled: transports say when their buffer falls below a water mark, not when it is empty, and
        # a TLS transport's marks do not behave alike across event loops.
        if self.is_closed or not self.sending:
            self._sent()
        elif self._after_sent:
            asyncio.get_running_loop().call_later(SENT_POLL_S, self._poll_sent)

    def _sent(self) -> None:
        callbacks, self._after_sent = self._after_sent, []
        for callback in callbacks:
            callback()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._pump()
        if self._paused or self._outbox:
            return
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def close(self) -> None:
        """Close once what was sent has gone out (the transport flushes what it holds before closing)."""
        if self.transport is not None and not self.is_closed:
            if self._outbox:
                self.transport.writelines(list(self._outbox))
                self._outbox.clear()
            self.transport.close()
        self.is_closed = True

    def close_after_reply(self) -> None:
        """Close once the peer has our last frames: stop reading frames, send our FIN, drop what still
        comes in for a moment. Closing at once, with the peer's bytes unread, would reset the connection
        and could destroy the reply on its way."""
        self._discarding = True
        if self._outbox:
            self._eof_when_sent = True
        else:
            self._write_eof()
        asyncio.get_running_loop().call_later(LINGER_S, self.close)

    def _write_eof(self) -> None:
        if self.transport is not None and not self.is_closed and self.transport.can_write_eof():
            self.transport.write_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self.is_closed = True
        self._outbox.clear()
        self._sent()  # the transport has let go of what it held
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def _fail(self, reason: str) -> None:
        log.warning("data channel closed", reason=reason)
        self.close()


_CODES = {code.value for code in ErrorCode}

HandlerFactory = Callable[["ServerConnection"], ChannelHandler]


class ServerConnection(_Framer):
    def __init__(self, server: ChannelServer) -> None:
        super().__init__()
        self.server = server
        self.handler: ChannelHandler | None = None
        self._hello_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.server.connections.add(self)
        self._hello_timer = asyncio.get_running_loop().call_later(HELLO_TIMEOUT_S, self._no_hello)

    def _no_hello(self) -> None:
        if self.handler is None:
            self._fail("no hello within the timeout")

    def on_frame(self, payload: memoryview | bytearray) -> None:
        if self.handler is not None:
            self.handler.frame(payload)
            return
        try:
            hello = parse(common_pb2.ChannelHello(), payload)
        except Exception:
            self._refuse("the first frame must be a ChannelHello")
            return
        factory = self.server.channels.get(hello.channel)
        if factory is None:
            self._refuse(f"unknown channel {hello.channel!r}; this server has {sorted(self.server.channels)}")
            return
        security = self.server.security
        assert self.transport is not None
        refusal = security.refusal(self.transport.get_extra_info("peercert"))
        if refusal is not None:
            self._refuse(refusal, ErrorCode.PERMISSION_DENIED)
            return
        token = security.token
        if token and not hmac.compare_digest(hello.token.encode(), token.encode()):
            self._refuse("invalid internal token", ErrorCode.UNAUTHENTICATED)
            return
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        self.handler = factory(self)
        self.send(common_pb2.ChannelHello(channel=hello.channel).SerializeToString())

    def _refuse(self, error: str, code: ErrorCode = ErrorCode.UNAVAILABLE) -> None:
        log.warning("data channel refused", reason=error)
        self.send(common_pb2.ChannelHello(error=error, code=code.value).SerializeToString())
        self.close_after_reply()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.server.connections.discard(self)
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        if self.handler is not None:
            self.handler.closed(exc)


class ChannelServer:
    """Serves named channels on one TCP port (the service's data port)."""

    def __init__(self, channels: Mapping[str, HandlerFactory], security: RpcSecurity) -> None:
        self.channels = dict(channels)
        self.security = security
        self.connections: set[ServerConnection] = set()
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen (port 0 picks a free one); returns the port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: ServerConnection(self), host, port, backlog=1024, ssl=self.security.server_ssl
        )
        bound: int = self._server.sockets[0].getsockname()[1]
        return bound

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.close()


class ClientConnection(_Framer):
    """A client's channel connection: frames after the hello go to `on_frame`."""

    def __init__(
        self,
        channel: str,
        token: str | None,
        on_frame: Callable[[memoryview | bytearray], None],
        on_closed: Callable[[], None],
    ) -> None:
        super().__init__()
        self.channel = channel
        self.token = token or ""
        self._on_frame = on_frame
        self._on_closed = on_closed
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.send(common_pb2.ChannelHello(channel=self.channel, token=self.token).SerializeToString())

    def on_frame(self, payload: memoryview | bytearray) -> None:
        if self.ready.done():
            self._on_frame(payload)
            return
        hello = parse(common_pb2.ChannelHello(), payload)
        if hello.error:
            code = ErrorCode(hello.code) if hello.code in _CODES else ErrorCode.UNAVAILABLE
            self.ready.set_exception(error_for(code, f"data channel {self.channel!r} refused: {hello.error}"))
            self.close()
            return
        self.ready.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self.ready.done():
            self.ready.set_exception(Unavailable(f"data channel {self.channel!r} closed before its hello"))
        self._on_closed()


async def connect(
    address: str,
    channel: str,
    peer: Role,
    security: RpcSecurity,
    on_frame: Callable[[memoryview | bytearray], None],
    on_closed: Callable[[], None],
    timeout_s: float = HELLO_TIMEOUT_S,
) -> ClientConnection:
    """Open a channel to the `peer` service at `address` ("host:port") and wait for the server's hello."""
    context = security.client_ssl
    host, _, port = address.rpartition(":")
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout_s):
            _transport, conn = await loop.create_connection(
                lambda: ClientConnection(channel, security.token, on_frame, on_closed),
                host,
                int(port),
                ssl=context,
                server_hostname=peer.identity if context is not None else None,
            )
            await conn.ready
    except (OSError, TimeoutError) as exc:
        raise Unavailable(f"cannot open data channel {channel!r} to {address}: {exc}") from None
    return conn
