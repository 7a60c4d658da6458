"""The router process: the HTTP API, the model catalog, the worker view, the KV index, the dispatcher.

One router serves every model (models.py): a request is routed among its
model's workers only, and its prompt is templated, tokenized and cut into
blocks by its model. Background work keeps the hot path free of Redis: the
model catalog is refreshed every second, the worker directory every 250 ms,
and the KV index follows the event stream, all into memory that requests
read (block hashes are seeded with the model's name, so one index serves
every model). Several routers can run side by side (processes
sharing a port, or replicas): each follows the KV event stream itself, and
they share the session map through Redis (shared/state/sessions.py), so a
session keeps its worker and a prompt gets the same P/D decision whichever
router takes it.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncGenerator

import yaml
from redis.exceptions import RedisError

from services.router.discovery import WorkerDirectory
from services.router.dispatch import Dispatcher, KVStoreTarget
from services.router.http.api import build_server
from services.router.inflight import InflightCounts
from services.router.keys import KEYS_INTERVAL_S, KeyGate
from services.router.metrics import RouterMetrics
from services.router.models import CATALOG_INTERVAL_S, ModelCatalog
from services.router.pd import Handoff
from services.router.pinning import Pinner
from shared.config.base import Environment
from shared.config.services import RouterSettings
from shared.hashing import BlockHasher
from shared.httpapi import listening_socket
from shared.kvindex import KVIndex
from shared.openai.completions import EdgeMetrics
from shared.openai.jobs import Chunk, Hints, Job
from shared.openai.models import ServedModel, load_model
from shared.policies.routing import PDPolicy, Router, load_config
from shared.rpc.kvstore_client import KVStoreClient
from shared.rpc.pool import ClientPool
from shared.rpc.security import RELOAD_INTERVAL_S, Role, RpcSecurity
from shared.rpc.serve_client import ServeSession
from shared.rpc.server import stop_event_on_signals
from shared.rpc.shoal.v1 import common_pb2
from shared.rpc.worker_client import WorkerClient
from shared.state.apikeys import APIKeyStore
from shared.state.kvevents import KVEventFollower
from shared.state.redis import connect
from shared.state.registry import WorkerRegistry
from shared.state.sessions import SessionMap
from shared.state.versioned import DocumentStore
from shared.state.workstats import WorkRecorder
from shared.telemetry.logging import get_logger
from shared.telemetry.metrics import new_registry
from shared.ticker import Ticker

log = get_logger("shoal.router")

DISCOVERY_INTERVAL_S = 0.25
# Requests in flight at SIGTERM may finish within this time (below Kubernetes' and make run's grace).
SHUTDOWN_GRACE_S = 10.0
SESSION_FLUSH_S = 0.1


class RouterApp:
    def __init__(self, settings: RouterSettings) -> None:
        self.settings = settings
        self.security = RpcSecurity.from_settings(settings, Role.ROUTER)
        self.metrics = RouterMetrics(new_registry())
        self.redis = connect(settings.redis_url)
        self.events_redis = connect(settings.redis_url)
        self.index = KVIndex()
        # Opened on first use, inside the event loop (gRPC channels belong to the loop that made them).
        self.clients: ClientPool[WorkerClient] = ClientPool(lambda a: WorkerClient(a, self.security))
        # Each worker's serve channel (the request path), by data address.
        self.streams: ClientPool[ServeSession] = ClientPool(
            lambda a: ServeSession(a, self.security, settings.stall_s, self.metrics.stalls.inc)
        )
        self.kvstores: ClientPool[KVStoreClient] = ClientPool(lambda a: KVStoreClient(a, self.security))
        configured = [load_model(name, folder, settings.block_size) for name, folder in settings.model_folders()]
        self.catalog = ModelCatalog(DocumentStore(self.redis), configured)
        self._hashers: dict[tuple[str, int], BlockHasher] = {}
        self.directory = WorkerDirectory(WorkerRegistry(self.redis), self._worker_gone)
        self.follower = KVEventFollower(self.events_redis, self.index)
        self.router_id = f"router-{uuid.uuid4().hex[:8]}"
        # Request ids: this router's random prefix and a counter (unique across routers and restarts).
        self._request_ids = (f"{self.router_id[7:]}{n:x}" for n in itertools.count())
        self.work = WorkRecorder(self.redis, self.router_id)
        self.sessions = SessionMap(self.redis)
        self.keys = KeyGate(
            APIKeyStore(self.redis), settings.api_keys, settings.env is Environment.DEV, self.metrics.keys
        )
        self.worker_inflight = InflightCounts()
        config = load_config(yaml.safe_load(settings.routing_config.read_text()) if settings.routing_config else None)
        if not settings.routing_config:
            config = config.model_copy(update={"preset": settings.routing_preset})
        kvstore = (
            KVStoreTarget(settings.kvstore_address, settings.kvstore_id, settings.kv_transfer_timeout_s)
            if settings.kvstore_address
            else None
        )
        self.dispatcher = Dispatcher(
            self.directory,
            self.index,
            Router(config.resolve()),
            PDPolicy(settings.pd_min_uncached_tokens),
            self.streams,
            self.metrics,
            self.sessions,
            Handoff(
                self.directory,
                self.clients,
                self.worker_inflight,
                self.metrics,
                settings.kvstore_address,
                settings.kv_transfer_timeout_s,
            ),
            self.worker_inflight,
            kvstore=kvstore,
            pinner=Pinner(
                self.directory,
                self.clients,
                self.kvstores,
                kvstore.address,
                kvstore.transfer_timeout_s,
                self.metrics,
            )
            if kvstore
            else None,
            work=self.work,
            max_inflight=settings.max_inflight,
        )
        self.http = build_server(self)
        self._discovery = Ticker("discovery", DISCOVERY_INTERVAL_S, self.directory.refresh)
        self._models = Ticker("models", CATALOG_INTERVAL_S, self.catalog.refresh)
        self._keys = Ticker("api-keys", KEYS_INTERVAL_S, self.keys.refresh)
        self._events = Ticker("kv-index", 0.001, self._follow)
        self._stats = Ticker("work-stats", 1.0, self._flush_work)
        self._sessions = Ticker("sessions", SESSION_FLUSH_S, self.sessions.flush)
        self._certificates = Ticker("certificates", RELOAD_INTERVAL_S, self.security.watch)

    # -- the OpenAI API's backend (shared/openai/completions.py) --------------------

    def model(self, name: str) -> ServedModel:
        return self.catalog.model(name)

    def models(self) -> list[ServedModel]:
        return self.catalog.models()

    @property
    def access(self) -> KeyGate:
        return self.keys

    @property
    def edge_metrics(self) -> EdgeMetrics:
        return self.metrics.edge

    def stream(self, job: Job) -> AsyncGenerator[Chunk, None]:
        return self.dispatcher.stream(job)

    def _worker_gone(self, worker_id: str) -> None:
        # Requests running there go on: the worker may only have missed a heartbeat (a Redis restart).
        # If it is really gone, its Serve session breaks and they resume elsewhere.
        self.index.drop(worker_id)
        self.worker_inflight.forget(worker_id)

    async def _follow(self) -> None:
        if not self.follower.ready.is_set():
            await self.follower.bootstrap()
        await self.follower.poll(block_ms=200)

    async def _flush_work(self) -> None:
        try:
            await self.work.flush()
        except (RedisError, OSError) as exc:
            log.warning("work stats not published", error=str(exc))

    def job(self, model: ServedModel, prompt: list[int], sampling: common_pb2.SamplingParams, hints: Hints) -> Job:
        key = (model.name, model.block_size)
        hasher = self._hashers.get(key)
        if hasher is None:
            hasher = self._hashers[key] = BlockHasher(*key)
        return Job(
            request_id=next(self._request_ids),
            model=model.name,
            prompt=prompt,
            sampling=sampling,
            hashes=hasher.hashes(prompt),
            block_size=model.block_size,
            session_id=hints.session,
            pool=hints.pool,
            pin_s=hints.pin_s,
            deadline_s=self.settings.request_timeout_s,
        )

    async def start(self) -> None:
        await self.directory.refresh()
        await self.catalog.refresh()
        await self.keys.refresh()
        self._discovery.start()
        self._models.start()
        self._keys.start()
        self._events.start()
        self._stats.start()
        self._sessions.start()
        self._certificates.start()
        models = [m.name for m in self.catalog.models()]
        log.info("router ready", models=models, workers=len(self.directory.records))

    async def stop(self) -> None:
        await self._discovery.stop()
        await self._models.stop()
        await self._keys.stop()
        await self._events.stop()
        await self._stats.stop()
        await self._sessions.stop()
        await self._certificates.stop()
        await self.sessions.flush()
        await self.clients.close()
        await self.streams.close()
        await self.kvstores.close()
        await self.redis.aclose()
        await self.events_redis.aclose()

    async def serve_http(self, port: int | None = None) -> int:
        """Start answering HTTP (port 0: a free one); returns the port."""
        settings = self.settings
        port = settings.http_port if port is None else port
        sock = listening_socket(settings.host, port) if settings.reuse_port else None
        bound = await self.http.start(settings.host, port, sock)
        log.info("router listening", address=f"{settings.host}:{bound}", reuse_port=settings.reuse_port)
        return bound

    async def run(self) -> None:
        """Serve until SIGTERM or SIGINT, then finish what runs (within SHUTDOWN_GRACE_S) and stop."""
        stop = stop_event_on_signals()
        await self.start()
        try:
            await self.serve_http()
            await stop.wait()
            log.info("shutting down", grace_s=SHUTDOWN_GRACE_S)
            await self.http.stop(SHUTDOWN_GRACE_S)
        finally:
            await self.stop()
