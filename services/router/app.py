"""The router process: the HTTP API, the worker view, the KV index, the dispatcher.

Background work keeps the hot path free of Redis: the worker directory is
refreshed every 250 ms and the KV index follows the event stream, both into
memory that requests read. Several routers can run side by side: they share
nothing but Redis.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import uvicorn
import yaml
from redis.exceptions import RedisError

from services.router.discovery import WorkerDirectory
from services.router.dispatch import Dispatcher, Job
from services.router.http.api import build_api
from services.router.metrics import RouterMetrics
from services.router.prompts import PromptBuilder
from shared.config.services import RouterSettings
from shared.errors import FailedPrecondition
from shared.hashing import BlockHasher
from shared.httpapi import http_server
from shared.kvindex import KVIndex
from shared.policies.routing import PDPolicy, Router, load_config
from shared.rpc.kvstore_client import KVStoreClient
from shared.rpc.pool import ClientPool
from shared.rpc.shoal.v1 import common_pb2
from shared.rpc.worker_client import WorkerClient
from shared.state.kvevents import KVEventFollower
from shared.state.redis import connect
from shared.state.registry import WorkerRegistry
from shared.state.workstats import WorkRecorder
from shared.telemetry.logging import get_logger
from shared.telemetry.metrics import new_registry
from shared.ticker import Ticker

log = get_logger("shoal.router")

DISCOVERY_INTERVAL_S = 0.25


class RouterApp:
    def __init__(self, settings: RouterSettings) -> None:
        self.settings = settings
        if settings.model_path is None:
            raise FailedPrecondition(
                "the router needs SHOAL_ROUTER_MODEL_PATH: the checkpoint folder with the tokenizer and chat template"
            )
        self.prompts = PromptBuilder(settings.model_path)
        self.max_context = _max_context(settings.model_path)
        self.hasher = BlockHasher(settings.model_name, settings.block_size)
        self.metrics = RouterMetrics(new_registry())
        self.redis = connect(settings.redis_url)
        self.events_redis = connect(settings.redis_url)
        self.index = KVIndex()
        self.clients: ClientPool[WorkerClient] = ClientPool(lambda a: WorkerClient(a, settings.internal_token))
        # Opened on first use, inside the event loop (gRPC channels belong to the loop that made them).
        self.kvstores: ClientPool[KVStoreClient] = ClientPool(lambda a: KVStoreClient(a, settings.internal_token))
        self.directory = WorkerDirectory(WorkerRegistry(self.redis), settings.model_name, self._worker_gone)
        self.follower = KVEventFollower(self.events_redis, self.index)
        self.router_id = f"router-{uuid.uuid4().hex[:8]}"
        self.work = WorkRecorder(self.redis, self.router_id, settings.model_name)
        config = load_config(yaml.safe_load(settings.routing_config.read_text()) if settings.routing_config else None)
        if not settings.routing_config:
            config = config.model_copy(update={"preset": settings.routing_preset})
        self.dispatcher = Dispatcher(
            self.directory,
            self.index,
            Router(config.resolve()),
            PDPolicy(settings.pd_min_uncached_tokens),
            self.clients,
            self.metrics,
            kvstore_address=settings.kvstore_address,
            kvstore_publisher=settings.kvstore_id if settings.kvstore_address else None,
            kv_transfer_timeout_s=settings.kv_transfer_timeout_s,
            work=self.work,
            kvstores=self.kvstores,
        )
        self.api = build_api(self)
        self.inflight = 0
        self.started_at = int(time.time())
        self._discovery = Ticker("discovery", DISCOVERY_INTERVAL_S, self.directory.refresh)
        self._events = Ticker("kv-index", 0.001, self._follow)
        self._stats = Ticker("work-stats", 1.0, self._flush_work)

    def _worker_gone(self, worker_id: str) -> None:
        self.index.drop(worker_id)
        self.dispatcher.inflight.pop(worker_id, None)

    async def _follow(self) -> None:
        if not self.follower.ready.is_set():
            await self.follower.bootstrap()
        await self.follower.poll(block_ms=200)

    async def _flush_work(self) -> None:
        try:
            await self.work.flush()
        except (RedisError, OSError) as exc:
            log.warning("work stats not published", error=str(exc))

    def job(
        self,
        model: str,
        prompt: list[int],
        sampling: common_pb2.SamplingParams,
        session_id: str,
        pool: str = "",
        pin_s: int = 0,
    ) -> Job:
        return Job(
            request_id=uuid.uuid4().hex[:16],
            model=model,
            prompt=prompt,
            sampling=sampling,
            hashes=self.hasher.hashes(prompt),
            block_size=self.settings.block_size,
            session_id=session_id,
            pool=pool,
            pin_s=pin_s,
            deadline_s=self.settings.request_timeout_s,
        )

    async def start(self) -> None:
        await self.directory.refresh()
        self._discovery.start()
        self._events.start()
        self._stats.start()
        log.info("router ready", model=self.settings.model_name, workers=len(self.directory.records))

    async def stop(self) -> None:
        await self._discovery.stop()
        await self._events.stop()
        await self._stats.stop()
        await self.clients.close()
        await self.kvstores.close()
        await self.redis.aclose()
        await self.events_redis.aclose()

    def server(self, port: int | None = None) -> uvicorn.Server:
        port = self.settings.http_port if port is None else port
        return http_server(self.api, self.settings.host, port, int(self.settings.request_timeout_s))

    async def run(self) -> None:
        await self.start()
        try:
            await self.server().serve()
        finally:
            await self.stop()


def _max_context(model_path: Path) -> int:
    config = model_path / "config.json"
    if config.is_file():
        return int(json.loads(config.read_text()).get("max_position_embeddings", 4096))
    return 4096
