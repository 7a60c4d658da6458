"""gRPC client channels: mutual TLS, retries on UNAVAILABLE, tracing, the shared token.

Every channel checks that the peer holds the certificate of the service it
means to reach (shared/rpc/security.py), retries a call that failed with UNAVAILABLE before the server
answered (so a call is never run twice), propagates the trace context, and
adds the internal token when one is configured. Channels carry no default
deadline: callers pass `timeout=` on every call (the client helpers in this
package always do).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Generic, TypeVar

from grpc import aio

from shared.rpc.auth import token_client_interceptors
from shared.rpc.security import Role, RpcSecurity
from shared.rpc.server import MAX_MESSAGE_BYTES
from shared.telemetry.tracing import grpc_client_interceptors

# Deadline of control calls (load, drain, stats): they answer from memory.
CONTROL_TIMEOUT_S = 5.0
# How long a channel replaced after a certificate renewal keeps serving the calls it carries (its certificate
# is still valid: renewals come well before expiry).
RETIRED_GRACE_S = 600.0

_RETRY_POLICY = {
    "methodConfig": [
        {
            "name": [{}],
            "retryPolicy": {
                "maxAttempts": 3,
                "initialBackoff": "0.05s",
                "maxBackoff": "0.5s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        },
        # A long-lived stream: retrying would buffer and replay its messages; its owner reopens it instead.
        {"name": [{"service": "shoal.v1.Worker", "method": "Serve"}]},
    ]
}

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.enable_retries", 1),
    ("grpc.service_config", json.dumps(_RETRY_POLICY)),
    ("grpc.keepalive_time_ms", 30000),
    # Reconnect quickly to a restarted peer instead of backing off for minutes.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


def open_channel(address: str, peer: Role, security: RpcSecurity) -> aio.Channel:
    """An asyncio channel to the `peer` service at `address` ("host:port"). Close it when done."""
    interceptors: list[aio.ClientInterceptor] = list(grpc_client_interceptors())
    if security.token:
        interceptors.extend(token_client_interceptors(security.token))
    return security.grpc_channel(address, peer, CHANNEL_OPTIONS, interceptors)


S = TypeVar("S")


class PeerChannel(Generic[S]):
    """The stub of one peer's service over a channel that follows certificate renewals: after a reload
    (RpcSecurity.generation moved), the next call opens a new channel, which presents the new certificate
    on every connection it makes, and the old one closes once its calls are done."""

    def __init__(self, address: str, peer: Role, security: RpcSecurity, stub: Callable[[aio.Channel], S]) -> None:
        self.address, self.peer, self.security = address, peer, security
        self._make_stub = stub
        self._retiring: set[asyncio.Task[None]] = set()
        self._generation = security.generation
        self._channel = open_channel(address, peer, security)
        self._stub = stub(self._channel)

    @property
    def stub(self) -> S:
        if self._generation != self.security.generation:
            retired = asyncio.create_task(self._channel.close(RETIRED_GRACE_S))
            self._retiring.add(retired)
            retired.add_done_callback(self._retiring.discard)
            self._generation = self.security.generation
            self._channel = open_channel(self.address, self.peer, self.security)
            self._stub = self._make_stub(self._channel)
        return self._stub

    async def close(self) -> None:
        await self._channel.close()
        for retired in list(self._retiring):
            retired.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
