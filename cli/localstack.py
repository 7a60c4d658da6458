"""The whole platform as local processes: what `make run` starts (and e2e tests).

Redis on a free port (unless SHOAL_REDIS_URL is set), the kvstore, the
controller's Celery worker, the controller (which starts the workers of its
bootstrap pools through the local actuator), then the router (which serves
every model the controller holds), each waited on until its health check
answers. Public ports come from the usual variables
(SHOAL_ROUTER_HTTP_PORT, SHOAL_CONTROLLER_HTTP_PORT) or the StackConfig;
internal ones are picked free. The admin token is SHOAL_ADMIN_TOKEN, or a
fresh one that `make run` prints. Internal channels run over mutual TLS with
a throwaway CA and one certificate per service made in the run's data folder
(`pki/`), unless SHOAL_RPC_PLAINTEXT=true.
"""

from __future__ import annotations

import io
import os
import secrets
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cli.supervisor import StartupError, Supervisor
from shared.config.base import redacted_url, with_password, without_credentials
from shared.processes import free_port, redis_server_argv
from shared.rpc.pki import init_pki
from shared.rpc.security import Role, RpcSecurity, TLSFiles
from shared.state import acl

DEFAULT_MODEL = Path(".cache/models/shoal-tiny-moe")
# `make run`'s Redis keeps its append-only file here: pools and models made through the admin API are
# still there at the next `make run` (delete the folder for a clean start).
RUN_DATA = Path(".cache/run")
ALERT_RULES = Path(__file__).resolve().parent.parent / "deploy/helm/shoal/monitoring/alerts.yaml"
DEV_MODE_LINE = (
    "               development mode: callers without a key are admitted too (SHOAL_ENV=prod requires one)\n"
)


def grpc_ready(address: str, service: str, security: RpcSecurity, peer: Role) -> bool:
    with security.blocking_channel(address, peer) as channel:
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


def router_ready(url: str, pid: int) -> bool:
    """The router process `pid` answers /health on `url` (which several routers may share)."""
    try:
        response = httpx.get(f"{url}/health", timeout=1)
        return response.status_code == 200 and response.json().get("pid") == pid
    except (httpx.HTTPError, ValueError):  # ValueError: not JSON, so not a router
        return False


def redis_ready(port: int, password: str) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(f"AUTH {password}\r\nPING\r\n".encode())
            return sock.recv(32) == b"+OK\r\n+PONG\r\n"
    except OSError:
        return False


@dataclass
class StackConfig:
    model_path: Path = DEFAULT_MODEL
    router_port: int = 8000
    controller_port: int = 8080
    # (role, engine) of each worker; workers of one role form one pool.
    workers: list[tuple[str, str]] = field(default_factory=lambda: [("prefill", "reference"), ("decode", "reference")])
    # How far each pool may grow above its initial size under load.
    headroom: int = 0
    # Extra worker settings per pool (its `worker_env`), e.g. {"decode": {"EP_SIZE": "2"}}.
    pool_env: dict[str, dict[str, str]] = field(default_factory=dict)
    # Router processes sharing the OpenAI port (SO_REUSEPORT: the kernel spreads connections over them).
    routers: int = 1
    env: dict[str, str] = field(default_factory=dict)
    # Where Redis keeps its append-only file (desired state survives a restart); a fresh folder if None.
    data_dir: Path | None = None
    # Further models behind the same router, each served by one mixed pool of one worker: (name, checkpoint).
    more_models: list[tuple[str, Path]] = field(default_factory=list)


@dataclass
class Endpoints:
    """Where the started stack answers, and the credentials to call it with."""

    redis_url: str = ""
    kvstore: str = ""
    # host:port of the kvstore's Prometheus endpoint.
    kvstore_metrics: str = ""
    router: str = ""
    controller: str = ""
    admin_token: str = ""
    # An OpenAI API key made through the admin API at start (no limits).
    api_key: str = ""
    # The run's internal token: gRPC calls, data channels, and the key of a worker's own OpenAI API.
    internal_token: str = ""
    # SHOAL_ENV=dev (the default here): the OpenAI API admits callers without a key.
    dev_mode: bool = False
    # The run's certificates (shared/rpc/pki.py layout); None: plaintext internal channels.
    pki: Path | None = None
    # Each service's Redis user and its password (shared/state/acl.py); empty: services share `redis_url`'s.
    redis_users: dict[str, str] = field(default_factory=dict)
    workers: dict[str, str] = field(default_factory=dict)
    # Worker id -> host:port of its own OpenAI API, for workers started with SHOAL_WORKER_HTTP_PORT.
    worker_http: dict[str, str] = field(default_factory=dict)

    @property
    def api_headers(self) -> dict[str, str]:
        """Headers of a request to the router's OpenAI API."""
        return {"authorization": f"Bearer {self.api_key}"}

    def tls_env(self, role: Role, variable: str = "SHOAL_TLS_DIR") -> dict[str, str]:
        """The settings that give a process of `role` the stack's certificates (in `variable`)."""
        if self.pki is None:
            return {"SHOAL_RPC_PLAINTEXT": "true"}
        return {variable: str(self.pki / role.value)}

    def service_env(self, role: Role) -> dict[str, str]:
        """The settings a service process of `role` gets: its certificates and its own Redis user."""
        env = self.tls_env(role)
        if role.value in self.redis_users:
            env |= {
                "SHOAL_REDIS_URL": without_credentials(self.redis_url),
                "SHOAL_REDIS_USERNAME": role.value,
                "SHOAL_REDIS_PASSWORD": self.redis_users[role.value],
            }
        return env

    def security(self, role: Role) -> RpcSecurity:
        """Credentials to call the stack's internal services as `role` (tests and benchmarks)."""
        if self.pki is None:
            return RpcSecurity(role, None, self.internal_token)
        return RpcSecurity.for_role(role, TLSFiles.load(self.pki / role.value), self.internal_token)


