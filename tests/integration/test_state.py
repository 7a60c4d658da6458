"""The Redis state schema against a real redis-server."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from shared.state import schema
from shared.state.records import FINISHED_TTL_S, RecordIndex, RecordKeys
from shared.state.redis import connect, read_marked
from shared.state.registry import Heartbeat, WorkerRegistry
from shared.state.versioned import DocumentStore, VersionConflict
from shared.types.workers import WorkerInfo, WorkerLoad
from tests.support.workers import worker_info

pytestmark = pytest.mark.integration


def info(worker_id: str = "w1") -> WorkerInfo:
    return worker_info(worker_id, "default")


async def test_lease_not_renewed_expires(redis: Redis) -> None:
    registry = WorkerRegistry(redis)
    await registry.heartbeat(info(), WorkerLoad(running_requests=3), lease_ttl_s=0.3)
    [record] = await registry.list_workers()
    assert record.load.running_requests == 3
    await asyncio.sleep(0.6)
    assert await registry.list_workers() == []
    # The index entry of the lapsed worker was pruned on read.
    assert await redis.smembers(schema.WORKERS) == set()


async def test_heartbeat_keeps_the_lease_alive_and_deregister_removes(redis: Redis) -> None:
    registry = WorkerRegistry(redis)
    beats = iter(range(1000))
    heartbeat = Heartbeat(
        registry, info(), lambda: WorkerLoad(requests_finished=next(beats)), interval_s=0.05, lease_ttl_s=0.3
    )
    await heartbeat.start()
    await asyncio.sleep(0.8)
    [record] = await registry.list_workers()
    assert record.load.requests_finished >= 5  # renewed many times, never lapsed
    await heartbeat.stop()
    assert await registry.list_workers() == []


async def test_cordon_marks_a_worker_unschedulable(redis: Redis) -> None:
    registry = WorkerRegistry(redis)
    await registry.heartbeat(info("a"), WorkerLoad(), 5)
    await registry.heartbeat(info("b"), WorkerLoad(draining=True), 5)
    await registry.set_cordoned("a", True)
    records = {r.worker_id: r for r in await registry.list_workers()}
    assert not records["a"].schedulable and records["a"].cordoned
    assert not records["b"].schedulable and not records["b"].cordoned
    await registry.set_cordoned("a", False)
    assert (await registry.get("a")).schedulable  # type: ignore[union-attr]


async def test_concurrent_version_bumps_never_lose_an_update(redis_url: str) -> None:
    clients = [connect(redis_url) for _ in range(8)]
    stores = [DocumentStore(client) for client in clients]

    async def bump(store: DocumentStore, times: int) -> None:
        for _ in range(times):
            await store.update("counter", lambda body: {"n": (body or {"n": 0})["n"] + 1})

    await asyncio.gather(*(bump(store, 25) for store in stores))
    final = await stores[0].get("counter")
    assert final is not None
    assert final.body == {"n": 200}
    assert final.version == 200
    for client in clients:
        await client.aclose()


async def test_stale_write_is_refused_with_the_current_version(redis: Redis) -> None:
    store = DocumentStore(redis)
    assert await store.put("pool:a", {"replicas": 1}) == 1
    assert await store.put("pool:a", {"replicas": 2}, expected_version=1) == 2
    with pytest.raises(VersionConflict) as caught:
        await store.put("pool:a", {"replicas": 3}, expected_version=1)
    assert caught.value.fields["current_version"] == 2
    assert (await store.get("pool:a")).body == {"replicas": 2}  # type: ignore[union-attr]
    assert await store.names("pool:") == ["pool:a"]
    assert await store.delete("pool:a")
    assert await store.get("pool:a") is None


async def test_records_expire_once_finished_and_listings_forget_them(redis: Redis) -> None:
    records = RecordIndex(redis, RecordKeys(schema.graph, schema.GRAPH_INDEX, schema.OPEN_GRAPHS))
    for index in range(3):
        await records.put(f"g{index}", f'{{"n": {index}, "done": false}}', created_at=index, finished=False)
    await records.put("g0", '{"n": 0, "done": true}', created_at=0, finished=True)
    assert await records.recent(10) == [
        b'{"n": 2, "done": false}',
        b'{"n": 1, "done": false}',
        b'{"n": 0, "done": true}',
    ]
    assert 0 < await redis.ttl(schema.graph("g0")) <= FINISHED_TTL_S  # finished: expires
    assert await redis.ttl(schema.graph("g1")) == -1  # running: kept
    assert sorted(await records.open(lambda raw: b'"done": true' in raw)) == [
        b'{"n": 1, "done": false}',
        b'{"n": 2, "done": false}',
    ]

    await redis.delete(schema.graph("g0"))  # what its expiry does
    assert len(await records.recent(10)) == 2
    assert await redis.zcard(schema.GRAPH_INDEX) == 2  # the index forgot it as it met it
    assert await redis.scard(schema.OPEN_GRAPHS) == 2


async def test_a_read_is_whole_only_when_the_cluster_mark_stood_before_and_after_it(redis: Redis) -> None:
    async def read() -> int:
        return 7

    async def read_across_a_wipe() -> int:
        await redis.flushdb()
        return 7

    async def read_across_a_restore() -> int:
        await redis.set(schema.CLUSTER, "1")
        return 7

    assert await read_marked(redis, read) == (7, False)  # never marked: a new cluster, or a wiped one
    assert await read_marked(redis, read_across_a_restore) == (7, False)  # the read may predate the restore
    assert await read_marked(redis, read) == (7, True)
    assert await read_marked(redis, read_across_a_wipe) == (7, False)
