"""The kvstore through its real gRPC server: round trips, restarts, bad input, many clients."""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from redis.asyncio import Redis

from shared.errors import InvalidArgument, Overloaded, Unavailable
from shared.hashing import HASH_BYTES
from shared.kvlocal.client import STAGING_PREFIX
from shared.rpc.blocks import CHUNK_BYTES
from shared.rpc.client import open_channel
from shared.rpc.errors import from_rpc_error
from shared.rpc.kvstore_client import KVStoreClient
from shared.rpc.security import Role
from shared.rpc.shoal.v1 import common_pb2, kvstore_pb2, kvstore_pb2_grpc
from shared.state.kvevents import KVEventFollower
from shared.types.kv import KVBlock, checksum
from tests.integration.worker.test_worker_service import _Index
from tests.support.blocks import block, blocks
from tests.support.pki import as_worker
from tests.support.services import running_kvstore

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("local", "data_channel"),
    [(True, True), (False, True), (False, False)],
    ids=["shared-memory", "data-channel", "grpc"],
)
async def test_put_get_lookup_round_trip(redis_url: str, local: bool, data_channel: bool) -> None:
    async with running_kvstore(redis_url) as app:
        client = KVStoreClient(app.address, as_worker(), local=local, data_channel=data_channel)
        stored = blocks(5, size=3 * CHUNK_BYTES + 17)  # several chunks per block
        response = await client.put(stored)
        assert (response.stored, response.duplicates) == (5, 0)
        assert (await client.put(stored[:2])).duplicates == 2
        assert await client.get([b.hash for b in stored]) == stored
        lookup = await client.lookup([b.hash for b in stored[:3]] + [block(99).hash] + [stored[4].hash])
        assert lookup.matched == 3
        assert lookup.tiers == [kvstore_pb2.TIER_MEMORY] * 3
        # A prefix read stops at the first miss; a full read skips it.
        mixed = [stored[0].hash, block(99).hash, stored[1].hash]
        assert await client.get(mixed) == [stored[0]]
        assert await client.get(mixed, prefix_only=False) == [stored[0], stored[1]]
        assert await client.delete([stored[0].hash]) == 1
        assert (await client.lookup([stored[0].hash])).matched == 0
        assert client.uses_local_path is local
        assert client.uses_data_channel is data_channel
        await client.close()  # flushes the reads a local client served itself
        observer = KVStoreClient(app.address, as_worker(), local=False)
        stats = await observer.stats()
        assert stats.tiers[0].blocks == 4
        assert stats.hits >= 7
        assert stats.misses >= 1
        await observer.close()


async def test_spilled_blocks_survive_a_restart(redis_url: str, tmp_path: Path) -> None:
    settings = {"memory_bytes": 4 * 2**20, "max_block_bytes": 2**20, "disk_path": tmp_path, "disk_bytes": 64 * 2**20}
    saved = blocks(12, size=2**20 - 256)
    async with running_kvstore(redis_url, **settings) as app:
        client = KVStoreClient(app.address, as_worker())
        await client.put(saved)
        lookup = await client.lookup([b.hash for b in saved])
        assert lookup.matched == 12
        assert kvstore_pb2.TIER_DISK in lookup.tiers
        await client.close()
    async with running_kvstore(redis_url, **settings) as app:
        client = KVStoreClient(app.address, as_worker())
        spilled = [b for b, tier in zip(saved, lookup.tiers, strict=True) if tier == kvstore_pb2.TIER_DISK]
        assert await client.get([b.hash for b in spilled]) == spilled
        await client.close()


async def test_full_store_of_pinned_blocks_refuses_with_resource_exhausted(redis_url: str) -> None:
    # Pages of one largest slot (1 MiB + 4 KiB): room for exactly four of these blocks.
    async with running_kvstore(redis_url, memory_bytes=4 * (2**20 + 4096), max_block_bytes=2**20) as app:
        client = KVStoreClient(app.address, as_worker())
        await client.put(blocks(4, size=900_000), session_id="agent", pin_ttl_s=600)
        with pytest.raises(Overloaded, match="pinned"):
            await client.put([block(50, size=900_000)])
        assert await client.pin("agent", [], ttl_s=0) == 4
        assert (await client.put([block(50, size=900_000)])).stored == 1
        await client.close()