def bootstrap_document(config: StackConfig, model_name: str, model_path: str) -> dict[str, Any]:
    """The models and pools the controller creates at start: one pool per role of the first model, one
    mixed pool (named as its model) for each further model."""
    pools: dict[str, dict[str, Any]] = {}
    for role, engine in config.workers:
        pool = pools.setdefault(role, {"name": role, "model": model_name, "role": role, "engine": engine})
        pool["min_replicas"] = pool.get("min_replicas", 0) + 1
        pool["max_replicas"] = pool["min_replicas"] + config.headroom
        if role in config.pool_env:
            pool["worker_env"] = config.pool_env[role]
    models = [{"name": model_name, "path": model_path}]
    for name, path in config.more_models:
        models.append({"name": name, "path": str(path.resolve())})
        pools[name] = {"name": name, "model": name, "role": "mixed", "min_replicas": 1, "max_replicas": 1}
    return {"models": models, "pools": list(pools.values())}


class LocalStack:
    def __init__(self, config: StackConfig, supervisor: Supervisor) -> None:
        self.config = config
        self.supervisor = supervisor
        self.endpoints = Endpoints()
        self._data_dir = str(config.data_dir) if config.data_dir else tempfile.mkdtemp(prefix="shoal-run-")
        Path(self._data_dir).mkdir(parents=True, exist_ok=True)

    def start(self) -> Endpoints:
        """Start every process in dependency order; raises StartupError if one fails."""
        python = sys.executable
        env = {**os.environ, **self.config.env}
        model = str(self.config.model_path.resolve())
        model_name = env.get("SHOAL_ROUTER_MODEL_NAME", "shoal-tiny-moe")
        # A development stack on this machine: the OpenAI API also admits callers without a key (each service
        # warns; SHOAL_ENV=prod requires one). Redis's password and the internal token are on either way.
        env.setdefault("SHOAL_ENV", "dev")
        self.endpoints.dev_mode = env["SHOAL_ENV"] == "dev"
        # Secrets of this run: Redis's password and the internal token (every gRPC call and data channel).
        self.endpoints.internal_token = env.setdefault("SHOAL_INTERNAL_TOKEN", secrets.token_hex(16))
        # The key agent graphs' LLM steps present to the router (a static key: the router has no limits on it).
        graphs_key = env.setdefault("SHOAL_CONTROLLER_ROUTER_API_KEYS", f"sk-graphs-{secrets.token_hex(16)}")
        env.setdefault("SHOAL_ROUTER_API_KEYS", graphs_key)
        if "SHOAL_REDIS_URL" not in env:
            port = free_port()
            password = env.setdefault("SHOAL_REDIS_PASSWORD", secrets.token_hex(16))
            # Each service signs in as its own ACL user; the default user's password stays with this process.
            self.endpoints.redis_users = {name: secrets.token_hex(16) for name in acl.USER_NAMES}
            # An append-only file: desired state (pools, models) survives a restart of Redis.
            argv = redis_server_argv(
                port, self._data_dir, persistent=True, password=password, users=self.endpoints.redis_users
            )
            self.supervisor.start("redis", argv, ready=lambda: redis_ready(port, password))
            env["SHOAL_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
        self.endpoints.redis_url = with_password(env["SHOAL_REDIS_URL"], env.get("SHOAL_REDIS_PASSWORD", ""))
        self._certificates(env)
        tls = self.endpoints.service_env

        kv_port, kv_metrics_port = free_port(), free_port()
        kvstore = f"127.0.0.1:{kv_port}"
        self.supervisor.start(
            "kvstore",
            [python, "-m", "services.kvstore"],
            {
                **env,
                **tls(Role.KVSTORE),
                "SHOAL_KVSTORE_GRPC_PORT": str(kv_port),
                "SHOAL_KVSTORE_METRICS_PORT": str(kv_metrics_port),
                "SHOAL_KVSTORE_MEMORY_BYTES": str(512 * 2**20),
            },
            ready=lambda: grpc_ready(kvstore, "shoal.v1.KVStore", self.endpoints.security(Role.ROUTER), Role.KVSTORE),
        )
        self.endpoints.kvstore = kvstore
        self.endpoints.kvstore_metrics = f"127.0.0.1:{kv_metrics_port}"

        # The controller owns the workers (local actuator): they start from the bootstrap pools.
        token = env.get("SHOAL_ADMIN_TOKEN") or secrets.token_hex(16)
        bootstrap = Path(self._data_dir) / "bootstrap.yaml"
        bootstrap.write_text(yaml.safe_dump(bootstrap_document(self.config, model_name, model)))
        controller_port = int(env.get("SHOAL_CONTROLLER_HTTP_PORT", self.config.controller_port))
        controller = f"http://127.0.0.1:{controller_port}"
        env["SHOAL_CONTROLLER_ADMIN_TOKENS"] = env.get("SHOAL_CONTROLLER_ADMIN_TOKENS", f"{token}:admin")
        router_port = int(env.get("SHOAL_ROUTER_HTTP_PORT", self.config.router_port))
        router = f"http://127.0.0.1:{router_port}"
        self.supervisor.start("celery", [python, "-m", "services.controller.jobs"], {**env, **tls(Role.CONTROLLER)})
        self.supervisor.start(
            "controller",
            [python, "-m", "services.controller"],
            {
                **env,
                **tls(Role.CONTROLLER),
                **self.endpoints.tls_env(Role.WORKER, "SHOAL_CONTROLLER_LOCAL_WORKER_TLS_DIR"),
                **self._local_worker_redis(),
                "SHOAL_CONTROLLER_HTTP_PORT": str(controller_port),
                "SHOAL_CONTROLLER_BOOTSTRAP": str(bootstrap),
                "SHOAL_CONTROLLER_ROUTER_URL": router,
            },
            ready=lambda: http_ready(f"{controller}/health"),
        )
        self.endpoints.controller, self.endpoints.admin_token = controller, token
        registered = self._wait_for_workers(controller, token, len(self.config.workers) + len(self.config.more_models))
        self.endpoints.api_key = env.get("SHOAL_API_KEY") or self._create_api_key(controller, token)
        self.endpoints.workers = {w["worker_id"]: w["address"] for w in registered}
        self.endpoints.worker_http = {w["worker_id"]: w["http_address"] for w in registered if w["http_address"]}

        for index in range(self.config.routers):
            name = "router" if self.config.routers == 1 else f"router-{index}"
            self.supervisor.start(
                name,
                [python, "-m", "services.router"],
                {
                    **env,
                    **tls(Role.ROUTER),
                    "SHOAL_ROUTER_HTTP_PORT": str(router_port),
                    "SHOAL_ROUTER_KVSTORE_ADDRESS": kvstore,
                    "SHOAL_ROUTER_REUSE_PORT": "true" if self.config.routers > 1 else "false",
                },
                ready=self._router_ready(router, name),
            )
        self.endpoints.router = router
        write_prometheus_config(self.endpoints, Path(self._data_dir) / "prometheus.yml")
        return self.endpoints

    def _certificates(self, env: dict[str, str]) -> None:
        """Make the run's certificates (kept while valid), unless internal channels are to be plaintext."""
        if env.get("SHOAL_RPC_PLAINTEXT", "").lower() not in {"1", "true", "yes"}:
            self.endpoints.pki = Path(self._data_dir).resolve() / "pki"
            init_pki(self.endpoints.pki)

    def _local_worker_redis(self) -> dict[str, str]:
        """The Redis user of the workers the controller starts."""
        password = self.endpoints.redis_users.get(Role.WORKER.value)
        return {"SHOAL_CONTROLLER_LOCAL_WORKER_REDIS_PASSWORD": password} if password else {}

    def _router_ready(self, url: str, name: str) -> Callable[[], bool]:
        """With several routers on the port, a health check may land on another: wait for this one's pid."""
        return lambda: router_ready(url, self.supervisor.pid(name))

    @staticmethod
    def _create_api_key(controller: str, token: str) -> str:
        response = httpx.post(
            f"{controller}/v1/keys", json={"name": "local"}, headers={"authorization": f"Bearer {token}"}, timeout=10
        )
        response.raise_for_status()
        return str(response.json()["key"])

    def _wait_for_workers(
        self, controller: str, token: str, count: int, timeout_s: float = 180.0
    ) -> list[dict[str, Any]]:
        """The admin API's listing of the controller's workers, once they have all registered."""
        deadline = time.monotonic() + timeout_s
        headers = {"authorization": f"Bearer {token}"}
        while time.monotonic() < deadline:
            self.supervisor.check_alive()
            workers = httpx.get(f"{controller}/v1/workers", headers=headers, timeout=5).json()
            if len(workers) >= count:
                return list(workers)
            time.sleep(0.5)
        raise StartupError(f"the controller's {count} worker(s) did not register within {timeout_s:.0f}s")


def prometheus_config(endpoints: Endpoints, rules: Path = ALERT_RULES, interval_s: float = 15.0) -> dict[str, Any]:
    """A Prometheus configuration scraping the stack under the job names the dashboards and alert rules use:
    the router, controller and kvstore at fixed addresses, the workers through the controller's service
    discovery (they come and go on free ports)."""
    host = endpoints.controller.removeprefix("http://")
    interval = f"{interval_s:g}s"

    def static(job: str, target: str) -> dict[str, Any]:
        return {"job_name": job, "static_configs": [{"targets": [target]}]}

    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(rules.resolve())],
        "scrape_configs": [
            static("shoal-router", endpoints.router.removeprefix("http://")),
            static("shoal-controller", host),
            static("shoal-kvstore", endpoints.kvstore_metrics),
            {
                "job_name": "shoal-worker",
                "http_sd_configs": [
                    {
                        "url": f"{endpoints.controller}/v1/monitoring/targets",
                        "refresh_interval": interval,
                        "authorization": {"credentials": endpoints.admin_token},
                    }
                ],
            },
        ],
    }


