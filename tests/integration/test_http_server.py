"""The router's HTTP server on a real socket: keep-alive and its idle timeout."""

from __future__ import annotations

import asyncio

import pytest
from starlette.responses import PlainTextResponse

from shared.httpserver import HttpServer, Request, Responder

pytestmark = pytest.mark.integration

CALL = b"POST /ping HTTP/1.1\r\nhost: t\r\ncontent-length: 0\r\n\r\n"


async def _pong(_request: Request, responder: Responder) -> None:
    responder.send_json(200, b"{}", [])


async def test_a_kept_alive_connection_serves_again_and_closes_once_idle() -> None:
    server = HttpServer({"/ping": _pong}, PlainTextResponse("fallback"), body_limit=1024, keepalive_s=1.0)
    port = await server.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(2):  # the same connection answers again: it was kept alive
            writer.write(CALL)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200") and b"connection: close" not in head.lower()
            assert await reader.readexactly(2) == b"{}"
        # Idle past keepalive_s (the sweep runs every second): the server closes it.
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    finally:
        await server.stop(grace_s=1.0)
