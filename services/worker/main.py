"""Worker entry point: settings -> telemetry -> app -> serve until SIGTERM."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from contextlib import suppress

from services.worker.app import WorkerApp
from services.worker.engines.factory import run_follower
from shared.config import EngineKind, SettingsError, WorkerSettings, load_settings
from shared.processes import ManagedProcess, run_service, spawn
from shared.telemetry import setup_telemetry
from shared.telemetry.logging import get_logger

log = get_logger("shoal.worker")


def rank_device(device: str, rank: int) -> str:
    """Rank r of a one-container instance computes on GPU r."""
    import torch

    if device in ("cuda", "auto") and torch.cuda.is_available():
        return f"cuda:{rank}"
    return device


def start_local_followers(settings: WorkerSettings) -> list[ManagedProcess]:
    """Ranks 1.. of this instance as children (they die with this process). A follower that fails breaks every
    collective of the instance, so this process exits too and its supervisor (Kubernetes) restarts the whole."""
    argv = [sys.executable, "-m", "services.worker"]
    followers = [
        spawn(
            f"rank{rank}",
            argv,
            {
                "SHOAL_WORKER_EP_LOCAL_FOLLOWERS": "false",
                "SHOAL_WORKER_EP_RANK": str(rank),
                "SHOAL_WORKER_DEVICE": rank_device(settings.device, rank),
            },
        )
        for rank in range(1, settings.ep_size)
    ]

    def watch(follower: ManagedProcess) -> None:
        code = follower.popen.wait()
        if code != 0:  # 0: the leader told it to stop
            log.error("a rank of this instance failed: exiting", rank=follower.name, code=code)
            os._exit(1)

    for follower in followers:
        threading.Thread(target=watch, args=(follower,), daemon=True, name=f"watch-{follower.name}").start()
    return followers


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
    followers = start_local_followers(settings) if settings.ep_local_followers else []
    run_service(WorkerApp(settings).run())
    for follower in followers:  # stopping the engine told them to stop
        with suppress(subprocess.TimeoutExpired):
            follower.popen.wait(timeout=30)


if __name__ == "__main__":
    main()
