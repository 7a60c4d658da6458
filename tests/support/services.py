"""Services run in-process on free loopback ports, for integration tests."""

from __future__ import annotations

import asyncio
import contextlib
import io
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from services.controller.app import ControllerApp
from services.controller.jobs.migrate import MIGRATE, run_migration
from services.controller.jobs.scale_down import run_scale_down
from services.controller.jobs.store import Job
from services.kvstore.app import KVStoreApp
from services.router.app import RouterApp
from services.worker.app import WorkerApp
from shared.config import ControllerSettings, KVStoreSettings, RouterSettings, WorkerSettings, load_settings
from shared.config.base import Environment
from shared.processes import ManagedProcess, free_port, spawn, wait_for_port
from shared.rpc.security import Role
from tests.support.models import TINY_MODEL_NAME
from tests.support.pki import tls_dir
from tests.support.redis import service_password, service_url


def worker_settings(redis_url: str, **overrides: Any) -> WorkerSettings:
    defaults: dict[str, Any] = {
        "redis_url": service_url(redis_url, Role.WORKER),
        "model_name": TINY_MODEL_NAME,
        "grpc_port": 0,
        "metrics_port": 0,
        "heartbeat_interval_s": 0.2,
        "lease_ttl_s": 1.0,
        "kv_cache_bytes": 64 * 2**20,
        "max_batch_tokens": 512,
        "device": "cpu",
        # Several engines share this process: one math thread each keeps them from starving one another.
        "compute_threads": 1,
        "tls_dir": tls_dir(Role.WORKER),
    }
    return load_settings(WorkerSettings, **{**defaults, **overrides})


@asynccontextmanager
async def running_worker(redis_url: str, **overrides: Any) -> AsyncIterator[WorkerApp]:
    app = WorkerApp(worker_settings(redis_url, **overrides))
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


def kvstore_settings(redis_url: str, **overrides: Any) -> KVStoreSettings:
    defaults: dict[str, Any] = {
        "redis_url": service_url(redis_url, Role.KVSTORE),
        "grpc_port": 0,
        "metrics_port": 0,
        "memory_bytes": 64 * 2**20,
        "max_block_bytes": 4 * 2**20,
        "tls_dir": tls_dir(Role.KVSTORE),
    }
    return load_settings(KVStoreSettings, **{**defaults, **overrides})


@asynccontextmanager
async def running_kvstore(redis_url: str, **overrides: Any) -> AsyncIterator[KVStoreApp]:
    app = KVStoreApp(kvstore_settings(redis_url, **overrides))
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


def router_settings(redis_url: str, model_path: Path, **overrides: Any) -> RouterSettings:
    # Development mode: these suites test routing, so requests go without keys; tests/security runs as deployed.
    defaults: dict[str, Any] = {
        "redis_url": service_url(redis_url, Role.ROUTER),
        "models": [f"{TINY_MODEL_NAME}={model_path}"],
        "http_port": 0,
        "env": Environment.DEV,
        "tls_dir": tls_dir(Role.ROUTER),
    }
    return load_settings(RouterSettings, **{**defaults, **overrides})


@dataclass
class RunningRouter:
    app: RouterApp
    url: str


@asynccontextmanager
async def serving(server: uvicorn.Server) -> AsyncIterator[str]:
    """Run a uvicorn server (port 0: a free one) in this loop; yields its base URL."""
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]  # pytest owns signals
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@asynccontextmanager
async def running_router(redis_url: str, model_path: Path, **overrides: Any) -> AsyncIterator[RunningRouter]:
    """A router serving HTTP on a free loopback port, in this process."""
    app = RouterApp(router_settings(redis_url, model_path, **overrides))
    await app.start()
    try:
        port = await app.serve_http()
        yield RunningRouter(app, f"http://127.0.0.1:{port}")
    finally:
        await app.http.stop(grace_s=1.0)
        await app.stop()


ADMIN = "admin-token-for-tests"
OPERATOR = "operator-token-for-tests"
VIEWER = "viewer-token-for-tests"


def controller_settings(redis_url: str, **overrides: Any) -> ControllerSettings:
    defaults: dict[str, Any] = {
        "redis_url": service_url(redis_url, Role.CONTROLLER),
        "local_worker_redis_password": service_password(redis_url, Role.WORKER),
        "http_port": 0,
        "admin_tokens": [f"{ADMIN}:admin", f"{OPERATOR}:operator", f"{VIEWER}:viewer"],
        "reconcile_interval_s": 0.5,
        "tls_dir": tls_dir(Role.CONTROLLER),
        "local_worker_tls_dir": tls_dir(Role.WORKER),
    }
    return load_settings(ControllerSettings, **{**defaults, **overrides})


