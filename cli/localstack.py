"""The whole platform as local processes: what `make run` starts (and e2e tests).

Redis on a free port (unless SHOAL_REDIS_URL is set), the kvstore, the
workers, then the router, each waited on until its health check answers.
Public ports come from the usual variables (SHOAL_ROUTER_HTTP_PORT, ...) or
the StackConfig; internal ones are picked free.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
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


def http_ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def redis_ready(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class StackConfig:
    model_path: Path = DEFAULT_MODEL
    router_port: int = 8000
    # (role, engine) of each worker to start.
    workers: list[tuple[str, str]] = field(default_factory=lambda: [("prefill", "reference"), ("decode", "reference")])
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Endpoints:
    redis_url: str = ""
    kvstore: str = ""
    router: str = ""
    workers: dict[str, str] = field(default_factory=dict)


class LocalStack:
    def __init__(self, config: StackConfig, supervisor: Supervisor) -> None:
        self.config = config
        self.supervisor = supervisor
        self.endpoints = Endpoints()
        self._data_dir = tempfile.mkdtemp(prefix="shoal-run-")

    def start(self) -> Endpoints:
        """Start every process in dependency order; raises StartupError if one fails."""
        python = sys.executable
        env = {**os.environ, **self.config.env}
        model = str(self.config.model_path.resolve())
        if "SHOAL_REDIS_URL" not in env:
            port = free_port()
            self.supervisor.start("redis", redis_server_argv(port, self._data_dir), ready=lambda: redis_ready(port))
            env["SHOAL_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
        self.endpoints.redis_url = env["SHOAL_REDIS_URL"]

        kv_port = free_port()
        kvstore = f"127.0.0.1:{kv_port}"
        self.supervisor.start(
            "kvstore",
            [python, "-m", "services.kvstore"],
            {**env, "SHOAL_KVSTORE_GRPC_PORT": str(kv_port), "SHOAL_KVSTORE_MEMORY_BYTES": str(512 * 2**20)},
            ready=lambda: grpc_ready(kvstore, "shoal.v1.KVStore"),
        )
        self.endpoints.kvstore = kvstore

        # Workers on one host split its cores: two OpenMP teams spinning on the
        # same cores make each other many times slower.
        threads = str(max(1, (os.cpu_count() or 1) // max(1, len(self.config.workers))))
        for index, (role, engine) in enumerate(self.config.workers):
            port = free_port()
            address = f"127.0.0.1:{port}"
            worker_id = f"{role}-{index}"
            self.supervisor.start(
                f"worker-{worker_id}",
                [python, "-m", "services.worker"],
                {
                    **env,
                    "SHOAL_WORKER_MODEL_PATH": model,
                    "SHOAL_WORKER_ENGINE": engine,
                    "SHOAL_WORKER_ROLE": role,
                    "SHOAL_WORKER_WORKER_ID": worker_id,
                    "SHOAL_WORKER_POOL": role,
                    "SHOAL_WORKER_GRPC_PORT": str(port),
                    "SHOAL_WORKER_COMPUTE_THREADS": env.get("SHOAL_WORKER_COMPUTE_THREADS", threads),
                },
                ready=lambda address=address: grpc_ready(address, "shoal.v1.Worker"),  # type: ignore[misc]
            )
            self.endpoints.workers[worker_id] = address

        router_port = int(env.get("SHOAL_ROUTER_HTTP_PORT", self.config.router_port))
        router = f"http://127.0.0.1:{router_port}"
        self.supervisor.start(
            "router",
            [python, "-m", "services.router"],
            {
                **env,
                "SHOAL_ROUTER_MODEL_PATH": model,
                "SHOAL_ROUTER_HTTP_PORT": str(router_port),
                "SHOAL_ROUTER_KVSTORE_ADDRESS": kvstore,
            },
            ready=lambda: http_ready(f"{router}/health"),
        )
        self.endpoints.router = router
        return self.endpoints


def run_local_stack(model_path: Path = DEFAULT_MODEL) -> int:
    supervisor = Supervisor()
    supervisor.install_signal_handlers()
    try:
        endpoints = LocalStack(StackConfig(model_path=model_path), supervisor).start()
        print(
            f"\nshoal is up:\n  OpenAI API   {endpoints.router}/v1   (try: curl {endpoints.router}/v1/models)\n"
            f"  redis        {endpoints.redis_url}\n  kvstore      {endpoints.kvstore}\n"
            "Ctrl-C stops everything.\n",
            flush=True,
        )
        return supervisor.watch()
    except StartupError as exc:
        print(f"shoal: {exc}", flush=True)
        return 1
    finally:
        supervisor.stop_all()