def write_prometheus_config(endpoints: Endpoints, path: Path) -> None:
    """`prometheus_config` as a file only its owner reads (it holds the admin token)."""
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(yaml.safe_dump(prometheus_config(endpoints), sort_keys=False))


@contextmanager
def local_stack(
    model: Path,
    workers: list[tuple[str, str]],
    env: dict[str, str] | None = None,
    more_models: list[tuple[str, Path]] | None = None,
    pool_env: dict[str, dict[str, str]] | None = None,
) -> Iterator[tuple[Endpoints, Supervisor]]:
    """The stack on free ports with these workers and settings, its services' output kept quiet (tests,
    benchmarks)."""
    supervisor = Supervisor(grace_s=5)
    config = StackConfig(
        model_path=model,
        router_port=free_port(),
        controller_port=free_port(),
        workers=workers,
        env=env or {},
        more_models=more_models or [],
        pool_env=pool_env or {},
    )
    stack = LocalStack(config, supervisor)
    captured = io.StringIO()
    real_stdout, sys.stdout = sys.stdout, captured  # keep the services' logs out of the test report
    try:
        endpoints = stack.start()
        sys.stdout = real_stdout
        yield endpoints, supervisor
    finally:
        sys.stdout = real_stdout
        supervisor.stop_all()


