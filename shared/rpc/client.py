"""gRPC client channels: retries on UNAVAILABLE, tracing, the shared token.

Every channel retries a call that failed with UNAVAILABLE before the server
answered (so a call is never run twice), propagates the trace context, and
adds the internal token when one is configured. Channels carry no default
deadline: callers pass `timeout=` on every call (the client helpers in this
package always do).
"""

from __future__ import annotations

import json

from grpc import aio

from shared.rpc.auth import token_client_interceptors
from shared.rpc.server import MAX_MESSAGE_BYTES
from shared.telemetry.tracing import grpc_client_interceptors

# Deadline of control calls (load, drain, stats): they answer from memory.
CONTROL_TIMEOUT_S = 5.0

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


def open_channel(address: str, token: str | None = None) -> aio.Channel:
    """An asyncio channel to `address` ("host:port"). Close it when done."""
    interceptors: list[aio.ClientInterceptor] = list(grpc_client_interceptors())
    if token:
        interceptors.extend(token_client_interceptors(token))
    return aio.insecure_channel(address, options=CHANNEL_OPTIONS, interceptors=interceptors)
