"""The router's API keys against a real Redis while the controller writes back a wiped Redis."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from services.router.keys import KeyGate, KeyMetrics
from shared.state import schema
from shared.state.apikeys import APIKeyStore
from shared.state.versioned import DocumentStore
from shared.telemetry.loopmetrics import LoopMetrics
from shared.types.apikeys import APIKeyCreate

pytestmark = pytest.mark.integration


async def test_keys_stay_admitted_while_a_wiped_redis_is_written_back_one_key_at_a_time(redis: Redis) -> None:
    store = APIKeyStore(redis)
    gate = KeyGate(store, [], dev_mode=False, metrics=KeyMetrics(LoopMetrics(CollectorRegistry())))
    await redis.set(schema.CLUSTER, "1")
    first, second = await store.create(APIKeyCreate(name="a")), await store.create(APIKeyCreate(name="b"))
    await gate.refresh()
    documents = await DocumentStore(redis).snapshot()

    await redis.flushdb()
    await DocumentStore(redis).restore({f"{schema.API_KEY_DOC}{first.id}": documents[schema.API_KEY_DOC + first.id]})
    await gate.refresh()  # one key back, no mark yet: the other is not deleted, only not restored yet
    assert (await gate.admit(f"Bearer {second.key}")).key_id == second.id

    await DocumentStore(redis).restore(documents)
    await redis.set(schema.CLUSTER, "1")
    third = await store.create(APIKeyCreate(name="c"))  # keys made after the restore are read as before
    for made in (first, second, third):
        assert (await gate.admit(f"Bearer {made.key}")).key_id == made.id
