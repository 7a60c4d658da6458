"""The Actuator contract: the controller's only way to start and stop workers.

Scale-up sets a pool's target; scale-down is always drain-first: a job drains
a chosen worker, then calls `remove`, which stops exactly that worker and
lowers the target by one. Implementations: `local` (processes on this
machine, what `make run` uses) and `kubernetes` (the pool's Deployment).
All methods are idempotent, so a job that is retried after a crash is safe.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

from shared.types.pools import ModelPublic, PoolPublic


class InstanceState(enum.StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"


@dataclass(frozen=True)
class Instance:
    worker_id: str
    state: InstanceState
    started_at: float


@dataclass(frozen=True)
class PoolInstances:
    target: int
    instances: list[Instance] = field(default_factory=list)

    def count(self, state: InstanceState) -> int:
        return sum(1 for i in self.instances if i.state is state)


class Actuator(Protocol):
    name: str

    async def scale_to(self, pool: PoolPublic, model: ModelPublic, replicas: int) -> None:
        """Make `replicas` the pool's target (starting or cancelling workers not yet serving)."""

    async def remove(self, pool: PoolPublic, worker_id: str) -> None:
        """Stop this (already drained) worker and lower the target by one."""

    async def instances(self, pool: str) -> PoolInstances:
        """The pool's target and its instances now."""

    async def delete_pool(self, pool: str) -> None:
        """Stop every worker of a deleted pool."""
