"""The controller process: admin API, reconcile loop, local launcher.

Long operations run as Celery jobs in a separate worker process
(`python -m services.controller.jobs`); this process opens them and keeps
their state. With the local actuator it also owns the worker processes it
starts (the LocalLauncher).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import uvicorn
import yaml
from redis.exceptions import RedisError

from services.controller.actuators.factory import make_actuator
from services.controller.agents.egress import EgressPolicy
from services.controller.agents.runner import GraphRunner, GraphStore, ToolRunner
from services.controller.api.audit import AuditLog
from services.controller.api.routes import build_api
from services.controller.desired import DesiredState
from services.controller.experts import ExpertWatch
from services.controller.jobs.migrate import MIGRATE
from services.controller.jobs.store import Job, JobStore
from services.controller.launcher import LocalLauncher
from services.controller.reconcile import SCALE_DOWN, ReconcileMetrics, Reconciler
from shared.config import ControllerSettings
from shared.config.base import without_credentials
from shared.errors import AlreadyExists, FailedPrecondition, NotFound
from shared.httpapi import http_server
from shared.policies.agents import Hardware, queue_wait
from shared.policies.scaling import PolicyState
from shared.rpc.pool import ClientPool
from shared.rpc.security import RELOAD_INTERVAL_S, Role, RpcSecurity
from shared.rpc.worker_client import WorkerClient
from shared.state.apikeys import APIKeyStore
from shared.state.redis import connect
from shared.state.registry import WorkerRegistry
from shared.telemetry.logging import get_logger
from shared.telemetry.metrics import new_registry
from shared.ticker import Ticker
from shared.types.pools import AliasSpec, ModelCreate, PoolCreate

log = get_logger("shoal.controller")

LAUNCH_INTERVAL_S = 0.5


def celery_tools(settings: ControllerSettings) -> ToolRunner:
    """Run a registered tool on the Celery worker: one attempt, in a process of its own there, which the task
    kills at the attempt's timeout, or when revoked (this side gave up: it timed out waiting, or the graph was
    cancelled)."""
    from services.controller.jobs.celery_app import configure

    app = configure(settings)

    async def run(name: str, args: dict[str, str], timeout_s: float) -> str:
        from celery.exceptions import TimeoutError as CeleryTimeout

        result = await asyncio.to_thread(app.send_task, "shoal.agent_tool", args=[name, args, timeout_s])
        try:
            # The task stops its tool at timeout_s after it starts; waiting in the queue counts here too.
            return str(await asyncio.to_thread(result.get, timeout=timeout_s, disable_sync_subtasks=False))
        except (CeleryTimeout, asyncio.CancelledError) as exc:
            await asyncio.to_thread(result.revoke)
            if isinstance(exc, CeleryTimeout):
                raise TimeoutError(f"tool {name!r} took over {timeout_s:g}s") from None
            raise

    return run


def celery_submit(settings: ControllerSettings) -> Callable[[Job], None]:
    """Queue jobs for the Celery worker (imported here: tests may run jobs in-process instead)."""
    from services.controller.jobs.celery_app import configure
    from services.controller.jobs.tasks import TASKS

    app = configure(settings)

    def submit(job: Job) -> None:
        app.send_task(TASKS[job.kind], args=[job.id])

    return submit


class ControllerApp:
    def __init__(self, settings: ControllerSettings, submit: Callable[[Job], None] | None = None) -> None:
        self.settings = settings
        self.security = RpcSecurity.from_settings(settings, Role.CONTROLLER)
        self.tokens = [tuple(item.rsplit(":", 1)) for item in settings.admin_tokens]
        if not self.tokens:
            raise FailedPrecondition(
                "the controller needs SHOAL_CONTROLLER_ADMIN_TOKENS (token:role, e.g. $(openssl rand -hex 16):admin)"
            )
        self.redis = connect(settings.redis_url)
        self.desired = DesiredState(self.redis)
        self.registry = WorkerRegistry(self.redis)
        self.jobs = JobStore(self.redis, settings.job_lease_s)
        self.actuator = make_actuator(settings, self.redis)
        # Local workers find the cluster where the controller does, as the Redis user `worker` when it has one.
        worker_env = {"SHOAL_REDIS_URL": settings.redis_url}
        if settings.local_worker_redis_password:
            worker_env["SHOAL_REDIS_URL"] = without_credentials(settings.redis_url)
            worker_env["SHOAL_REDIS_USERNAME"] = "worker"
            worker_env["SHOAL_REDIS_PASSWORD"] = settings.local_worker_redis_password
        if settings.internal_token:
            worker_env["SHOAL_INTERNAL_TOKEN"] = settings.internal_token
        if settings.rpc_plaintext:
            worker_env["SHOAL_RPC_PLAINTEXT"] = "true"
        elif settings.local_worker_tls_dir is not None:
            worker_env["SHOAL_TLS_DIR"] = str(settings.local_worker_tls_dir)
        self.launcher = (
            LocalLauncher(self.redis, worker_env, settings.local_max_workers) if settings.actuator == "local" else None
        )
        self.metrics_registry = new_registry()
        self.reconciler = Reconciler(
            self.redis,
            self.actuator,
            submit or celery_submit(settings),
            ReconcileMetrics(self.metrics_registry),
            cold_starts=self.launcher.cold_starts.get if self.launcher else lambda _pool: None,
            job_lease_s=settings.job_lease_s,
        )
        self.graphs = GraphStore(self.redis)
        self.api_keys = APIKeyStore(self.redis)
        self.audit = AuditLog(self.redis)
        self.graph_runner = GraphRunner(
            self.graphs,
            settings.router_url,
            celery_tools(settings),
            self.catalogue,
            settings.router_api_keys[0] if settings.router_api_keys else None,
            EgressPolicy(settings.tool_hosts),
        )
        self.api = build_api(self)
        self._reconcile = Ticker("reconcile", settings.reconcile_interval_s, self._tick)
        # Clients of the workers the controller calls itself (expert statistics, drains), kept open.
        self.worker_clients: ClientPool[WorkerClient] = ClientPool(lambda a: WorkerClient(a, self.security))
        self.expert_watch = ExpertWatch(self.redis, self.registry, self.worker_clients, settings, self.open_migration)
        self._experts = Ticker("experts", settings.expert_stats_interval_s, self._watch_experts)
        self._certificates = Ticker("certificates", RELOAD_INTERVAL_S, self.security.watch)
        self._launch = Ticker("launcher", LAUNCH_INTERVAL_S, self.launcher.tick) if self.launcher else None
        self.started_at = time.time()

    async def _tick(self) -> None:
        try:
            await self.reconciler.tick()
            await self.reconciler.flush_decisions()
        except (RedisError, OSError) as exc:
            log.warning("reconcile skipped: redis unreachable", error=str(exc))

    async def _watch_experts(self) -> None:
        try:
            await self.expert_watch.tick()
        except (RedisError, OSError) as exc:
            log.warning("expert statistics skipped: redis unreachable", error=str(exc))

    async def open_scale_down(self, pool: str, worker_id: str) -> Job:
        job, created = await self.jobs.create(
            SCALE_DOWN, {"pool": pool, "worker_id": worker_id}, job_id=f"{SCALE_DOWN}-{worker_id}"
        )
        if created:
            self.reconciler.submit(job)
        return job

    async def open_migration(self, worker_id: str, address: str, plan: dict[str, object]) -> Job:
        """A live expert migration job for one instance (one at a time: the id is per instance)."""
        return await self._open_expert_job(worker_id, {"address": address, "plan": plan})

    async def open_resize(
        self, worker_id: str, address: str, ranks: int, master: str | None, policy: str, source: str
    ) -> Job:
        """Grow (the rank waiting at `master` joins) or shrink an expert-parallel instance by one rank, live.

        It shares the instance's migration job id: no migration runs beside it."""
        resize: dict[str, object] = {"ranks": ranks, **({"master": master} if master else {})}
        return await self._open_expert_job(
            worker_id, {"address": address, "resize": resize, "policy": policy, "source": source}
        )

    async def _open_expert_job(self, worker_id: str, params: dict[str, object]) -> Job:
        job, created = await self.jobs.create(
            MIGRATE, {"worker_id": worker_id, **params}, job_id=f"{MIGRATE}-{worker_id}"
        )
        if not created:
            raise FailedPrecondition(f"migration {job.id} is still {job.state.value}; one at a time", job_id=job.id)
        self.reconciler.submit(job)
        return job

    async def catalogue(self) -> list[Hardware]:
        """The hardware catalogue: each pool's GPU type, price and speed, measured where the autoscaler has
        learned its capacity and the workers report their time between tokens, declared otherwise; the
        queueing a step meets there now from the schedulable workers' load reports."""
        workers = await self.registry.list_workers()
        entries = []
        for pool in await self.desired.pools():
            learned = self.reconciler.states.get(pool.name, PolicyState())
            members = [w for w in workers if w.info.pool == pool.name]
            tbts = [w.load.tbt_p90_s for w in members if w.load.tbt_p90_s > 0]
            entries.append(
                Hardware(
                    pool=pool.name,
                    model=pool.model,
                    gpu_type=pool.gpu_type,
                    cost_per_hour=pool.cost_per_hour,
                    prefill_tps=learned.prefill_capacity or pool.capacity.prefill_tokens_per_s,
                    decode_tps=learned.decode_capacity or pool.capacity.decode_tokens_per_s,
                    stream_tps=1.0 / (min(tbts) if tbts else pool.slo.tbt_p90_s),
                    measured=bool(tbts) or learned.prefill_capacity is not None,
                    wait_s=queue_wait((w.load.waiting_requests, w.load.ttft_p90_s) for w in members if w.schedulable),
                )
            )
        return entries

    async def bootstrap(self, path: Path) -> None:
        """Create the models, pools and aliases a YAML file lists, unless they exist."""
        document = yaml.safe_load(await asyncio.to_thread(path.read_text)) or {}
        for model in document.get("models", []):
            with contextlib.suppress(AlreadyExists):
                await self.desired.create_model(ModelCreate(**model))
        for pool in document.get("pools", []):
            with contextlib.suppress(AlreadyExists):
                await self.desired.create_pool(PoolCreate(**pool))
        for alias, target in (document.get("aliases") or {}).items():
            try:
                await self.desired.alias(alias)  # an alias switched since is left where it points
            except NotFound:
                await self.desired.set_alias(alias, AliasSpec(model=target))

    async def start(self) -> None:
        await self.graph_runner.fail_orphans()
        if self.settings.bootstrap:
            await self.bootstrap(self.settings.bootstrap)
        if self._launch is not None:
            self._launch.start()
        self._reconcile.start()
        self._experts.start()
        self._certificates.start()
        log.info("controller ready", actuator=self.actuator.name)

    async def stop(self) -> None:
        await self.graph_runner.stop()
        await self._experts.stop()
        await self._reconcile.stop()
        await self._certificates.stop()
        await self.worker_clients.close()
        if self._launch is not None:
            await self._launch.stop()
        if self.launcher is not None:
            await self.launcher.shutdown()
        await self.redis.aclose()

    def server(self, port: int | None = None) -> uvicorn.Server:
        port = self.settings.http_port if port is None else port
        return http_server(self.api, self.settings.host, port)

    async def run(self) -> None:
        await self.start()
        try:
            await self.server().serve()
        finally:
            await self.stop()
