"""Opening the asyncio Redis client every service uses for cluster state."""

from __future__ import annotations

from redis.asyncio import Redis


def connect(url: str) -> Redis:
    """A client for `url` with short timeouts, so a Redis outage never hangs a caller."""
    return Redis.from_url(
        url,
        socket_timeout=5.0,
        socket_connect_timeout=2.0,
        health_check_interval=15,
        retry_on_timeout=True,
    )