async def _raw_put(address: str, messages: list[kvstore_pb2.PutRequest]) -> None:
    async def stream() -> AsyncIterator[kvstore_pb2.PutRequest]:
        for message in messages:
            yield message

    channel = open_channel(address, Role.KVSTORE, as_worker())
    try:
        await kvstore_pb2_grpc.KVStoreStub(channel).Put(stream(), timeout=10)
    except grpc.RpcError as exc:
        raise from_rpc_error(exc) from None
    finally:
        await channel.close()


def _begin(b: KVBlock, **change: object) -> kvstore_pb2.PutRequest:
    meta = common_pb2.BlockMeta(hash=b.hash, size=len(b.payload), crc32c=checksum(b.payload), header=b.header)
    for field, value in change.items():
        setattr(meta, field, value)
    return kvstore_pb2.PutRequest(chunk=common_pb2.BlockChunk(begin=meta))


def _data(payload: bytes | bytearray) -> kvstore_pb2.PutRequest:
    return kvstore_pb2.PutRequest(chunk=common_pb2.BlockChunk(data=bytes(payload)))


B = block(1, size=1000)


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([_begin(B, hash=b"short"), _data(B.payload)], f"{HASH_BYTES} bytes"),
        ([_data(B.payload)], "before its begin"),
        ([_begin(B, crc32c=1), _data(B.payload)], "CRC-32C mismatch"),
        ([_begin(B), _data(B.payload[:10])], "ended after 10 of 1000 bytes"),
        ([_begin(B), _data(B.payload + b"x")], "more than its declared"),
        ([_begin(B, size=10**9)], "exceeds the limit"),
        ([_begin(B, header=b"h" * 5000), _data(B.payload)], "header of 5000 bytes"),
        (
            [_begin(B), _data(B.payload), kvstore_pb2.PutRequest(options=kvstore_pb2.PutOptions(session_id="s"))],
            "options must come first",
        ),
        ([kvstore_pb2.PutRequest()], "empty put message"),
    ],
    ids=["hash", "data-first", "crc", "truncated", "overflow", "oversized", "header", "options-late", "empty"],
)
async def test_malformed_puts_get_invalid_argument_and_store_nothing_bad(
    redis_url: str, messages: list[kvstore_pb2.PutRequest], message: str
) -> None:
    async with running_kvstore(redis_url, max_block_bytes=2**20) as app:
        with pytest.raises(InvalidArgument, match=message):
            await _raw_put(app.address, messages)
        client = KVStoreClient(app.address, as_worker())
        assert (await client.put([block(2, size=1000)])).stored == 1  # still serving
        with pytest.raises(InvalidArgument, match="16 bytes"):
            await client.lookup([b"bad"])
        await client.close()


async def test_events_reach_a_follower(redis_url: str, redis: Redis) -> None:
    index = _Index()
    follower = KVEventFollower(redis, index)
    await follower.bootstrap()
    async with running_kvstore(redis_url, store_id="store-a") as app:
        client = KVStoreClient(app.address, as_worker())
        await client.put(blocks(3))
        await client.delete([block(0).hash])
        for _ in range(30):
            await follower.poll(block_ms=100)
            if index.blocks.get("store-a") == {block(1).hash, block(2).hash}:
                break
        assert index.blocks["store-a"] == {block(1).hash, block(2).hash}
        await client.close()


async def test_a_store_that_is_down_reads_as_empty_for_request_paths() -> None:
    client = KVStoreClient("127.0.0.1:1", as_worker(), timeout_s=1)
    assert await client.fetch_prefix([block(0).hash], timeout_s=0.5) == []
    assert not await client.store_blocks(blocks(1), timeout_s=0.5)
    await client.close()


