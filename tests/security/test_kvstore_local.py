"""The kvstore's same-host path is its own user's: the arena and socket are 0600, peers are checked,
and a client cannot make the store map a file of its choosing."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import tempfile
from pathlib import Path

import pytest

from shared.kvlocal import protocol
from tests.support.services import running_kvstore

pytestmark = pytest.mark.integration


async def test_the_arena_and_socket_are_the_store_users_alone(redis_url: str, tmp_path: Path) -> None:
    async with running_kvstore(redis_url, memory_path=tmp_path) as app:
        assert app.local is not None
        assert stat.S_IMODE(os.stat(app.arena.path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(app.local.socket_path).st_mode) == 0o600


@pytest.mark.skipif(os.getuid() != 0, reason="switching to another user needs root")
async def test_another_user_is_refused_even_if_the_socket_let_them_in(redis_url: str) -> None:
    """The peer's uid is checked on every connection: a socket made world-writable by mistake still
    serves no one else."""
    with tempfile.TemporaryDirectory(prefix="shoal-kv-open-") as folder:
        os.chmod(folder, 0o755)  # a folder every user may enter (pytest's are their owner's alone)
        async with running_kvstore(redis_url, memory_path=Path(folder)) as app:
            assert app.local is not None
            path = str(app.local.socket_path)
            os.chmod(path, 0o666)
            assert await asyncio.to_thread(_hello_as_nobody, path) == "closed"


def _hello_as_nobody(path: str) -> str:
    """What another user's hello gets: "answered", or "closed" (the connection ended unanswered)."""
    pid = os.fork()
    if pid == 0:
        code = 2  # the child never returns into pytest, whatever happens
        try:
            os.setgid(65534)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(10)
                sock.connect(path)
                try:
                    sock.sendall(protocol.encode({"op": "hello", "staging": path}))
                    code = 0 if sock.recv(64) == b"" else 1
                except ConnectionError:  # closed before or while the hello went
                    code = 0
        finally:
            os._exit(code)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    return {0: "closed", 1: "answered"}.get(code, f"exit {code}")


async def test_a_hello_cannot_name_a_file_outside_the_staging_folder(redis_url: str, tmp_path: Path) -> None:
    secret = tmp_path.parent / "not-a-staging-file"
    secret.write_bytes(b"private" * 100)
    async with running_kvstore(redis_url, memory_path=tmp_path) as app:
        assert app.local is not None
        reader, writer = await asyncio.open_unix_connection(str(app.local.socket_path))
        for named in (str(secret), str(tmp_path / "not-staging"), str(tmp_path / "shoal-kv-staging-1/../../x")):
            writer.write(protocol.encode({"op": "hello", "staging": named}))
            await writer.drain()
            reply = await protocol.read_message(reader)
            assert reply is not None and reply["error"]["code"] == "invalid_argument", reply
        writer.close()
