"""The admin REST API: models and their aliases, pools, workers, scaling, jobs, agent graphs, cluster status,
OpenAI API keys and the audit log.

Every route needs a bearer token whose role allows it (viewer < operator <
admin): reading needs viewer, operating on workers, scaling and jobs needs
operator (and so does listing API keys), changing models, pools and keys and
reading the audit log needs admin. Missing or unknown tokens get 401,
insufficient roles 403; every write is audited (api/audit.py). Routes are
thin: they validate, call the desired-state store, the registry or the job
store, and return public models.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import hmac
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Header, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from services.controller.agents.tools import RETRIEVERS, TOOLS
from services.controller.api.audit import AdminEdge, AuditEntry, caller
from services.controller.api.ui import mount_console
from services.controller.jobs.migrate import topology_of
from shared.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ShoalError,
    Unauthenticated,
)
from shared.httpapi import install_error_handlers
from shared.policies.agents import PlanError
from shared.policies.placement import layer_report
from shared.telemetry.metrics import render
from shared.types.apikeys import KEY_ID, APIKeyCreate, APIKeyCreated, APIKeyPublic
from shared.types.graphs import GraphRecord, GraphSpec, RunState, ToolStep, check_graph
from shared.types.pools import (
    AliasPublic,
    AliasSpec,
    ModelCreate,
    ModelPublic,
    ModelUpdate,
    PoolCreate,
    PoolPublic,
    PoolUpdate,
)

if TYPE_CHECKING:
    from services.controller.app import ControllerApp


class Role(enum.IntEnum):
    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3


def _app(request: Request) -> ControllerApp:
    app: ControllerApp = request.app.state.controller
    return app


def check_rendezvous(master: str, instance: str, allowed: list[str]) -> None:
    """The joining rank's rendezvous must be on the instance's own host (its pod, or the machine whose
    ranks are separate processes) or on SHOAL_CONTROLLER_RENDEZVOUS_HOSTS: every rank connects there, so
    an arbitrary address would hand the instance's collective traffic to whoever listens on it."""
    host = master.rpartition(":")[0].strip("[]")
    if host == instance.rpartition(":")[0].strip("[]") or host in allowed:
        return
    raise InvalidArgument(
        f"master {master} is neither on the instance's host ({instance}) nor on SHOAL_CONTROLLER_RENDEZVOUS_HOSTS",
        param="master",
    )


def require(role: Role) -> Any:
    async def check(request: Request, authorization: Annotated[str | None, Header()] = None) -> Role:
        presented = (authorization or "").removeprefix("Bearer ").strip()
        granted: Role | None = None
        for token, name in _app(request).tokens:
            if presented and hmac.compare_digest(presented.encode(), token.encode()):
                granted = Role[name.upper()]
        if granted is None:
            raise Unauthenticated("a valid bearer token is required (Authorization: Bearer <token>)")
        request.state.who = caller(granted.name.lower(), presented)  # the audit log's "who"
        if granted < role:
            raise PermissionDenied(f"this needs the {role.name.lower()} role; the token has {granted.name.lower()}")
        return granted

    return Depends(check)


