"""Services run in-process on free loopback ports, for integration tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from services.kvstore.app import KVStoreApp
from services.worker.app import WorkerApp
from shared.config import KVStoreSettings, WorkerSettings, load_settings
from tests.support.models import TINY_MODEL_NAME


def worker_settings(redis_url: str, **overrides: Any) -> WorkerSettings:
    defaults: dict[str, Any] = {
        "redis_url": redis_url,
        "model_name": TINY_MODEL_NAME,
        "grpc_port": 0,
        "metrics_port": 0,
        "heartbeat_interval_s": 0.2,
        "lease_ttl_s": 1.0,
        "kv_cache_bytes": 64 * 2**20,
        "max_batch_tokens": 512,
        "device": "cpu",
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
        "redis_url": redis_url,
        "grpc_port": 0,
        "metrics_port": 0,
        "memory_bytes": 64 * 2**20,
        "max_block_bytes": 4 * 2**20,
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
