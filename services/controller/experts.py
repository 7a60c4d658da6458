"""Watching expert-parallel instances: balance history, and rebalancing on a schedule.

Every `expert_stats_interval_s` the controller asks each worker for its
expert statistics; an expert-parallel instance (rank 0 answers for the
group) gets a sample of its balance (max / mean rank load, averaged and
worst over layers) appended to a capped Redis stream, which the admin API
serves as history. With `expert_rebalance_interval_s` set, an instance whose
last scheduled look is older than that is planned with the migration-aware
policy, and a live migration job opens when the plan lowers its mean balance
by at least `expert_rebalance_min_gain` (one migration per instance at a
time: a plan made while one runs is dropped).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from redis.asyncio import Redis

from services.controller.jobs.migrate import plan_from_stats, topology_of
from shared.config import ControllerSettings
from shared.errors import FailedPrecondition, ShoalError
from shared.policies.placement import layer_report
from shared.rpc.pool import ClientPool
from shared.rpc.shoal.v1 import worker_pb2
from shared.rpc.worker_client import WorkerClient
from shared.state import schema
from shared.state.registry import WorkerRegistry
from shared.telemetry.logging import get_logger

log = get_logger("shoal.controller.experts")

HISTORY_LEN = 2000


def balance_sample(stats: worker_pb2.ExpertStatsResponse) -> dict[str, float] | None:
    """Mean and worst balance over layers of an expert-parallel instance (None when it is not one)."""
    wire = stats.expert_map
    if not wire.num_ranks:
        return None
    slots = [list(layer.slot_experts) for layer in sorted(wire.layers, key=lambda layer: layer.layer)]
    loads = [[float(t) for t in layer.tokens] for layer in sorted(stats.layers, key=lambda layer: layer.layer)]
    _, balance = layer_report(slots, loads, topology_of(wire))
    return {"balance_mean": float(np.mean(balance)), "balance_max": float(np.max(balance)), "version": wire.version}


class ExpertWatch:
    def __init__(
        self,
        redis: Redis,
        registry: WorkerRegistry,
        clients: ClientPool[WorkerClient],
        settings: ControllerSettings,
        open_migration: Callable[[str, str, dict[str, Any]], Awaitable[Any]],
    ) -> None:
        self.redis = redis
        self.registry = registry
        self.clients = clients
        self.settings = settings
        self.open_migration = open_migration
        self.last_look: dict[str, float] = {}

    async def tick(self) -> None:
        records = await self.registry.list_workers()
        await self.clients.retain({r.info.address for r in records})
        for record in records:
            try:
                stats = await self.clients.get(record.info.address).expert_stats()
            except ShoalError:
                continue  # gone or busy: the next tick will see it
            sample = balance_sample(stats)
            if sample is None:
                continue
            fields = {"t": time.time(), **sample}
            await self.redis.xadd(schema.expert_history(record.worker_id), fields, maxlen=HISTORY_LEN, approximate=True)
            await self._maybe_rebalance(record.worker_id, record.info.address, stats)

    async def _maybe_rebalance(self, worker_id: str, address: str, stats: worker_pb2.ExpertStatsResponse) -> None:
        every = self.settings.expert_rebalance_interval_s
        now = time.monotonic()
        if every <= 0 or now - self.last_look.get(worker_id, -float("inf")) < every:
            return
        self.last_look[worker_id] = now
        plan = plan_from_stats(stats, "migration-aware")
        gain = plan["balance_before"] - plan["balance_after"]
        if plan["moves"] == 0 or gain < self.settings.expert_rebalance_min_gain:
            return
        try:
            job = await self.open_migration(worker_id, address, plan)
        except FailedPrecondition:
            return  # a migration of this instance is still running
        log.info("scheduled expert rebalance", worker=worker_id, job=job.id, moves=plan["moves"], gain=round(gain, 4))


async def history(redis: Redis, worker_id: str, limit: int) -> list[dict[str, float]]:
    entries = await redis.xrevrange(schema.expert_history(worker_id), count=limit)
    return [{key.decode(): float(value) for key, value in fields.items()} for _, fields in reversed(entries)]
