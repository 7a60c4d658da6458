"""A real redis-server on a free loopback port, for tests."""

from __future__ import annotations

import io
import secrets
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from shared.processes import free_port, redis_server_argv, spawn, wait_for_port


@contextmanager
def redis_server() -> Iterator[str]:
    """Run a redis-server that asks for a password, as every deployment's does, for the duration of the
    block; yields its URL (with the password)."""
    with tempfile.TemporaryDirectory(prefix="shoal-redis-") as data_dir:
        port = free_port()
        password = secrets.token_hex(16)
        process = spawn("redis", redis_server_argv(port, data_dir, password=password), out=io.StringIO())
        try:
            wait_for_port("127.0.0.1", port, timeout_s=10, process=process)
            yield f"redis://:{password}@127.0.0.1:{port}/0"
        finally:
            process.terminate(grace_s=5)
