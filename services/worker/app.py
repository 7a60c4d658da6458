"""The worker process: engine, gRPC server, registry lease and KV events.

`WorkerApp` builds the object graph from settings; `main` runs it until a
signal and tests run it in-process. Shutdown drains: the worker stops
admitting, tells the registry it is draining (the router stops sending), lets
running requests finish within the grace period, then deregisters, retracts
its KV blocks from the index and stops.
"""

from __future__ import annotations

import time
from contextlib import suppress

from redis.exceptions import RedisError

from services.worker.engines.engine import BatchingEngine
from services.worker.engines.factory import build_engine
from services.worker.http import EngineBackend, direct_server
from services.worker.metrics import WorkerMetrics
from services.worker.serve import ServeStream
from services.worker.server import WorkerServicer
from shared.config.base import Environment
from shared.config.services import WorkerSettings
from shared.errors import FailedPrecondition
from shared.httpserver import HttpServer
from shared.openai.completions import EdgeMetrics
from shared.openai.models import ServedModel
from shared.openai.prompts import PromptBuilder
from shared.rpc.channel import ChannelServer
from shared.rpc.security import RELOAD_INTERVAL_S, Role, RpcSecurity
from shared.rpc.serve_client import CHANNEL as SERVE_CHANNEL
from shared.rpc.server import GrpcServer, run_until_signal
from shared.rpc.shoal.v1 import worker_pb2_grpc
from shared.state.kvevents import KVEventPublisher
from shared.state.redis import connect
from shared.state.registry import Heartbeat, WorkerRegistry
from shared.state.versioned import DocumentStore
from shared.telemetry.logging import get_logger
from shared.telemetry.loopmetrics import LoopMetrics
from shared.telemetry.metrics import new_registry, serve_metrics
from shared.ticker import Ticker
from shared.types.pools import SLO
from shared.types.workers import WorkerInfo

log = get_logger("shoal.worker")

SERVICE_NAME = "shoal.v1.Worker"
EVENT_INTERVAL_S = 0.1
# How soon a change to the pool's SLO reaches the worker's SLO counters.
SLO_REFRESH_S = 5.0