def run_local_stack(model_path: Path = DEFAULT_MODEL, second: Path | None = None, routers: int = 1) -> int:
    supervisor = Supervisor()
    supervisor.install_signal_handlers()
    try:
        # The decode pool may grow by one worker under load: the autoscaler at work. Its workers are
        # expert-parallel instances of two ranks, so the console's Experts page has a live instance to show.
        config = StackConfig(
            model_path=model_path,
            headroom=1,
            pool_env={"decode": {"EP_SIZE": "2"}},
            routers=routers,
            data_dir=RUN_DATA,
            more_models=[(second.name, second)] if second else [],
        )
        endpoints = LocalStack(config, supervisor).start()
        print(
            f"\nshoal is up:\n  OpenAI API   {endpoints.router}/v1\n"
            f"  API key      {endpoints.api_key}\n"
            f"               (curl -H 'Authorization: Bearer {endpoints.api_key}' {endpoints.router}/v1/models)\n"
            f"{DEV_MODE_LINE if endpoints.dev_mode else ''}"
            f"  admin API    {endpoints.controller}/docs   token: {endpoints.admin_token}\n"
            f"               (export SHOAL_ADMIN_TOKEN={endpoints.admin_token}; .venv/bin/shoal status)\n"
            f"  redis        {redacted_url(endpoints.redis_url)}\n  kvstore      {endpoints.kvstore}\n"
            f"  internal TLS {endpoints.pki or 'off (SHOAL_RPC_PLAINTEXT)'}\n"
            f"  console      {endpoints.controller}/ui   (the admin token above)\n"
            f"  prometheus   prometheus --config.file={RUN_DATA / 'prometheus.yml'}\n"
            "Ctrl-C stops everything.\n",
            flush=True,
        )
        return supervisor.watch()
    except StartupError as exc:
        print(f"shoal: {exc}", flush=True)
        return 1
    finally:
        supervisor.stop_all()
