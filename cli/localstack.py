"""The whole platform as local processes: what `make run` starts.

Redis on a free port (unless SHOAL_REDIS_URL is set), then every service,
each waited on until its health check answers. Ports of the public APIs come
from the usual settings variables (SHOAL_ROUTER_HTTP_PORT, ...).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cli.supervisor import StartupError, Supervisor
from shared.processes import free_port, redis_server_argv

DEFAULT_MODEL = Path(".cache/models/shoal-tiny-moe")


def grpc_ready(address: str, service: str = "") -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=1
            )
        except grpc.RpcError:
            return False
    return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


def redis_ready(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def run_local_stack(model_path: Path = DEFAULT_MODEL) -> int:
    python = sys.executable
    supervisor = Supervisor()
    supervisor.install_signal_handlers()
    data_dir = tempfile.mkdtemp(prefix="shoal-run-")
    env = dict(os.environ)
    try:
        if "SHOAL_REDIS_URL" not in env:
            port = free_port()
            supervisor.start("redis", redis_server_argv(port, data_dir), ready=lambda: redis_ready(port))
            env["SHOAL_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
        kv_port = free_port()
        supervisor.start(
            "kvstore",
            [python, "-m", "services.kvstore"],
            {**env, "SHOAL_KVSTORE_GRPC_PORT": str(kv_port), "SHOAL_KVSTORE_MEMORY_BYTES": str(512 * 2**20)},
            ready=lambda: grpc_ready(f"127.0.0.1:{kv_port}", "shoal.v1.KVStore"),
        )
        env["SHOAL_ROUTER_KVSTORE_ADDRESS"] = f"127.0.0.1:{kv_port}"
        common = {**env, "SHOAL_WORKER_MODEL_PATH": str(model_path.resolve())}
        for role in ("prefill", "decode"):
            port = free_port()
            supervisor.start(
                f"worker-{role}",
                [python, "-m", "services.worker"],
                {
                    **common,
                    "SHOAL_WORKER_ROLE": role,
                    "SHOAL_WORKER_WORKER_ID": f"{role}-0",
                    "SHOAL_WORKER_POOL": role,
                    "SHOAL_WORKER_GRPC_PORT": str(port),
                },
                ready=lambda port=port: grpc_ready(f"127.0.0.1:{port}", "shoal.v1.Worker"),  # type: ignore[misc]
            )
        print(f"shoal: running (redis {env['SHOAL_REDIS_URL']}); Ctrl-C stops everything", flush=True)
        return supervisor.watch()
    except StartupError as exc:
        print(f"shoal: {exc}", flush=True)
        return 1
    finally:
        supervisor.stop_all()