def _hammer(address: str, seed: int, rounds: int, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    async def main() -> int:
        client = KVStoreClient(address, as_worker())
        shared_blocks = blocks(8, size=200_000)
        seen = 0
        for i in range(rounds):
            mine = shared_blocks[(seed + i) % 8 :] + shared_blocks[: (seed + i) % 8]
            await client.put(mine[:3])
            for got in await client.get([b.hash for b in mine], prefix_only=False):
                expected = next(b for b in shared_blocks if b.hash == got.hash)
                assert got == expected, "a reader saw a block that is not exactly what was written"
                seen += 1
        await client.close()
        return seen

    queue.put(asyncio.run(main()))


async def test_concurrent_puts_and_gets_of_the_same_blocks_from_processes(redis_url: str) -> None:
    async with running_kvstore(redis_url) as app:
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        workers = [context.Process(target=_hammer, args=(app.address, seed, 15, queue)) for seed in range(4)]
        for process in workers:
            process.start()
        for process in workers:
            await asyncio.to_thread(process.join, 120)
        assert [p.exitcode for p in workers] == [0, 0, 0, 0]
        seen = [queue.get(timeout=5) for _ in workers]
        assert all(count > 0 for count in seen)


async def _local_call(socket_path: str, message: dict[str, object]) -> dict[str, object]:
    from shared.kvlocal import protocol

    reader, writer = await asyncio.open_unix_connection(socket_path)
    writer.write(protocol.encode(message))
    await writer.drain()
    reply = await protocol.read_message(reader)
    writer.close()
    assert reply is not None
    return reply


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ({"op": "put", "blocks": []}, "put before hello"),
        ({"op": "hello", "staging": "/etc/passwd"}, "a staging file must be"),
        ({"op": "dance"}, "unknown op"),
        ({"op": "put"}, "put before hello"),
    ],
    ids=["put-first", "bad-staging", "unknown-op", "no-blocks"],
)
async def test_malformed_local_messages_get_clear_errors(
    redis_url: str, message: dict[str, object], error: str
) -> None:
    async with running_kvstore(redis_url) as app:
        assert app.local is not None
        reply = await _local_call(str(app.local.socket_path), message)
        assert error in str(reply["error"]), reply


async def test_local_put_refuses_blocks_outside_the_staging_file(redis_url: str, tmp_path: Path) -> None:
    from shared.kvlocal import protocol

    async with running_kvstore(redis_url, memory_path=tmp_path) as app:
        assert app.local is not None
        staging = tmp_path / f"{STAGING_PREFIX}test"  # where clients keep theirs: beside the arena
        staging.write_bytes(b"\0" * 4096)
        reader, writer = await asyncio.open_unix_connection(str(app.local.socket_path))
        for message in (
            {"op": "hello", "staging": str(tmp_path / f"{STAGING_PREFIX}missing")},
            {"op": "hello", "staging": str(staging)},
            {"op": "put", "blocks": [[4000, block(1).hash.hex(), 10, 1000, 0]]},
            {"op": "put", "blocks": [[0, "abcd", 10, 10, 0]]},
        ):
            writer.write(protocol.encode(message))
            await writer.drain()
        replies = [await protocol.read_message(reader) for _ in range(4)]
        writer.close()
        assert "cannot map staging file" in str(replies[0])
        assert replies[1] == {"ok": True}
        assert "outside the staging file" in str(replies[2])
        assert "16 bytes" in str(replies[3])


async def test_writes_queued_behind_a_failed_local_write_fail_over_instead_of_crashing(redis_url: str) -> None:
    """Concurrent puts share the shared-memory path; when one fails (the store died) the path is closed,
    and a put that was waiting for it must fail over like the first (it used to write into the unmapped
    staging file and raise ValueError, failing a P/D prefill)."""
    async with running_kvstore(redis_url) as app:
        client = KVStoreClient(app.address, as_worker())
        await client.put(blocks(1, size=4096))
        local = client._local
        assert local is not None and client.uses_local_path
        async with local._lock:  # a put in flight holds the path ...
            queued = asyncio.create_task(local.put(blocks(2, size=4096, start=10)))
            await asyncio.sleep(0.01)
            closing = asyncio.create_task(local.close())  # ... when the store fails it and the client lets go
            await asyncio.sleep(0.01)
        with pytest.raises(Unavailable):
            await queued
        await closing
        # The client itself goes on: the next write takes another path.
        assert await client.store_blocks(blocks(2, size=4096, start=20), timeout_s=10.0)
        await client.close()
