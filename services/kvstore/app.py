"""The kvstore process: block store, gRPC server, KV events to Redis.

Redis is optional for the store's own work: if it is down, blocks are still
stored and served; only the index events wait (followers resync later).
"""

from __future__ import annotations

import asyncio
import os
from contextlib import suppress
from pathlib import Path

from services.kvstore.arena import Arena
from services.kvstore.channel import CHANNEL as KV_CHANNEL
from services.kvstore.channel import KVChannel
from services.kvstore.local import LocalEndpoint
from services.kvstore.server import KVStoreMetrics, KVStoreServicer
from services.kvstore.store import BlockStore
from services.kvstore.tiers.disk import DiskTier
from services.kvstore.tiers.memory import MemoryTier
from shared.config.services import KVStoreSettings
from shared.kvlocal.client import STAGING_PREFIX
from shared.policies.eviction import make_policy
from shared.rpc.channel import ChannelServer
from shared.rpc.security import RELOAD_INTERVAL_S, Role, RpcSecurity
from shared.rpc.server import GrpcServer, run_until_signal
from shared.rpc.shoal.v1 import kvstore_pb2, kvstore_pb2_grpc
from shared.state.kvevents import KVEventPublisher
from shared.state.redis import connect
from shared.telemetry.logging import get_logger
from shared.telemetry.metrics import new_registry, serve_metrics
from shared.ticker import Ticker

log = get_logger("shoal.kvstore")

SERVICE_NAME = "shoal.v1.KVStore"
EVENT_INTERVAL_S = 0.1


class KVStoreApp:
    def __init__(self, settings: KVStoreSettings) -> None:
        self.settings = settings
        self.security = RpcSecurity.from_settings(settings, Role.KVSTORE)
        disk = DiskTier(settings.disk_path, settings.disk_bytes) if settings.disk_path else None
        _reclaim_dead(settings.memory_path, settings.store_id)
        name = f"shoal-kv-{settings.store_id}-{os.getpid()}"
        self.arena = Arena(settings.memory_path / f"{name}.arena", settings.memory_bytes, settings.max_block_bytes)
        self.store = BlockStore(MemoryTier(self.arena), disk, lambda: make_policy(settings.eviction))
        self.metrics = KVStoreMetrics(new_registry(), self.store)
        self.local: LocalEndpoint | None = None
        local_info = None
        if settings.local_access:
            self.local = LocalEndpoint(self.store, settings.memory_path / f"{name}.sock", settings.max_block_bytes)
            local_info = kvstore_pb2.LocalAccess(
                arena_path=str(self.arena.path),
                socket_path=str(self.local.socket_path),
                arena_id=self.arena.geometry.arena_id.hex(),
            )
        self.servicer = KVStoreServicer(self.store, self.metrics, settings.max_block_bytes, local_info)
        self.channels = ChannelServer(
            {KV_CHANNEL: lambda conn: KVChannel(self.store, self.metrics, settings.max_block_bytes, conn)},
            self.security,
        )
        self.redis = connect(settings.redis_url)
        self.publisher = KVEventPublisher(self.redis, settings.store_id)
        self._events = Ticker("kv-events", EVENT_INTERVAL_S, self._publish_events)
        self._certificates = Ticker("certificates", RELOAD_INTERVAL_S, self.security.watch)
        self.server: GrpcServer | None = None
        self.metrics_port = 0
        self._opening: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        assert self.server is not None
        return self.settings.advertised(self.server.port)

    async def start(self) -> None:
        settings = self.settings
        if self.local is not None:
            await self.local.start()
        self.server = await GrpcServer.create(
            settings.host,
            settings.grpc_port,
            [(kvstore_pb2_grpc.add_KVStoreServicer_to_server, self.servicer)],
            [SERVICE_NAME],
            self.security,
            settings.health_port,
        )
        data_port = await self.channels.start(settings.host, settings.data_port)
        self.servicer.data_address = settings.advertised(data_port)
        _server, self.metrics_port = serve_metrics(self.metrics.registry, settings.host, settings.metrics_port)
        self._events.start()
        self._certificates.start()
        # Serving first: a disk tier of any size must not hold the port (and the probes) back.
        self._opening = asyncio.create_task(self._open_disk(), name="kvstore-disk-listing")
        log.info("kvstore serving", address=self.address, memory_bytes=settings.memory_bytes)

    async def _open_disk(self) -> None:
        try:
            await self.store.open()
        except OSError:
            # The store keeps serving from memory; a spill finds the folder's trouble again and backs off.
            log.exception("the disk tier's folder could not be listed; its earlier blocks are not served")

    async def _publish_events(self) -> None:
        await self.publisher.tick(self.store.drain_events(), self.store.stored_hashes)

    async def _close(self) -> None:
        if self._opening is not None:
            self._opening.cancel()
            with suppress(asyncio.CancelledError):
                await self._opening
        await self.channels.stop()
        await self._events.stop()
        await self._certificates.stop()
        if self.local is not None:
            await self.local.stop()
        self.arena.close()
        await self.redis.aclose()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(grace_s=1.0)
        await self._close()

    async def run(self) -> None:
        await self.start()
        assert self.server is not None
        await run_until_signal(self.server, self.settings.shutdown_grace_s)
        await self._close()


def _reclaim_dead(folder: Path, store_id: str) -> None:
    """Remove the arenas and sockets a killed predecessor of this store left, and staging files of
    killed clients: files in /dev/shm are memory, and a SIGKILL skips every cleanup. Their names carry
    their process's pid; a file whose process no longer exists (in this pid namespace) is dead."""
    own = [*folder.glob(f"shoal-kv-{store_id}-*.arena"), *folder.glob(f"shoal-kv-{store_id}-*.sock")]
    staging = list(folder.glob(f"{STAGING_PREFIX}*"))
    pids = [(path, path.stem.rsplit("-", 1)[-1]) for path in own]
    pids += [(path, path.name.removeprefix(STAGING_PREFIX).split("-", 1)[0]) for path in staging]
    for path, pid in pids:
        if pid.isdigit() and not _alive(int(pid)):
            with suppress(OSError):
                path.unlink()
                log.info("removed a file a killed process left", path=str(path))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, as another user
    return True
