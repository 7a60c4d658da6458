"""Data channels sending more than the transport takes at once: big frames go out in pieces as the
peer reads, whole and in order with the small frames sent after them, over TLS and plaintext."""

from __future__ import annotations

import asyncio
import os

import pytest

from shared.rpc.channel import ChannelServer, ServerConnection, connect
from shared.rpc.security import Role, RpcSecurity
from tests.support.pki import as_worker, security

pytestmark = pytest.mark.integration

MIB = 2**20
BIG = [os.urandom(3 * MIB + 17), os.urandom(5 * MIB), os.urandom(100)]


class _Replier:
    """Answers any frame with the big frames, one small frame, then closes after its reply."""

    def __init__(self, conn: ServerConnection, sent: asyncio.Event) -> None:
        self.conn = conn
        self.sent = sent

    def frame(self, payload: memoryview | bytearray) -> None:
        self.conn.send_parts(list(BIG))
        self.conn.send(b"end")
        self.conn.close_after_reply()
        self.sent.set()

    def closed(self, error: Exception | None) -> None:
        pass


def _pair(tls: bool) -> tuple[RpcSecurity, RpcSecurity]:
    if tls:
        return security(Role.KVSTORE), as_worker()
    return RpcSecurity(Role.KVSTORE, None), RpcSecurity(Role.WORKER, None)


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plaintext"])
async def test_a_reply_bigger_than_the_socket_reaches_a_slow_reader_whole_and_in_order(tls: bool) -> None:
    server_side, client_side = _pair(tls)
    sent = asyncio.Event()
    server = ChannelServer({"test": lambda conn: _Replier(conn, sent)}, server_side)
    port = await server.start("127.0.0.1", 0)
    frames: list[bytes] = []
    closed = asyncio.Event()
    try:
        conn = await connect(
            f"127.0.0.1:{port}", "test", Role.KVSTORE, client_side, lambda f: frames.append(bytes(f)), closed.set
        )
        assert conn.transport is not None
        conn.transport.pause_reading()  # a reader that falls behind: the server's writes must wait
        conn.send(b"go")
        await asyncio.wait_for(sent.wait(), 10)
        (replier,) = server.connections
        assert replier._outbox  # the transport took a part; the rest waits for room
        await asyncio.sleep(0.2)
        assert frames == []
        conn.transport.resume_reading()
        await asyncio.wait_for(closed.wait(), 30)  # the server's close came after the whole reply
    finally:
        await server.stop()
    assert frames == [*BIG, b"end"]


async def test_drain_waits_for_the_outbox_and_small_frames_keep_their_place() -> None:
    server_side, client_side = _pair(tls=True)
    got: list[bytes] = []
    everything = asyncio.Event()

    class _Collect:
        def __init__(self, conn: ServerConnection) -> None:
            conn.transport.pause_reading()  # type: ignore[union-attr]
            asyncio.get_running_loop().call_later(0.3, conn.transport.resume_reading)  # type: ignore[union-attr]

        def frame(self, payload: memoryview | bytearray) -> None:
            got.append(bytes(payload))
            if len(got) == len(BIG) + 1:
                everything.set()

        def closed(self, error: Exception | None) -> None:
            pass

    server = ChannelServer({"test": _Collect}, server_side)
    port = await server.start("127.0.0.1", 0)
    try:
        conn = await connect(f"127.0.0.1:{port}", "test", Role.KVSTORE, client_side, lambda f: None, lambda: None)
        conn.send_parts(list(BIG))
        conn.send(b"after")  # queued behind the big frames, never ahead of them
        assert conn._outbox
        await asyncio.wait_for(conn.drain(), 30)
        assert not conn._outbox
        await asyncio.wait_for(everything.wait(), 30)
        conn.close()
    finally:
        await server.stop()
    assert got == [*BIG, b"after"]
