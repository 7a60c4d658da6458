"""The process owner behind the local actuator (runs inside the controller).

Every half second it makes each pool's worker processes match the pool's
launch document: workers named in `remove` are stopped (SIGTERM: they
finish what they run, deregister and exit); extra workers beyond the target
are stopped, those still starting first (a cancelled scale-up); missing ones
are started, which also replaces a worker that crashed, up to the host's
`max_workers` processes in all. It publishes each
pool's instances (starting until the worker is in the registry) and the
measured cold start (launch to registration). Workers die with the
controller (see shared/processes.py).

A pool whose workers have SHOAL_WORKER_EP_SIZE > 1 (worker_env EP_SIZE) gets
expert-parallel instances: each is rank 0 (the worker the cluster sees) plus
EP_SIZE - 1 follower processes meeting it on a fresh local port. An instance
is one replica; it counts as EP_SIZE processes against the host's limit, and
when any of its ranks exits the whole instance is stopped (its collectives
could never complete) and replaced.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from services.controller.actuators.local import launch_doc, status_doc
from shared.processes import ManagedProcess, free_port, spawn
from shared.state.registry import WorkerRegistry
from shared.state.versioned import DocumentStore
from shared.telemetry.logging import get_logger

log = get_logger("shoal.controller.launcher")

STOP_GRACE_S = 60.0


@dataclass
class _Launched:
    worker_id: str
    process: ManagedProcess  # rank 0: the worker the cluster sees
    started_at: float
    followers: list[ManagedProcess] = field(default_factory=list)  # ranks 1.. of an expert-parallel instance
    registered_at: float | None = None
    stopping: bool = False

    @property
    def ranks(self) -> list[ManagedProcess]:
        return [self.process, *self.followers]

    def alive(self) -> bool:
        return any(p.alive() for p in self.ranks)

    def broken(self) -> bool:
        return not all(p.alive() for p in self.ranks)

    def terminate(self) -> None:
        # Rank 0 first: as it stops it tells the followers to stop too.
        for process in self.ranks:
            process.terminate(STOP_GRACE_S)


@dataclass
class _Pool:
    workers: dict[str, _Launched] = field(default_factory=dict)


class LocalLauncher:
    def __init__(self, redis: Redis, base_env: dict[str, str] | None = None, max_workers: int = 8) -> None:
        self.docs = DocumentStore(redis)
        self.max_workers = max_workers
        self.registry = WorkerRegistry(redis)
        self.base_env = base_env or {}
        self._pools: dict[str, _Pool] = {}
        self.cold_starts: dict[str, float] = {}
        self._stopping: set[asyncio.Task[None]] = set()
        self._threads = 1

    @property
    def processes(self) -> int:
        """Worker processes alive now (every rank of an instance), stopping ones included."""
        return sum(len(w.ranks) for p in self._pools.values() for w in p.workers.values())

    async def tick(self) -> None:
        registered = {r.worker_id for r in await self.registry.list_workers()}
        docs = {name.removeprefix("launch:"): await self.docs.get(name) for name in await self.docs.names("launch:")}
        # Workers on this host share its cores: two math thread teams on one core slow each other badly.
        total = sum(int(doc.body.get("target", 0)) for doc in docs.values() if doc is not None)
        self._threads = max(1, (os.cpu_count() or 1) // max(1, total))
        for pool, doc in docs.items():
            if doc is not None:
                await self._reconcile(pool, doc.body, registered)

    async def _reconcile(self, pool: str, doc: dict[str, Any], registered: set[str]) -> None:
        state = self._pools.setdefault(pool, _Pool())
        now = time.time()
        for launched in list(state.workers.values()):
            if not launched.alive():
                if not launched.stopping:
                    log.warning(
                        "worker exited", pool=pool, worker_id=launched.worker_id, code=launched.process.popen.returncode
                    )
                del state.workers[launched.worker_id]
            elif launched.broken() and not launched.stopping:
                log.warning(
                    "a rank of an expert-parallel worker exited: stopping the rest", worker_id=launched.worker_id
                )
                self._stop(launched)
            elif launched.registered_at is None and launched.worker_id in registered:
                launched.registered_at = now
                cold = now - launched.started_at
                previous = self.cold_starts.get(pool)
                self.cold_starts[pool] = cold if previous is None else 0.7 * previous + 0.3 * cold
        removals = set(doc.get("remove", []))
        for worker_id in removals & set(state.workers):
            self._stop(state.workers[worker_id])
        await self._prune_removals(pool, removals - set(state.workers))
        active = [w for w in state.workers.values() if not w.stopping]
        target = int(doc.get("target", 0))
        # Stop still-starting workers first (a scale-up no longer wanted), newest first.
        for extra in sorted(active, key=lambda w: (w.registered_at is not None, -w.started_at))[
            : max(0, len(active) - target)
        ]:
            self._stop(extra)
        wanted = target - len(active)
        # A host has room for so many processes, whatever the pools ask (a stopping one still holds memory).
        spec = doc.get("spec", {})
        ranks = int(spec.get("env", {}).get("SHOAL_WORKER_EP_SIZE", "1"))
        room = (self.max_workers - self.processes) // max(1, ranks)
        if wanted > room:
            log.warning("host full: pool waits for room", pool=pool, wanted=wanted, room=max(0, room))
        for _ in range(min(wanted, room)):
            self._start(pool, spec, state, ranks)
        await self.docs.put(
            status_doc(pool),
            {
                "instances": [
                    {
                        "worker_id": w.worker_id,
                        "state": "stopping" if w.stopping else ("running" if w.registered_at else "starting"),
                        "started_at": w.started_at,
                    }
                    for w in state.workers.values()
                ],
                "cold_start_s": self.cold_starts.get(pool),
            },
        )

    async def _prune_removals(self, pool: str, gone: set[str]) -> None:
        """Forget removal requests for workers that no longer exist."""
        if gone:
            await self.docs.update(
                launch_doc(pool),
                lambda body: {**body, "remove": [w for w in body.get("remove", []) if w not in gone]},
            )

    def _start(self, pool: str, spec: dict[str, Any], state: _Pool, ranks: int) -> None:
        worker_id = f"{pool}-{uuid.uuid4().hex[:6]}"
        env = {
            **self.base_env,
            **spec.get("env", {}),
            "SHOAL_WORKER_WORKER_ID": worker_id,
            "SHOAL_WORKER_GRPC_PORT": str(free_port()),
            "SHOAL_WORKER_COMPUTE_THREADS": str(self._threads),
        }
        if ranks > 1:
            env["SHOAL_WORKER_EP_MASTER"] = f"127.0.0.1:{free_port()}"
        argv = [sys.executable, "-m", "services.worker"]
        process = spawn(worker_id, argv, {**env, "SHOAL_WORKER_EP_RANK": "0"} if ranks > 1 else env)
        followers = [
            spawn(f"{worker_id}-rank{rank}", argv, {**env, "SHOAL_WORKER_EP_RANK": str(rank)})
            for rank in range(1, ranks)
        ]
        state.workers[worker_id] = _Launched(worker_id, process, time.time(), followers)
        log.info("worker started", pool=pool, worker_id=worker_id, pid=process.pid, ranks=ranks)

    def _stop(self, launched: _Launched) -> None:
        if launched.stopping:
            return
        launched.stopping = True
        log.info("stopping worker", worker_id=launched.worker_id)
        task = asyncio.create_task(asyncio.to_thread(launched.terminate))
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def shutdown(self) -> None:
        for pool in self._pools.values():
            for launched in pool.workers.values():
                self._stop(launched)
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)
