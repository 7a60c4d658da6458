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

Elastic expert parallelism: `add_rank` starts a process that waits to join a
running instance (SHOAL_WORKER_EP_JOIN); it becomes a member once the
instance's resize job reports it joined, and is stopped if the job ends
without it. A follower that exits cleanly while its rank 0 serves left in a
shrink: the instance goes on without it. A replacement instance starts with
the pool's EP_SIZE.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from services.controller.actuators.local import launch_doc, status_doc
from services.controller.jobs.store import JobStore
from shared.errors import FailedPrecondition, NotFound
from shared.processes import ManagedProcess, free_port, spawn
from shared.state.registry import WorkerRegistry
from shared.state.versioned import DocumentStore
from shared.telemetry.logging import get_logger

log = get_logger("shoal.controller.launcher")

STOP_GRACE_S = 60.0


@dataclass
class _Joiner:
    process: ManagedProcess
    job_id: str | None = None  # the resize job that regroups the instance with it, once opened


@dataclass
class _Launched:
    worker_id: str
    process: ManagedProcess  # rank 0: the worker the cluster sees
    started_at: float
    env: dict[str, str]
    followers: list[ManagedProcess] = field(default_factory=list)  # ranks 1.. of an expert-parallel instance
    joiner: _Joiner | None = None  # a process waiting to join as the next rank
    registered_at: float | None = None
    stopping: bool = False

    @property
    def ranks(self) -> list[ManagedProcess]:
        return [self.process, *self.followers]

    @property
    def processes(self) -> list[ManagedProcess]:
        return [*self.ranks, *([self.joiner.process] if self.joiner else [])]

    def alive(self) -> bool:
        return any(p.alive() for p in self.ranks)

    def forget_departed(self) -> None:
        """A follower that exited cleanly beside a serving rank 0 left in a shrink: no longer a rank."""
        if self.process.alive():
            self.followers = [p for p in self.followers if p.alive() or p.popen.returncode != 0]

    def broken(self) -> bool:
        return not all(p.alive() for p in self.ranks)

    def terminate(self) -> None:
        # Rank 0 first: as it stops it tells the followers to stop too.
        for process in self.processes:
            process.terminate(STOP_GRACE_S)


@dataclass
class _Pool:
    workers: dict[str, _Launched] = field(default_factory=dict)


class LocalLauncher:
    def __init__(self, redis: Redis, base_env: dict[str, str] | None = None, max_workers: int = 8) -> None:
        self.docs = DocumentStore(redis)
        self.jobs = JobStore(redis)
        self.max_workers = max_workers
        self.registry = WorkerRegistry(redis)
        self.base_env = base_env or {}
        self._pools: dict[str, _Pool] = {}
        self.cold_starts: dict[str, float] = {}
        self._stopping: set[asyncio.Task[object]] = set()
        self._threads = 1

    @property
    def processes(self) -> int:
        """Worker processes alive now (every rank of an instance), stopping ones included."""
        return sum(len(w.processes) for p in self._pools.values() for w in p.workers.values())

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
            await self._settle_joiner(launched)
            launched.forget_departed()
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
        state.workers[worker_id] = _Launched(worker_id, process, time.time(), env, followers)
        log.info("worker started", pool=pool, worker_id=worker_id, pid=process.pid, ranks=ranks)

    def _instance(self, worker_id: str) -> _Launched | None:
        return next((w for p in self._pools.values() for w in p.workers.values() if w.worker_id == worker_id), None)

    def add_rank(self, worker_id: str) -> str:
        """Start a process that waits to join the instance as its next rank; returns where it waits.

        `bind_joiner` then names the resize job that takes it in; `drop_joiner` stops it if none will."""
        launched = self._instance(worker_id)
        if launched is None or launched.stopping:
            raise NotFound(
                f"worker {worker_id} was not started by this controller's local launcher: "
                "start the joining rank yourself and give its rendezvous address (master)"
            )
        if launched.joiner is not None:
            raise FailedPrecondition(f"a rank is already joining worker {worker_id}")
        rank = len(launched.ranks)
        master = f"127.0.0.1:{free_port()}"
        env = {
            **launched.env,
            "SHOAL_WORKER_EP_SIZE": str(rank + 1),
            "SHOAL_WORKER_EP_RANK": str(rank),
            "SHOAL_WORKER_EP_MASTER": master,
            "SHOAL_WORKER_EP_JOIN": "1",
        }
        process = spawn(f"{worker_id}-rank{rank}", [sys.executable, "-m", "services.worker"], env)
        launched.joiner = _Joiner(process)
        log.info("rank joining", worker_id=worker_id, rank=rank, master=master)
        return master

    def bind_joiner(self, worker_id: str, job_id: str) -> None:
        launched = self._instance(worker_id)
        if launched is not None and launched.joiner is not None:
            launched.joiner.job_id = job_id

    def drop_joiner(self, worker_id: str) -> None:
        launched = self._instance(worker_id)
        if launched is not None and launched.joiner is not None:
            self._in_background(launched.joiner.process.terminate)
            launched.joiner = None

    async def _settle_joiner(self, launched: _Launched) -> None:
        """A joining process becomes a rank once its job says it joined; it stops if the job ends without it."""
        joiner = launched.joiner
        if joiner is None or joiner.job_id is None:
            return
        job = await self.jobs.find(joiner.job_id)
        if job is not None and job.phase not in ("", "join"):
            launched.followers.append(joiner.process)
            launched.joiner = None
        elif job is None or job.state.final or not joiner.process.alive():
            log.warning("the joining rank was not taken in: stopping it", worker_id=launched.worker_id)
            self.drop_joiner(launched.worker_id)

    def _stop(self, launched: _Launched) -> None:
        if launched.stopping:
            return
        launched.stopping = True
        log.info("stopping worker", worker_id=launched.worker_id)
        self._in_background(launched.terminate)

    def _in_background(self, stop: Callable[[], object]) -> None:
        """Run a (blocking) stop in a thread; shutdown waits for it."""
        task = asyncio.create_task(asyncio.to_thread(stop))
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def shutdown(self) -> None:
        for pool in self._pools.values():
            for launched in pool.workers.values():
                self._stop(launched)
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)
