"""The router's API keys: managed keys from the admin API, their limits, and the settings' static keys.

Keys live in Redis (shared/state/apikeys.py) as digests; the router keeps
them all in memory and reads them again when their change counter moves
(checked every KEYS_INTERVAL_S, and when an unknown key is presented: a
read that starts after the request arrived, at most one every
UNKNOWN_KEY_RECHECK_S, so a new key works at once and a revoked one stops
within KEYS_INTERVAL_S). Limits are two token buckets per key in
Redis shared by every router: requests (refilled at requests_per_s, one
second's burst) and tokens (tokens_per_min, one minute's burst). A router
leases a few tokens at a time (a tenth of a second of the key's rate) and
spends them locally; tokens are charged when a request ends, so a request
is admitted while the key's token balance is positive and its cost, taken
after, may leave the balance owing: the next lease pays that debt first.

Static keys (SHOAL_ROUTER_API_KEYS) have no limits: they are for internal
callers such as the controller's agent graphs. In development mode
(SHOAL_ENV=dev) a request with no key or an unknown one is admitted (the
OpenAI clients always send one); a managed key still has its limits.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from redis.exceptions import RedisError

from shared.errors import Overloaded, Unavailable
from shared.openai.access import OPEN, Grant, StaticKeys, presented_key, refuse
from shared.state import schema
from shared.state.apikeys import APIKeyStore
from shared.state.redis import read_marked
from shared.telemetry.logging import get_logger
from shared.telemetry.loopmetrics import LoopMetrics
from shared.types.apikeys import SECRET_PREFIX, APIKeyRecord, digest

log = get_logger("shoal.router.keys")

KEYS_INTERVAL_S = 1.0
# An unknown key makes the router look for new keys, but reads start at most this often (one Redis GET), so a
# flood of wrong keys costs Redis little; an unknown key waits for the next read (at most this long).
UNKNOWN_KEY_RECHECK_S = 0.05
# A lease covers this much of a key's rate: the most one router holds unspent.
LEASE_S = 0.1


class RateLimited(Overloaded):
    """A key over its request rate or token quota (429 with Retry-After)."""


@dataclass
class _Bucket:
    """One router's share of a key's bucket in Redis."""

    name: str
    rate_per_s: float
    burst: float
    limit: str  # for the refusal: "10 requests per second"
    available: float = 0.0  # leased and not spent; negative: spent beyond the leases (owed)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def chunk(self) -> int:
        return max(1, int(self.rate_per_s * LEASE_S))


class _Key:
    def __init__(self, record: APIKeyRecord, metrics: KeyMetrics) -> None:
        self.record = record
        rps, tpm = record.requests_per_s, record.tokens_per_min
        self.requests = (
            _Bucket(schema.bucket(record.id, "requests"), rps, rps, f"{rps:g} requests per second") if rps else None
        )
        self.tokens = (
            _Bucket(schema.bucket(record.id, "tokens"), tpm / 60, tpm, f"{tpm} tokens per minute") if tpm else None
        )
        self._requests = metrics.requests.labels(record.id, record.name)
        self._tokens = metrics.tokens.labels(record.id, record.name)
        self.grant = Grant(record.id, self.charge)

    def charge(self, tokens: int) -> None:
        self._tokens.inc(tokens)
        if self.tokens is not None:
            self.tokens.available -= tokens

    def count(self) -> None:
        self._requests.inc()


class KeyMetrics:
    def __init__(self, metrics: LoopMetrics) -> None:
        self.requests = metrics.counter("shoal_router_key_requests", "Requests admitted per API key", ["key", "name"])
        self.tokens = metrics.counter(
            "shoal_router_key_tokens", "Prompt and completion tokens used per API key", ["key", "name"]
        )
        self.refused = metrics.counter(
            "shoal_router_key_refusals", "Requests refused per API key and reason (rate, quota)", ["key", "reason"]
        )


class KeyGate:
    """The router's Access (shared/openai/access.py)."""

    def __init__(self, store: APIKeyStore, static: Sequence[str], dev_mode: bool, metrics: KeyMetrics) -> None:
        self.store = store
        self.static = StaticKeys(static)
        self.dev_mode = dev_mode
        self.metrics = metrics
        self._keys: dict[str, _Key] = {}  # digest -> key
        self._seen_changes: int | None = None
        self._read_started = 0.0  # when the latest read of the keys began
        self._read_done = 0.0  # when the latest finished read began
        self._reload: asyncio.Task[None] | None = None

    async def refresh(self) -> None:
        """Read the keys again if they changed since the last read."""
        began = self._read_started = time.monotonic()
        try:
            changes = await self.store.changes()
            if changes == self._seen_changes:
                return
            records, whole = await read_marked(self.store.redis, self.store.all)
            # Without the mark a key that went missing may be a restore not yet finished, not a deletion.
            lost = not whole and not {k.record.id for k in self._keys.values()} <= {r.id for r in records}
        except (RedisError, OSError) as exc:
            # Keep the keys we know: Redis down must not lock every client out.
            log.warning("API keys not refreshed: redis unreachable", error=str(exc))
            return
        finally:
            self._read_done = max(self._read_done, began)
        if lost:
            log.warning("API keys lost from Redis; keeping those known until they are restored")
            self._seen_changes = None  # the counter starts again from zero: read in full next time
            return
        by_id = {key.record.id: key for key in self._keys.values()}
        keys: dict[str, _Key] = {}
        for record in records:
            if record.revoked_at is not None:
                continue
            known = by_id.get(record.id)
            # An unchanged key keeps its local leases.
            keys[record.digest] = known if known is not None and known.record == record else _Key(record, self.metrics)
        self._keys = keys
        self._seen_changes = changes

    async def _find(self, secret: str) -> _Key | None:
        key = self._keys.get(digest(secret))
        if key is not None or not secret.startswith(SECRET_PREFIX):
            return key
        # Perhaps made a moment ago: look again with a read that started after this request arrived (a key
        # made just after the last read is found), sharing reads with every waiter, one per RECHECK at most.
        asked = time.monotonic()
        while self._read_done < asked:
            if self._reload is None or self._reload.done():
                wait = self._read_started + UNKNOWN_KEY_RECHECK_S - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                    continue
                self._reload = asyncio.get_running_loop().create_task(self.refresh())
            await asyncio.shield(self._reload)
        return self._keys.get(digest(secret))

    async def admit(self, authorization: str | None, request: bool = True) -> Grant:
        secret = presented_key(authorization)
        key = await self._find(secret) if secret else None
        if key is None:
            if self.dev_mode or self.static.matches(secret):
                return OPEN
            raise refuse()
        if request:
            await self._take(key)
            key.count()
        return key.grant

    async def _take(self, key: _Key) -> None:
        try:
            if key.requests is not None:
                await self._draw(key, key.requests, spend=1)
            if key.tokens is not None:
                await self._draw(key, key.tokens, spend=0)
        except (RedisError, OSError) as exc:
            # The limits cannot be checked: refuse rather than let a key past its limits.
            raise Unavailable(f"rate limits cannot be checked: {exc}") from None

    async def _draw(self, key: _Key, bucket: _Bucket, spend: int) -> None:
        """Spend `spend` from the local share, leasing more first if it is short (spend 0: the balance must
        be positive, what the request costs is charged when it ends)."""
        need = max(spend, 1e-9)
        if bucket.available < need:
            async with bucket.lock:
                if bucket.available < need:
                    debt = max(0.0, -bucket.available)
                    granted, wait_s = await self.store.lease(
                        bucket.name, bucket.rate_per_s, bucket.burst, bucket.chunk, debt
                    )
                    bucket.available = max(bucket.available, 0.0) + granted
                    if bucket.available < need:
                        reason = "rate" if bucket is key.requests else "quota"
                        self.metrics.refused.labels(key.record.id, reason).inc()
                        raise RateLimited(
                            f"API key {key.record.name!r} is over its limit of {bucket.limit}; "
                            f"retry in {math.ceil(wait_s)} s",
                            retry_after_s=wait_s,
                        )
        bucket.available -= spend
