"""Which worker each agent session last ran on, shared by every router.

Each router keeps the sessions it has seen in memory (an LRU of `capacity`
entries) and writes each new placement to Redis (`session:{id}`, expiring
after SESSION_TTL_S) in the background, batched, one pipeline per flush. A
router that meets a session it has not seen reads Redis once before routing
it, so a session keeps its worker when its requests land on different router
processes or replicas. Redis being down only costs that sharing: routing
goes on with what each router knows.
"""

from __future__ import annotations

from collections import OrderedDict

from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.state import schema
from shared.telemetry.logging import get_logger

log = get_logger("shoal.state.sessions")


class SessionMap:
    def __init__(self, redis: Redis, capacity: int = 100_000, ttl_s: int = schema.SESSION_TTL_S) -> None:
        self.redis = redis
        self.capacity = capacity
        self.ttl_s = ttl_s
        self._known: OrderedDict[str, str] = OrderedDict()
        self._unsaved: dict[str, str] = {}

    async def worker(self, session_id: str) -> str:
        """The worker the session last ran on ("" when unknown); reads Redis only for unseen sessions."""
        known = self._known.get(session_id)
        if known is not None:
            return known
        try:
            stored = await self.redis.get(schema.session(session_id))
        except (RedisError, OSError) as exc:
            log.warning("session map unreachable; routing without it", error=str(exc))
            return ""
        worker = stored.decode() if isinstance(stored, bytes) else str(stored or "")
        if worker:
            self._keep(session_id, worker)
        return worker

    def remember(self, session_id: str, worker_id: str) -> None:
        """Record where the session runs now (no I/O: `flush` writes it)."""
        if self._known.get(session_id) != worker_id:
            self._unsaved[session_id] = worker_id
        self._keep(session_id, worker_id)

    def _keep(self, session_id: str, worker_id: str) -> None:
        self._known[session_id] = worker_id
        self._known.move_to_end(session_id)
        while len(self._known) > self.capacity:
            self._known.popitem(last=False)

    async def flush(self) -> None:
        unsaved, self._unsaved = self._unsaved, {}
        if not unsaved:
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for session_id, worker_id in unsaved.items():
                    pipe.set(schema.session(session_id), worker_id, ex=self.ttl_s)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("session placements not shared", sessions=len(unsaved), error=str(exc))
