"""The KVStore gRPC service over a BlockStore."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import TypeAlias

from grpc import aio
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from services.kvstore.store import BlockStore
from shared.errors import InvalidArgument
from shared.hashing import HASH_BYTES, BlockHash
from shared.rpc.blocks import BlockAssembler, block_chunks, missing_chunk
from shared.rpc.shoal.v1 import common_pb2, kvstore_pb2, kvstore_pb2_grpc
from shared.telemetry.metrics import LATENCY_BUCKETS
from shared.types.kv import KVBlock

Context: TypeAlias = aio.ServicerContext

# Blocks stored per store call while a Put streams in (bounds buffered bytes).
PUT_BATCH = 32
MAX_HASHES = 65536
MAX_PIN_TTL_S = 24 * 3600


def check_hashes(hashes: list[BlockHash]) -> None:
    if len(hashes) > MAX_HASHES:
        raise InvalidArgument(f"at most {MAX_HASHES} hashes per call, got {len(hashes)}", param="hashes")
    bad = next((h for h in hashes if len(h) != HASH_BYTES), None)
    if bad is not None:
        raise InvalidArgument(f"every hash must be {HASH_BYTES} bytes, got one of {len(bad)}", param="hashes")


def check_pin_ttl(ttl_s: int) -> None:
    if ttl_s > MAX_PIN_TTL_S:
        raise InvalidArgument(f"pin_ttl_s is at most {MAX_PIN_TTL_S}", param="pin_ttl_s")


class _StoreCollector(Collector):
    def __init__(self, store: BlockStore) -> None:
        self._store = store

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        store = self._store
        tiers: list[tuple[str, int, int, int]] = [
            ("memory", len(store.memory), store.memory.used_bytes, store.memory.evictions)
        ]
        if store.disk is not None:
            tiers.append(("disk", len(store.disk), store.disk.used_bytes, store.disk.evictions))
        blocks = GaugeMetricFamily("shoal_kvstore_blocks", "Blocks per tier", labels=["tier"])
        used = GaugeMetricFamily("shoal_kvstore_bytes", "Bytes per tier", labels=["tier"])
        evictions = CounterMetricFamily("shoal_kvstore_evictions", "Blocks evicted per tier", labels=["tier"])
        for name, count, size, evicted in tiers:
            blocks.add_metric([name], count)
            used.add_metric([name], size)
            evictions.add_metric([name], evicted)
        yield blocks
        yield used
        yield evictions
        lookups = CounterMetricFamily("shoal_kvstore_block_reads", "Block reads by result", labels=["result"])
        lookups.add_metric(["hit"], store.hits)
        lookups.add_metric(["miss"], store.misses)
        yield lookups
        yield GaugeMetricFamily("shoal_kvstore_pinned_blocks", "Blocks pinned now", store.pinned_count)


class KVStoreMetrics:
    def __init__(self, registry: CollectorRegistry, store: BlockStore) -> None:
        self.registry = registry
        self.latency = Histogram(
            "shoal_kvstore_rpc_seconds", "RPC latency by method", ["method"], buckets=LATENCY_BUCKETS, registry=registry
        )
        self.bytes = Counter(
            "shoal_kvstore_transfer_bytes", "Payload bytes by direction", ["direction"], registry=registry
        )
        for direction in ("in", "out"):  # at zero from the start: a rate() over them is 0, not "no data"
            self.bytes.labels(direction)
        registry.register(_StoreCollector(store))


class KVStoreServicer(kvstore_pb2_grpc.KVStoreServicer):
    def __init__(
        self,
        store: BlockStore,
        metrics: KVStoreMetrics,
        max_block_bytes: int,
        local: kvstore_pb2.LocalAccess | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.max_block_bytes = max_block_bytes
        self.local = local
        # host:port of the store's data channels, set once they listen.
        self.data_address = ""

    async def Put(
        self, request_iterator: AsyncIterator[kvstore_pb2.PutRequest], context: Context
    ) -> kvstore_pb2.PutResponse:
        started = time.perf_counter()
        assembler = BlockAssembler(self.max_block_bytes)
        session, pin_ttl = "", 0
        batch: list[KVBlock] = []
        stored = duplicates = 0
        first = True
        async for request in request_iterator:
            if request.WhichOneof("part") == "options":
                if not first:
                    raise InvalidArgument("put options must come first in the stream", param="options")
                check_pin_ttl(request.options.pin_ttl_s)
                session, pin_ttl = request.options.session_id, request.options.pin_ttl_s
            elif request.WhichOneof("part") == "chunk":
                block = assembler.feed(request.chunk)
                if block is not None:
                    batch.append(block)
                    self.metrics.bytes.labels("in").inc(len(block.payload))
            else:
                raise InvalidArgument("empty put message", param="part")
            first = False
            if len(batch) >= PUT_BATCH:
                result = await self.store.put(batch, session, pin_ttl)
                stored, duplicates, batch = stored + result.stored, duplicates + result.duplicates, []
        assembler.finish()
        if assembler.missing:
            raise InvalidArgument("a put cannot carry `missing` chunks", param="chunk")
        result = await self.store.put(batch, session, pin_ttl)
        self.metrics.latency.labels("put").observe(time.perf_counter() - started)
        return kvstore_pb2.PutResponse(stored=stored + result.stored, duplicates=duplicates + result.duplicates)

    async def Get(self, request: kvstore_pb2.GetRequest, context: Context) -> AsyncIterator[common_pb2.BlockChunk]:
        hashes = list(request.hashes)
        check_hashes(hashes)
        started = time.perf_counter()
        for block_hash in hashes:
            block = await self.store.get(block_hash)
            if block is None:
                yield missing_chunk(block_hash)
                if request.prefix_only:
                    break
                continue
            self.metrics.bytes.labels("out").inc(len(block.payload))
            for chunk in block_chunks([block]):
                yield chunk
        self.metrics.latency.labels("get").observe(time.perf_counter() - started)

    async def Lookup(self, request: kvstore_pb2.LookupRequest, context: Context) -> kvstore_pb2.LookupResponse:
        hashes = list(request.hashes)
        check_hashes(hashes)
        tiers = self.store.lookup(hashes)
        return kvstore_pb2.LookupResponse(matched=len(tiers), tiers=tiers)  # type: ignore[arg-type]

    async def Delete(self, request: kvstore_pb2.DeleteRequest, context: Context) -> kvstore_pb2.DeleteResponse:
        hashes = list(request.hashes)
        check_hashes(hashes)
        return kvstore_pb2.DeleteResponse(deleted=await self.store.delete(hashes))

    async def Pin(self, request: kvstore_pb2.PinRequest, context: Context) -> kvstore_pb2.PinResponse:
        hashes = list(request.hashes)
        check_hashes(hashes)
        if not request.session_id:
            raise InvalidArgument("session_id is required", param="session_id")
        if request.ttl_s > MAX_PIN_TTL_S:
            raise InvalidArgument(f"ttl_s is at most {MAX_PIN_TTL_S}", param="ttl_s")
        return kvstore_pb2.PinResponse(pinned=self.store.pin(request.session_id, hashes, request.ttl_s))

    async def Stats(self, request: kvstore_pb2.StatsRequest, context: Context) -> kvstore_pb2.StatsResponse:
        store = self.store
        tiers = [
            kvstore_pb2.TierStats(
                tier=kvstore_pb2.TIER_MEMORY,
                blocks=len(store.memory),
                bytes=store.memory.used_bytes,
                capacity_bytes=store.memory.capacity_bytes,
                evictions=store.memory.evictions,
            )
        ]
        if store.disk is not None:
            tiers.append(
                kvstore_pb2.TierStats(
                    tier=kvstore_pb2.TIER_DISK,
                    blocks=len(store.disk),
                    bytes=store.disk.used_bytes,
                    capacity_bytes=store.disk.capacity_bytes,
                    evictions=store.disk.evictions,
                    loading=store.disk_loading,
                    corrupt_dropped=store.disk.corrupt_dropped,
                    write_failures=store.disk.write_failures,
                )
            )
        return kvstore_pb2.StatsResponse(
            tiers=tiers,
            hits=store.hits,
            misses=store.misses,
            pinned_blocks=store.pinned_count,
            local=self.local,
            data_address=self.data_address,
        )
