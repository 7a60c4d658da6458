"""Worker entry point: settings -> telemetry -> app -> serve until SIGTERM."""

from __future__ import annotations

import asyncio
import sys

from services.worker.app import WorkerApp
from services.worker.engines.factory import run_follower
from shared.config import EngineKind, SettingsError, WorkerSettings, load_settings
from shared.telemetry import setup_telemetry


def main() -> None:
    try:
        settings = load_settings(WorkerSettings)
    except SettingsError as exc:
        sys.exit(str(exc))
    if settings.engine is EngineKind.REFERENCE:
        import torch

        # The engine thread owns the intra-op threads; this (asyncio) thread must
        # never start a second OpenMP team (see reference/executor.py).
        torch.set_num_threads(1)
    # The asyncio thread and the engine thread hand requests back and forth
    # every step; with Python's default 5 ms GIL switch interval a hand-off
    # can wait that long when the engine runs Python (the sim engine does).
    sys.setswitchinterval(0.0005)
    setup_telemetry("worker", settings)
    if settings.ep_rank > 0:
        run_follower(settings)  # rank 0 is the worker the cluster sees; this one computes beside it
        return
    asyncio.run(WorkerApp(settings).run())


if __name__ == "__main__":
    main()
