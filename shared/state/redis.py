"""Opening the asyncio Redis client every service uses for cluster state."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.asyncio import Redis

from shared.state import schema

T = TypeVar("T")


def connect(url: str) -> Redis:
    """A client for `url` with short timeouts, so a Redis outage never hangs a caller."""
    return Redis.from_url(
        url,
        socket_timeout=5.0,
        socket_connect_timeout=2.0,
        health_check_interval=15,
        retry_on_timeout=True,
    )


async def read_marked(redis: Redis, read: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
    """`read()`, and whether the cluster mark stood both before and after it.

    Without the mark Redis lost its data (wiped, or restarted empty) and the
    controller has not finished writing it back (it marks the cluster last), so
    what was read may be empty or partial: a reader keeps what it knew."""
    before = await redis.exists(schema.CLUSTER)
    result = await read()
    return result, bool(before) and bool(await redis.exists(schema.CLUSTER))