class WorkerApp:
    def __init__(self, settings: WorkerSettings, engine: BatchingEngine | None = None) -> None:
        if settings.http_port is not None and not settings.internal_token and settings.env is not Environment.DEV:
            raise FailedPrecondition(
                "SHOAL_WORKER_HTTP_PORT needs SHOAL_INTERNAL_TOKEN outside development mode: callers present it as "
                "their key, and without it the worker's OpenAI API would be open to anyone"
            )
        self.settings = settings
        self.security = RpcSecurity.from_settings(settings, Role.WORKER)
        self.metrics = WorkerMetrics(new_registry())
        self.engine = engine or build_engine(settings, self.metrics)
        self.engine.observer = self.metrics
        self.metrics.watch_load(self.engine.load)
        if settings.ep_size > 1:
            self.metrics.expert_ranks.set(settings.ep_size)
        self.redis = connect(settings.redis_url)
        self.registry = WorkerRegistry(self.redis)
        self.publisher = KVEventPublisher(self.redis, settings.worker_id)
        self.servicer = WorkerServicer(self.engine, self.metrics, self.security)
        self.server: GrpcServer | None = None
        self.http: HttpServer | None = None
        self.http_port = 0
        self.channels = ChannelServer({SERVE_CHANNEL: lambda conn: ServeStream(self.servicer, conn)}, self.security)
        self.data_port = 0
        self.heartbeat: Heartbeat | None = None
        self.metrics_port = 0
        self._events = Ticker("kv-events", EVENT_INTERVAL_S, self._publish_events)
        self._docs = DocumentStore(self.redis)
        self._slo = Ticker("pool-slo", SLO_REFRESH_S, self._read_slo)
        self._certificates = Ticker("certificates", RELOAD_INTERVAL_S, self.security.watch)

    @property
    def address(self) -> str:
        assert self.server is not None
        return self.settings.advertised(self.server.port)

    async def start(self) -> None:
        settings = self.settings
        await self.engine.start()
        self.server = await GrpcServer.create(
            settings.host,
            settings.grpc_port,
            [(worker_pb2_grpc.add_WorkerServicer_to_server, self.servicer)],
            [SERVICE_NAME],
            self.security,
            settings.health_port,
        )
        self.data_port = await self.channels.start(settings.host, settings.data_port)
        _server, self.metrics_port = serve_metrics(self.metrics.registry, settings.host, settings.metrics_port)
        if settings.http_port is not None:
            await self._serve_http(settings.http_port)
        info = WorkerInfo(
            worker_id=settings.worker_id,
            address=self.address,
            role=settings.role,
            pool=settings.pool,
            model=settings.model_name,
            engine=settings.engine,
            gpu_type=settings.gpu_type,
            block_size=settings.block_size,
            kv_blocks_total=self.engine.load().kv_blocks_total,
            max_running=settings.max_running,
            max_waiting=settings.max_waiting,
            metrics_address=settings.advertised(self.metrics_port),
            data_address=settings.advertised(self.data_port),
            http_address=settings.advertised(self.http_port) if self.http is not None else "",
            started_at=time.time(),
            lease_ttl_s=settings.lease_ttl_s,
        )
        self.heartbeat = Heartbeat(
            self.registry, info, self.engine.load, settings.heartbeat_interval_s, settings.lease_ttl_s
        )
        await self.heartbeat.start()
        self._events.start()
        with suppress(RedisError, OSError):  # a worker serves without its pool's document (then: default SLO)
            await self._read_slo()
        self._slo.start()
        self._certificates.start()
        log.info("worker serving", worker_id=settings.worker_id, address=self.address, role=settings.role.value)

    async def _serve_http(self, port: int) -> None:
        if self.settings.model_path is None:
            raise FailedPrecondition("SHOAL_WORKER_HTTP_PORT needs SHOAL_WORKER_MODEL_PATH (the tokenizer)")
        edge = EdgeMetrics(LoopMetrics(self.metrics.registry), "shoal_worker_http")
        model = ServedModel(self.engine.model_name, self.engine.max_context, PromptBuilder(self.settings.model_path))
        token = self.settings.internal_token
        backend = EngineBackend(self.servicer, model, edge, [token] if token else [])
        self.http = direct_server(backend)
        self.http_port = await self.http.start(self.settings.host, port)
        log.info("worker serving the OpenAI API directly", port=self.http_port)

    async def _read_slo(self) -> None:
        doc = await self._docs.get(f"pool:{self.settings.pool}")
        if doc is not None:
            self.metrics.slo = SLO.model_validate(doc.body.get("slo") or {})

    async def _publish_events(self) -> None:
        await self.publisher.tick(self.engine.drain_kv_events(), self.engine.cached_hashes)

    async def drain_and_stop(self) -> None:
        """The shutdown hook: drain, deregister, retract blocks."""
        self.engine.draining = True
        if self.heartbeat is not None:
            await self.heartbeat.beat()  # tell the router at once
        await self.engine.wait_idle()
        await self._retire()

    async def _retire(self) -> None:
        if self.http is not None:
            await self.http.stop(grace_s=1.0)
        await self.channels.stop()
        await self._events.stop()
        await self._slo.stop()
        await self._certificates.stop()
        if self.heartbeat is not None:
            await self.heartbeat.stop(deregister=True)
        with suppress(RedisError, OSError):
            await self.publisher.clear()

    async def stop(self) -> None:
        """Stop now (tests): abort what runs, deregister, close everything."""
        await self._retire()
        if self.server is not None:
            await self.server.stop(grace_s=1.0)
        await self.engine.stop()
        await self.servicer.close()
        await self.redis.aclose()

    async def run(self) -> None:
        await self.start()
        assert self.server is not None
        await run_until_signal(self.server, self.settings.shutdown_grace_s, self.drain_and_stop)
        await self.engine.stop()
        await self.servicer.close()
        await self.redis.aclose()