@dataclass
class RunningController:
    app: ControllerApp
    url: str

    def headers(self, token: str = ADMIN) -> dict[str, str]:
        return {"authorization": f"Bearer {token}"}


def in_process_jobs(app_ref: list[ControllerApp]) -> Any:
    """Run jobs as asyncio tasks in this process instead of a Celery worker."""
    tasks: set[asyncio.Task[Any]] = set()

    def submit(job: Job) -> None:
        app = app_ref[0]
        security = app.security
        task = asyncio.create_task(
            run_migration(job.id, app.jobs, str(job.params["address"]), security)
            if job.kind == MIGRATE
            else run_scale_down(job.id, app.jobs, app.registry, app.desired, security)
        )
        tasks.add(task)
        task.add_done_callback(finished)

    def finished(task: asyncio.Task[Any]) -> None:
        tasks.discard(task)
        # A job that outlives its test fails when the test's Redis goes away. Its error is taken here:
        # left for the garbage collector, asyncio logs it from whatever code is running then, and under
        # Python 3.11 a log written during `ast.parse` makes the parse fail ("AST constructor
        # recursion depth mismatch").
        if not task.cancelled():
            task.exception()

    return submit


@asynccontextmanager
async def running_controller(
    redis_url: str, celery: bool = False, **overrides: Any
) -> AsyncIterator[RunningController]:
    """The controller's API, reconcile loop and local launcher, in this process."""
    holder: list[ControllerApp] = []
    app = ControllerApp(controller_settings(redis_url, **overrides), None if celery else in_process_jobs(holder))
    holder.append(app)
    await app.start()
    try:
        async with serving(app.server(port=0)) as url:
            yield RunningController(app, url)
    finally:
        await app.stop()


def _ep_env(redis_url: str, model_path: Path, worker_id: str, ranks: int, master: int) -> dict[str, str]:
    return {
        "SHOAL_REDIS_URL": service_url(redis_url, Role.WORKER),
        "SHOAL_WORKER_WORKER_ID": worker_id,
        "SHOAL_WORKER_MODEL_PATH": str(model_path),
        "SHOAL_WORKER_ENGINE": "reference",
        "SHOAL_WORKER_DEVICE": "cpu",
        "SHOAL_WORKER_COMPUTE_THREADS": "1",
        "SHOAL_WORKER_EP_SIZE": str(ranks),
        "SHOAL_WORKER_EP_MASTER": f"127.0.0.1:{master}",
        "SHOAL_LOG_LEVEL": "WARNING",
        "SHOAL_TLS_DIR": str(tls_dir(Role.WORKER)),
    }


@contextlib.contextmanager
def ep_worker_processes(
    redis_url: str,
    model_path: Path,
    ranks: int,
    worker_id: str = "ep-worker",
    local_followers: bool = False,
    rank_models: dict[int, Path] | None = None,
    rank_env: dict[int, dict[str, str]] | None = None,
) -> Iterator[tuple[str, list[ManagedProcess]]]:
    """One reference-engine worker spanning `ranks` processes (expert parallelism): (address, processes).

    `local_followers`: start rank 0 alone; it starts the others as its children (as in a pod).
    `rank_models`: a copy of the checkpoint for some ranks (as on separate hosts).
    `rank_env`: more settings for some ranks."""
    port = free_port()
    env = {**_ep_env(redis_url, model_path, worker_id, ranks, free_port()), "SHOAL_WORKER_GRPC_PORT": str(port)}
    if local_followers:
        env["SHOAL_WORKER_EP_LOCAL_FOLLOWERS"] = "true"
    argv = [sys.executable, "-m", "services.worker"]
    models = rank_models or {}
    processes = [
        spawn(
            f"rank{r}",
            argv,
            {
                **env,
                "SHOAL_WORKER_EP_RANK": str(r),
                "SHOAL_WORKER_MODEL_PATH": str(models.get(r, model_path)),
                **(rank_env or {}).get(r, {}),
            },
            out=io.StringIO(),
        )
        for r in range(1 if local_followers else ranks)
    ]
    try:
        wait_for_port("127.0.0.1", port, 120, processes[0])
        yield f"127.0.0.1:{port}", processes
    finally:
        for process in processes:
            process.terminate(grace_s=20)


def ep_joiner(redis_url: str, model_path: Path, ranks: int, worker_id: str) -> tuple[str, ManagedProcess]:
    """A process waiting to join a running instance as its rank `ranks - 1`: (rendezvous address, process)."""
    master = free_port()
    env = {**_ep_env(redis_url, model_path, worker_id, ranks, master), "SHOAL_WORKER_EP_RANK": str(ranks - 1)}
    process = spawn(f"rank{ranks - 1}", [sys.executable, "-m", "services.worker"], {**env, "SHOAL_WORKER_EP_JOIN": "1"})
    return f"127.0.0.1:{master}", process
