"""Registry entries with no process behind them: what a test writes to see how readers count workers."""

from __future__ import annotations

from shared.config.services import EngineKind, WorkerRole
from shared.types.workers import WorkerInfo


def worker_info(worker_id: str, pool: str = "p", model: str = "m", role: WorkerRole = WorkerRole.MIXED) -> WorkerInfo:
    """A sim worker's identity at an address nothing listens on (port 1)."""
    return WorkerInfo(
        worker_id=worker_id, address="127.0.0.1:1", role=role, pool=pool, model=model, engine=EngineKind.SIM
    )