Viewer = Annotated[Role, require(Role.VIEWER)]
Operator = Annotated[Role, require(Role.OPERATOR)]
Admin = Annotated[Role, require(Role.ADMIN)]
Name = Annotated[str, Path(min_length=1, max_length=63, pattern=r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")]
JobId = Annotated[str, Path(min_length=1, max_length=200)]
GraphId = Annotated[str, Path(min_length=1, max_length=200)]
WorkerId = Annotated[str, Path(min_length=1, max_length=200)]
KeyId = Annotated[str, Path(pattern=KEY_ID.pattern)]


class ScaleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    replicas: int | None = Field(ge=0, le=10_000, description="Fixed replicas; null hands the pool back to its policy.")


class RebalanceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dry_run: bool = Field(default=False, description="Plan only: report the new placement, change nothing.")
    policy: Literal["migration-aware", "eplb"] = Field(
        default="migration-aware", description="Placement policy (shared/policies/placement.py)."
    )
    source: Literal["checkpoint", "peer"] = Field(
        default="checkpoint", description="Where moved expert copies come from: the checkpoint, or a rank serving them."
    )


class ResizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ranks: int = Field(ge=1, le=1024, description="The instance's new rank count: one more or one fewer than now.")
    master: str | None = Field(
        default=None,
        min_length=3,
        max_length=256,
        pattern=r"^[^\s:]+:[0-9]{1,5}$",
        description=(
            "Growing: host:port where a process started with SHOAL_WORKER_EP_JOIN waits. Leave it out for an "
            "instance the local launcher started: it starts the joining rank itself."
        ),
    )
    policy: Literal["migration-aware", "eplb"] = Field(
        default="migration-aware", description="Placement policy spreading the experts over the new ranks."
    )
    source: Literal["checkpoint", "peer"] = Field(
        default="peer", description="Where moved expert copies come from: the checkpoint, or a rank serving them."
    )


class WorkerPublic(BaseModel):
    worker_id: str
    address: str
    http_address: str = Field(description="The worker's own OpenAI API (direct access), if it serves one.")
    pool: str
    role: str
    model: str
    engine: str
    gpu_type: str
    cordoned: bool
    draining: bool
    running_requests: int
    waiting_requests: int
    kv_usage: float
    decode_tokens_per_s: float
    ttft_p90_s: float
    tbt_p90_s: float


def build_api(controller: ControllerApp) -> FastAPI:
    api = FastAPI(
        title="Shoal controller",
        description="Admin API: models, pools, workers, scaling, jobs.",
        version="1.0.0",
        telemetry={"metrics": False, "logs": False, "operation_spans": False},
    )
    api.state.controller = controller
    install_error_handlers(api)
    api.add_middleware(AdminEdge, audit=controller.audit)
    v1 = APIRouter(prefix="/v1")

    # -- models -----------------------------------------------------------------

    @v1.get("/whoami")
    async def whoami(role: Viewer) -> dict[str, str]:
        """The role of the presented token (the console greys out what it cannot do)."""
        return {"role": role.name.lower()}

    @v1.get("/models")
    async def list_models(request: Request, _: Viewer) -> list[ModelPublic]:
        return await _app(request).desired.models()

    @v1.post("/models", status_code=201)
    async def create_model(body: ModelCreate, request: Request, _: Admin) -> ModelPublic:
        return await _app(request).desired.create_model(body)

    @v1.get("/models/{name}")
    async def get_model(name: Name, request: Request, _: Viewer) -> ModelPublic:
        return await _app(request).desired.model(name)

    @v1.put("/models/{name}")
    async def update_model(name: Name, body: ModelUpdate, request: Request, _: Admin) -> ModelPublic:
        return await _app(request).desired.update_model(name, body)

    @v1.delete(
        "/models/{name}",
        status_code=204,
        responses={202: {"model": ModelPublic, "description": "Deleting: its pools drain first, then it goes"}},
    )
    async def delete_model(name: Name, request: Request, _: Admin) -> Response:
        deleting = await _app(request).desired.delete_model(name)
        if deleting is None:
            return Response(status_code=204)
        return JSONResponse(deleting.model_dump(mode="json"), status_code=202)

    # -- OpenAI API keys ----------------------------------------------------------

    @v1.post("/keys", status_code=201)
    async def create_key(body: APIKeyCreate, request: Request, _: Admin) -> APIKeyCreated:
        """A new key for the OpenAI API; its secret is in this response only."""
        return await _app(request).api_keys.create(body)

    @v1.get("/keys")
    async def list_keys(request: Request, _: Operator) -> list[APIKeyPublic]:
        return [record.public() for record in await _app(request).api_keys.all()]

    @v1.get("/keys/{key_id}")
    async def get_key(key_id: KeyId, request: Request, _: Operator) -> APIKeyPublic:
        return (await _app(request).api_keys.get(key_id)).public()

    @v1.delete("/keys/{key_id}")
    async def revoke_key(key_id: KeyId, request: Request, _: Admin) -> APIKeyPublic:
        """Revoke a key: every router refuses it within a couple of seconds. The record stays, marked."""
        return (await _app(request).api_keys.revoke(key_id)).public()

    # -- audit log ------------------------------------------------------------------

    @v1.get("/audit")
    async def audit(request: Request, _: Admin, limit: int = Query(default=100, ge=1, le=10_000)) -> list[AuditEntry]:
        """The newest admin API writes, newest first: who, what, when and the result."""
        return await _app(request).audit.recent(limit)

    # -- aliases ----------------------------------------------------------------

    @v1.get("/aliases")
    async def list_aliases(request: Request, _: Viewer) -> list[AliasPublic]:
        return await _app(request).desired.aliases()

    @v1.get("/aliases/{name}")
    async def get_alias(name: Name, request: Request, _: Viewer) -> AliasPublic:
        return await _app(request).desired.alias(name)

    @v1.put("/aliases/{name}")
    async def set_alias(name: Name, body: AliasSpec, request: Request, _: Admin) -> AliasPublic:
        return await _app(request).desired.set_alias(name, body)

    @v1.delete("/aliases/{name}", status_code=204)
    async def delete_alias(name: Name, request: Request, _: Admin) -> Response:
        await _app(request).desired.delete_alias(name)
        return Response(status_code=204)

    # -- pools ------------------------------------------------------------------

    @v1.get("/pools")
    async def list_pools(request: Request, _: Viewer) -> list[PoolPublic]:
        return await _app(request).desired.pools()

    @v1.post("/pools", status_code=201)
    async def create_pool(body: PoolCreate, request: Request, _: Admin) -> PoolPublic:
        return await _app(request).desired.create_pool(body)

    @v1.get("/pools/{name}")
    async def get_pool(name: Name, request: Request, _: Viewer) -> PoolPublic:
        return await _app(request).desired.pool(name)

    @v1.patch("/pools/{name}")
    async def update_pool(name: Name, body: PoolUpdate, request: Request, _: Admin) -> PoolPublic:
        return await _app(request).desired.update_pool(name, body)

    @v1.delete("/pools/{name}", status_code=204)
    async def delete_pool(name: Name, request: Request, _: Admin) -> Response:
        app = _app(request)
        await app.desired.delete_pool(name)
        await app.actuator.delete_pool(name)
        return Response(status_code=204)

    @v1.post("/pools/{name}/scale")
    async def scale_pool(name: Name, body: ScaleRequest, request: Request, _: Operator) -> PoolPublic:
        return await _app(request).desired.set_override(name, body.replicas)

    # -- workers ----------------------------------------------------------------

    async def _worker(app: ControllerApp, worker_id: str) -> Any:
        record = await app.registry.get(worker_id)
        if record is None:
            raise NotFound(f"no worker {worker_id!r} in the registry", param="worker_id")
        return record

    @v1.get("/workers")
    async def list_workers(request: Request, _: Viewer, pool: str | None = None) -> list[WorkerPublic]:
        records = await _app(request).registry.list_workers()
        return [
            WorkerPublic(
                worker_id=r.worker_id,
                address=r.info.address,
                http_address=r.info.http_address,
                pool=r.info.pool,
                role=r.info.role.value,
                model=r.info.model,
                engine=r.info.engine.value,
                gpu_type=r.info.gpu_type,
                cordoned=r.cordoned,
                draining=r.load.draining,
                running_requests=r.load.running_requests,
                waiting_requests=r.load.waiting_requests,
                kv_usage=r.load.kv_usage,
                decode_tokens_per_s=r.load.decode_tokens_per_s,
                ttft_p90_s=r.load.ttft_p90_s,
                tbt_p90_s=r.load.tbt_p90_s,
            )
            for r in records
            if pool is None or r.info.pool == pool
        ]

    @v1.get("/monitoring/targets")
    async def scrape_targets(request: Request, _: Viewer) -> list[dict[str, Any]]:
        """The workers' metrics endpoints in Prometheus's HTTP service-discovery format (`http_sd_configs`):
        workers the controller starts on free ports are scraped as they come and go, labelled with their
        pool and id as the dashboards and alert rules expect."""
        return [
            {
                "targets": [r.info.metrics_address],
                "labels": {
                    "pool": r.info.pool,
                    "worker": r.worker_id,
                    "role": r.info.role.value,
                    "model": r.info.model,
                },
            }
            for r in await _app(request).registry.list_workers()
            if r.info.metrics_address
        ]

    @v1.post("/workers/{worker_id}/cordon")
    async def cordon(worker_id: WorkerId, request: Request, _: Operator) -> dict[str, Any]:
        app = _app(request)
        await _worker(app, worker_id)
        await app.registry.set_cordoned(worker_id, True)
        return {"worker_id": worker_id, "cordoned": True}

    @v1.post("/workers/{worker_id}/uncordon")
    async def uncordon(worker_id: WorkerId, request: Request, _: Operator) -> dict[str, Any]:
        """Routers send to the worker again, and a drained worker admits again."""
        app = _app(request)
        record = await _worker(app, worker_id)
        await app.worker_clients.get(record.info.address).resume()
        await app.registry.set_cordoned(worker_id, False)
        return {"worker_id": worker_id, "cordoned": False, "draining": False}

    # -- experts ----------------------------------------------------------------

    async def _expert_stats(app: ControllerApp, worker_id: str) -> tuple[str, Any]:
        record = await _worker(app, worker_id)
        return record.info.address, await app.worker_clients.get(record.info.address).expert_stats()

    @v1.get("/workers/{worker_id}/experts")
    async def experts(worker_id: WorkerId, request: Request, _: Viewer) -> dict[str, Any]:
        """The instance's expert map, and routed tokens per rank per layer with their balance (max / mean)."""
        stats = (await _expert_stats(_app(request), worker_id))[1]
        wire = stats.expert_map
        layers = [list(layer.tokens) for layer in sorted(stats.layers, key=lambda layer: layer.layer)]
        if not wire.num_ranks:
            return {"expert_parallel": False, "num_experts": stats.num_experts, "expert_tokens": layers}
        slots = [list(layer.slot_experts) for layer in sorted(wire.layers, key=lambda layer: layer.layer)]
        topo = topology_of(wire)
        per_rank, balance = layer_report(slots, [[float(t) for t in layer] for layer in layers], topo)
        return {
            "expert_parallel": True,
            "version": wire.version,
            "num_ranks": wire.num_ranks,
            "num_nodes": topo.nodes,
            "slots_per_rank": wire.slots_per_rank,
            "slots": slots,
            "expert_tokens": layers,
            "rank_tokens": per_rank,
            "balance": balance,
        }

    @v1.get("/workers/{worker_id}/experts/history")
    async def expert_history(
        worker_id: WorkerId, request: Request, _: Viewer, limit: int = Query(default=200, ge=1, le=2000)
    ) -> list[dict[str, float]]:
        """Balance samples of an expert-parallel instance, oldest first: t, balance_mean, balance_max, version."""
        from services.controller.experts import history

        return await history(_app(request).redis, worker_id, limit)

    @v1.post("/workers/{worker_id}/experts/rebalance")
    async def rebalance(worker_id: WorkerId, body: RebalanceRequest, request: Request, _: Operator) -> dict[str, Any]:
        """Plan a new expert placement from the recent loads; unless a dry run, migrate to it live (a job)."""
        from services.controller.jobs.migrate import plan_from_stats

        app = _app(request)
        address, stats = await _expert_stats(app, worker_id)
        plan = {**plan_from_stats(stats, body.policy), "source": body.source}
        summary = {k: v for k, v in plan.items() if k != "slots"}
        if body.dry_run or plan["moves"] == 0:
            return {"plan": summary, "slots": plan["slots"], "job": None}
        job = await app.open_migration(worker_id, address, plan)
        return {"plan": summary, "slots": plan["slots"], "job": job.model_dump(mode="json")}

    @v1.post("/workers/{worker_id}/experts/resize", status_code=202)
    async def resize_experts(worker_id: WorkerId, body: ResizeRequest, request: Request, _: Operator) -> dict[str, Any]:
        """Add or remove a rank of a running expert-parallel instance, live (a job): grow = the new rank joins,
        then experts migrate onto it; shrink = experts migrate off the last rank, then it leaves."""
        app = _app(request)
        address, stats = await _expert_stats(app, worker_id)
        ranks = stats.expert_map.num_ranks
        if not ranks:
            raise FailedPrecondition(f"worker {worker_id} holds every expert itself: no expert parallelism to resize")
        if abs(body.ranks - ranks) != 1:
            raise InvalidArgument(
                f"an instance grows or shrinks by one rank at a time: it has {ranks}, so {ranks - 1} or {ranks + 1}",
                param="ranks",
            )
        grow = body.ranks > ranks
        if grow and body.master is not None:
            check_rendezvous(body.master, address, app.settings.rendezvous_hosts)
        launcher = app.launcher if grow and body.master is None else None  # it starts the joining rank
        if grow and body.master is None and launcher is None:
            raise InvalidArgument("growing needs master: where the joining rank waits (host:port)", param="master")
        master = launcher.add_rank(worker_id) if launcher else body.master
        try:
            job = await app.open_resize(
                worker_id, address, body.ranks, master if grow else None, body.policy, body.source
            )
        except ShoalError:
            if launcher:
                launcher.drop_joiner(worker_id)
            raise
        if launcher:
            launcher.bind_joiner(worker_id, job.id)
        return job.model_dump(mode="json")

    @v1.post("/workers/{worker_id}/drain")
    async def drain(worker_id: WorkerId, request: Request, _: Operator) -> dict[str, Any]:
        """Stop admitting new requests; running ones finish. The worker stays up."""
        app = _app(request)
        record = await _worker(app, worker_id)
        await app.registry.set_cordoned(worker_id, True)
        response = await app.worker_clients.get(record.info.address).drain(wait_s=0)
        return {"worker_id": worker_id, "drained": response.drained, "running_requests": response.running_requests}

    @v1.delete("/workers/{worker_id}", status_code=202)
    async def remove_worker(worker_id: WorkerId, request: Request, _: Operator) -> dict[str, Any]:
        """Drain the worker, then stop it (a scale-down job); the pool's target drops by one."""
        app = _app(request)
        record = await _worker(app, worker_id)
        job = await app.open_scale_down(record.info.pool, worker_id)
        return job.model_dump(mode="json")

    # -- scaling ----------------------------------------------------------------

    @v1.get("/scaling")
    async def scaling_status(request: Request, _: Viewer) -> dict[str, Any]:
        app = _app(request)
        return {
            "paused": await app.desired.paused(),
            "pools": [status.__dict__ for status in app.reconciler.last.values()],
        }

    @v1.get("/scaling/decisions")
    async def decisions(request: Request, _: Viewer, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[Any]:
        from services.controller.reconcile import read_decisions

        return await read_decisions(_app(request).redis, limit)

    @v1.get("/scaling/dry-run")
    async def dry_run(request: Request, _: Viewer) -> list[Any]:
        statuses = await _app(request).reconciler.tick(act=False)
        return [status.__dict__ for status in statuses]

    @v1.post("/scaling/pause")
    async def pause(request: Request, _: Operator) -> dict[str, bool]:
        await _app(request).desired.set_paused(True)
        return {"paused": True}

    @v1.post("/scaling/resume")
    async def resume(request: Request, _: Operator) -> dict[str, bool]:
        await _app(request).desired.set_paused(False)
        return {"paused": False}

    # -- jobs -------------------------------------------------------------------

    @v1.get("/jobs")
    async def list_jobs(request: Request, _: Viewer, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[Any]:
        return [job.model_dump(mode="json") for job in await _app(request).jobs.recent(limit)]

    @v1.get("/jobs/{job_id}")
    async def get_job(job_id: JobId, request: Request, _: Viewer) -> Any:
        return (await _app(request).jobs.get(job_id)).model_dump(mode="json")

    @v1.post("/jobs/{job_id}/cancel")
    async def cancel_job(job_id: JobId, request: Request, _: Operator) -> Any:
        return (await _app(request).jobs.request_cancel(job_id)).model_dump(mode="json")

    # -- cluster ----------------------------------------------------------------

    @v1.post("/graphs", status_code=202)
    async def submit_graph(body: GraphSpec, request: Request, _: Operator) -> GraphRecord:
        app = _app(request)
        models = {m.name for m in await app.desired.models()}
        problems = check_graph(body, models, TOOLS, RETRIEVERS)
        if problems:
            raise InvalidArgument("; ".join(str(p) for p in problems), param=problems[0].location)
        for index, step in enumerate(body.steps):
            if isinstance(step, ToolStep) and step.url is not None:
                try:
                    app.graph_runner.egress.check(step.url)
                except InvalidArgument as exc:
                    raise InvalidArgument(exc.message, param=f"steps[{index}].url") from None
        try:
            return await app.graph_runner.submit(body, await app.catalogue())
        except PlanError as exc:
            raise FailedPrecondition(str(exc)) from None

    @v1.get("/graphs")
    async def list_graphs(
        request: Request, _: Viewer, limit: int = Query(default=50, ge=1, le=1000)
    ) -> list[GraphRecord]:
        return await _app(request).graphs.recent(limit)

    @v1.get("/graphs/{graph_id}")
    async def get_graph(graph_id: GraphId, request: Request, _: Viewer) -> GraphRecord:
        return await _app(request).graphs.get(graph_id)

    @v1.get("/graphs/{graph_id}/result")
    async def graph_result(graph_id: GraphId, request: Request, _: Viewer) -> dict[str, Any]:
        """The result of a graph that succeeded (409 while it runs, or when it failed or was cancelled)."""
        record = await _app(request).graphs.get(graph_id)
        if record.state is not RunState.SUCCEEDED:
            raise FailedPrecondition(
                f"graph {graph_id} is {record.state.value}" + (f": {record.error}" if record.error else ""),
                graph_id=graph_id,
            )
        return {"id": record.id, "result": record.result, "finished_at": record.finished_at}

    @v1.post("/graphs/{graph_id}/cancel")
    async def cancel_graph(graph_id: GraphId, request: Request, _: Operator) -> GraphRecord:
        return await _app(request).graph_runner.cancel(graph_id)

    @v1.get("/catalogue")
    async def catalogue(request: Request, _: Viewer) -> list[dict[str, Any]]:
        return [dataclasses.asdict(h) for h in await _app(request).catalogue()]

    @v1.get("/cluster")
    async def cluster(request: Request, _: Viewer) -> dict[str, Any]:
        app = _app(request)
        pools, workers, jobs = await asyncio.gather(
            app.desired.pools(), app.registry.list_workers(), app.jobs.open_jobs()
        )
        return {
            "models": [m.name for m in await app.desired.models()],
            "pools": {
                p.name: {
                    "role": p.role.value,
                    "workers": sum(1 for w in workers if w.info.pool == p.name),
                    "desired": app.reconciler.last[p.name].desired if p.name in app.reconciler.last else None,
                }
                for p in pools
            },
            "workers": len(workers),
            "jobs_running": len(jobs),
            "paused": await app.desired.paused(),
        }

    api.include_router(v1)
    mount_console(api)

    @api.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/metrics")
    async def metrics(request: Request) -> Response:
        body, content_type = render(_app(request).metrics_registry)
        return Response(body, media_type=content_type)

    return api
