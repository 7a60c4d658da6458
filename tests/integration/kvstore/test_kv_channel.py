"""The kvstore's "kv" data channel through a real store: what it refuses, and that it stays usable."""

from __future__ import annotations

import asyncio

import pytest

from shared.errors import InvalidArgument, Unauthenticated, Unavailable
from shared.rpc.blocks import CorruptBlock
from shared.rpc.channel import connect
from shared.rpc.kvchannel import CHANNEL, KVChannelClient
from shared.rpc.kvstore_client import KVStoreClient
from shared.rpc.security import Role
from shared.rpc.shoal.v1 import kvstore_pb2
from shared.types.kv import KVBlock, checksum
from tests.support.blocks import block, blocks
from tests.support.pki import as_worker
from tests.support.services import running_kvstore

pytestmark = pytest.mark.integration


async def test_a_wrong_token_is_refused(redis_url: str) -> None:
    async with running_kvstore(redis_url, internal_token="right-token") as app:
        data = app.servicer.data_address
        channel = KVChannelClient(data, as_worker("wrong-token"))
        with pytest.raises(Unauthenticated, match="token"):
            await channel.get([block(1).hash], prefix_only=True, timeout_s=5)
        await channel.close()
        good = KVChannelClient(data, as_worker("right-token"))
        assert await good.get([block(1).hash], prefix_only=True, timeout_s=5) == []
        await good.close()


async def test_a_corrupt_payload_is_refused_and_the_connection_stays_usable(redis_url: str) -> None:
    async with running_kvstore(redis_url) as app:
        channel = KVChannelClient(app.servicer.data_address, as_worker(), connections=1)
        good = block(2, size=300_000)
        damaged = KVBlock(good.hash, good.header, good.payload[:-1] + b"\x00", good.checksum())  # stale checksum
        with pytest.raises(InvalidArgument, match="checksum"):
            await channel.put([damaged], "", 0, timeout_s=5)
        assert await channel.get([good.hash], prefix_only=True, timeout_s=5) == []  # nothing stored
        assert (await channel.put([good], "", 0, timeout_s=5)).stored == 1
        assert await channel.get([good.hash], prefix_only=True, timeout_s=5) == [good]
        await channel.close()


async def test_an_oversized_block_is_refused_before_its_bytes(redis_url: str) -> None:
    async with running_kvstore(redis_url, max_block_bytes=2**20) as app:
        channel = KVChannelClient(app.servicer.data_address, as_worker(), connections=1)
        with pytest.raises(InvalidArgument, match="exceeds"):
            await channel.put([block(3, size=2**20 + 1)], "", 0, timeout_s=5)
        fits = block(4, size=2**20)
        assert (await channel.put([fits], "", 0, timeout_s=5)).stored == 1  # on a fresh connection
        await channel.close()


async def test_a_frame_that_is_not_a_request_closes_the_connection(redis_url: str) -> None:
    async with running_kvstore(redis_url) as app:
        frames: list[bytes] = []
        closed = asyncio.Event()
        conn = await connect(
            app.servicer.data_address, CHANNEL, Role.KVSTORE, as_worker(), lambda f: frames.append(bytes(f)), closed.set
        )
        conn.send(b"\xff\xff\xff not a protobuf message")
        await asyncio.wait_for(closed.wait(), 5)
        reply = kvstore_pb2.KVChannelReply.FromString(frames[0])
        assert reply.error_code == "invalid_argument"


async def test_damage_on_the_way_back_is_caught_by_the_reader(redis_url: str) -> None:
    async with running_kvstore(redis_url) as app:
        stored = block(5, size=100_000)
        channel = KVChannelClient(app.servicer.data_address, as_worker(), connections=1)
        await channel.put([stored], "", 0, timeout_s=5)
        # The reply's checksum is flipped on the reader's side: it must refuse the bytes, not return them.
        exchange = channel._idle[0]
        original = exchange._frame

        def damaging(payload: memoryview | bytearray) -> None:
            if exchange._reply is None:
                reply = kvstore_pb2.KVChannelReply.FromString(bytes(payload))
                if reply.blocks:
                    reply.blocks[0].crc32c ^= 1
                payload = memoryview(reply.SerializeToString())
            original(payload)

        exchange._frame = damaging  # type: ignore[method-assign]
        assert exchange.conn is not None
        exchange.conn._on_frame = damaging
        with pytest.raises(CorruptBlock):
            await channel.get([stored.hash], prefix_only=True, timeout_s=5)
        await channel.close()


async def test_many_clients_at_once_get_their_own_blocks(redis_url: str) -> None:
    async with running_kvstore(redis_url, memory_bytes=256 * 2**20) as app:
        client = KVStoreClient(app.address, as_worker(), local=False)
        mine = blocks(40, size=200_000)
        await client.put(mine)
        results = await asyncio.gather(*(client.get([b.hash]) for b in mine))
        assert [r[0] for r in results] == mine
        assert client.uses_data_channel
        await client.close()


async def test_a_store_that_went_away_fails_the_call_cleanly(redis_url: str) -> None:
    async with running_kvstore(redis_url) as app:
        address = app.servicer.data_address
    channel = KVChannelClient(address, as_worker())
    with pytest.raises(Unavailable):
        await channel.get([block(6).hash], prefix_only=True, timeout_s=2)
    await channel.close()


async def test_a_block_on_its_way_to_a_slow_reader_keeps_its_bytes_while_its_slot_is_wanted(redis_url: str) -> None:
    # Gets are sent straight from the block's arena slot. Two slots: the block is deleted while its
    # reply waits on a reader that stopped reading, and two more blocks are put, which would reuse the slot.
    size = 12 * 2**20
    async with running_kvstore(redis_url, max_block_bytes=16 * 2**20, memory_bytes=2 * (16 * 2**20 + 2**16)) as app:
        writer = KVChannelClient(app.servicer.data_address, as_worker(), connections=1)
        sent, later, latest = blocks(3, size=size, start=70)
        assert (await writer.put([sent], "", 0, timeout_s=10)).stored == 1
        frames: list[bytes] = []
        reply_done = asyncio.Event()

        def collect(frame: memoryview | bytearray) -> None:
            frames.append(bytes(frame))
            if len(frames) == 2:
                reply_done.set()

        reader = await connect(app.servicer.data_address, CHANNEL, Role.KVSTORE, as_worker(), collect, lambda: None)
        assert reader.transport is not None
        reader.transport.pause_reading()
        request = kvstore_pb2.KVChannelRequest(get=kvstore_pb2.KVChannelGet(hashes=[sent.hash], prefix_only=True))
        reader.send(request.SerializeToString())
        await asyncio.sleep(0.2)  # the store answered; most of the reply waits for the reader
        assert await app.store.delete([sent.hash]) == 1
        assert (await writer.put([later], "", 0, timeout_s=10)).stored == 1
        assert (await writer.put([latest], "", 0, timeout_s=10)).stored == 1
        assert app.store.tier_of(later.hash) is None  # evicted for `latest`: the leased slot was not free
        reader.transport.resume_reading()
        await asyncio.wait_for(reply_done.wait(), 10)
        reply = kvstore_pb2.KVChannelReply.FromString(frames[0])
        assert [meta.hash for meta in reply.blocks] == [sent.hash]
        assert frames[1] == sent.payload
        assert checksum(frames[1]) == reply.blocks[0].crc32c
        reader.close()
        await asyncio.sleep(0.1)  # the slot is free once the reply has gone: a put no longer evicts
        assert (await writer.put([later], "", 0, timeout_s=10)).stored == 1
        assert app.store.tier_of(latest.hash) is not None
        await writer.close()
