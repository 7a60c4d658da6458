"""Session pins: keep an agent's prompt prefix in the kvstore while it waits on a tool.

After a request that asked for a pin (`x-shoal-pin-s`) finishes, its
prompt's blocks are copied from the worker that served it to the kvstore,
pinned for the session until the pin lapses: they survive the worker evicting
them, and the session's next request can import them. The copy runs in the
background; a failure is logged and counted, never returned to the client.
"""

from __future__ import annotations

import asyncio

from services.router.discovery import WorkerDirectory
from services.router.metrics import RouterMetrics
from shared.errors import ShoalError
from shared.hashing import BlockHash
from shared.rpc.kvstore_client import KVStoreClient
from shared.rpc.pool import ClientPool
from shared.rpc.worker_client import WorkerClient
from shared.telemetry.logging import get_logger

log = get_logger("shoal.router.pinning")


class Pinner:
    def __init__(
        self,
        directory: WorkerDirectory,
        clients: ClientPool[WorkerClient],
        kvstores: ClientPool[KVStoreClient],
        kvstore_address: str,
        timeout_s: float,
        metrics: RouterMetrics,
    ) -> None:
        self.directory = directory
        self.clients = clients
        self.kvstores = kvstores
        self.kvstore_address = kvstore_address
        self.timeout_s = timeout_s
        self.metrics = metrics
        self.running: set[asyncio.Task[None]] = set()

    def later(self, worker_id: str, hashes: list[BlockHash], session_id: str, pin_s: int) -> None:
        task = asyncio.create_task(self._pin(worker_id, hashes, session_id, pin_s))
        self.running.add(task)
        task.add_done_callback(self.running.discard)

    async def _pin(self, worker_id: str, hashes: list[BlockHash], session_id: str, pin_s: int) -> None:
        address = self.directory.address(worker_id)
        if address is None:
            return
        try:
            blocks = await self.clients.get(address).fetch_kv(hashes, self.timeout_s)
            stored = await self.kvstores.get(self.kvstore_address).store_blocks(
                blocks, self.timeout_s, session_id=session_id, pin_ttl_s=pin_s
            )
        except ShoalError as exc:
            log.warning("could not pin a session's prefix", session=session_id, error=exc.message)
            return
        self.metrics.pins.labels("stored" if stored else "failed").inc()
