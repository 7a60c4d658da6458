"""gRPC server bootstrap shared by every service.

`GrpcServer.create` builds an asyncio gRPC server on a mutual-TLS port (or a
plaintext one in development, shared/rpc/security.py) with, in order, tracing,
caller identity, token auth (when a token is set) and error mapping
interceptors, plus the standard health (`grpc.health.v1`) and reflection
services. With a health port it also serves health alone in plaintext there,
for the kubelet's gRPC probes. `run_until_signal`
serves until SIGTERM or SIGINT, then marks health NOT_SERVING, runs the
service's own shutdown hook (drain, deregister) and stops with a grace period.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shared.errors import Unavailable
from shared.rpc.auth import TokenAuthInterceptor
from shared.rpc.errors import ErrorInterceptor
from shared.rpc.security import RpcSecurity
from shared.telemetry.logging import get_logger
from shared.telemetry.tracing import grpc_server_interceptors, shutdown_tracing

log = get_logger("shoal.rpc.server")

MAX_MESSAGE_BYTES = 16 * 2**20
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Never share a port with another process: a stale server must not
    # silently receive half the traffic.
    ("grpc.so_reuseport", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5000),
]

Registration = tuple[Callable[[Any, aio.Server], None], Any]
"""(the generated add_XServicer_to_server function, the servicer)."""


@dataclass
class GrpcServer:
    server: aio.Server
    port: int
    health: health.aio.HealthServicer
    service_names: tuple[str, ...]
    health_server: aio.Server | None = None
    health_port: int | None = None

    @classmethod
    async def create(
        cls,
        host: str,
        port: int,
        services: Sequence[Registration],
        service_names: Sequence[str],
        security: RpcSecurity,
        health_port: int | None = None,
    ) -> GrpcServer:
        """Bind (port 0 picks a free port) and start serving."""
        interceptors: list[aio.ServerInterceptor] = [*grpc_server_interceptors(), *security.server_interceptors()]
        if security.token:
            interceptors.append(TokenAuthInterceptor(security.token))
        interceptors.append(ErrorInterceptor())
        server = aio.server(interceptors=interceptors, options=SERVER_OPTIONS)
        for add, servicer in services:
            add(servicer, server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        names = tuple(service_names)
        reflection.enable_server_reflection((*names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        bound = _bind(server, f"{host}:{port}", security.add_port)
        await server.start()
        probes = None
        if health_port is not None:
            probes = aio.server(options=SERVER_OPTIONS)
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer, probes)
            health_port = _bind(probes, f"{host}:{health_port}", lambda s, a: s.add_insecure_port(a))
            await probes.start()
        for name in ("", *names):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "grpc server listening",
            address=f"{host}:{bound}",
            tls=security.tls is not None,
            health_port=health_port,
            services=",".join(names),
        )
        return cls(server, bound, health_servicer, names, probes, health_port)

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def stop(self, grace_s: float) -> None:
        await self.set_serving(False)
        await self.server.stop(grace_s)
        if self.health_server is not None:
            await self.health_server.stop(0)


def _bind(server: aio.Server, address: str, add: Callable[[aio.Server, str], int]) -> int:
    bound = add(server, address)
    if bound == 0:
        raise Unavailable(f"cannot bind gRPC server to {address}: address in use or not available")
    return bound


def stop_event_on_signals() -> asyncio.Event:
    """An event set by the first SIGTERM or SIGINT of the running loop."""
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, event.set)
    return event


async def run_until_signal(
    server: GrpcServer,
    grace_s: float,
    on_shutdown: Callable[[], Awaitable[None]] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until a signal (or `stop`), then shut down gracefully.

    Order: health NOT_SERVING (load balancers stop sending), `on_shutdown`
    (the service drains and deregisters), then the server stops, giving
    in-flight calls `grace_s` seconds.
    """
    stop = stop or stop_event_on_signals()
    await stop.wait()
    log.info("shutting down", grace_s=grace_s)
    await server.set_serving(False)
    if on_shutdown is not None:
        try:
            await asyncio.wait_for(on_shutdown(), timeout=grace_s)
        except TimeoutError:
            log.warning("shutdown hook did not finish in time", grace_s=grace_s)
    await server.stop(grace_s)
    shutdown_tracing()
    log.info("stopped")
