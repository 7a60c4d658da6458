"""A real redis-server on a free loopback port, for tests: a password for the `default` user and one ACL
user per service (shared/state/acl.py), as every deployment has."""

from __future__ import annotations

import io
import secrets
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

from shared.config.base import with_password, without_credentials
from shared.processes import free_port, redis_server_argv, spawn, wait_for_port
from shared.state import acl

# host:port of each server redis_server() runs -> its service users' passwords.
_SERVICE_USERS: dict[str, dict[str, str]] = {}


@contextmanager
def redis_server() -> Iterator[str]:
    """Run a redis-server for the duration of the block; yields its URL as the `default` user (the
    operator's), from which service_url() gives each service's."""
    with tempfile.TemporaryDirectory(prefix="shoal-redis-") as data_dir:
        port = free_port()
        password = secrets.token_hex(16)
        users = {name: secrets.token_hex(16) for name in acl.USER_NAMES}
        argv = redis_server_argv(port, data_dir, password=password, users=users)
        process = spawn("redis", argv, out=io.StringIO())
        _SERVICE_USERS[f"127.0.0.1:{port}"] = users
        try:
            wait_for_port("127.0.0.1", port, timeout_s=10, process=process)
            yield f"redis://:{password}@127.0.0.1:{port}/0"
        finally:
            del _SERVICE_USERS[f"127.0.0.1:{port}"]
            process.terminate(grace_s=5)


def service_password(redis_url: str, user: str) -> str | None:
    """The password of `user` on the server of `redis_url`, if redis_server() runs it with users."""
    parts = urlsplit(redis_url)
    return _SERVICE_USERS.get(f"{parts.hostname}:{parts.port}", {}).get(user)


def service_url(redis_url: str, user: str) -> str:
    """`redis_url` signed in as the service user `user`, where its server has one (else unchanged)."""
    password = service_password(redis_url, user)
    return redis_url if password is None else with_password(without_credentials(redis_url), password, user)
