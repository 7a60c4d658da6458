"""OpenAI API keys in Redis, and the token buckets that limit them across routers.

Keys are versioned documents (shared/state/versioned.py: `apikey:{id}`, the
secret's digest, never the secret), so the controller writes them back with
the rest of the desired state if Redis loses it; their own counter moves on
every change so that routers read the keys again only then. Limits are
token buckets in Redis, refilled and taken from by one Lua script, so every
router draws from the same bucket; a router takes a small lease at a time
(`lease`) and spends it locally, so a busy key costs Redis a few calls per
second, not one per request.
"""

from __future__ import annotations

import secrets
import time

from redis.asyncio import Redis

from shared.errors import NotFound
from shared.state import schema
from shared.state.versioned import DocumentStore
from shared.types.apikeys import SECRET_PREFIX, SHOWN_CHARS, APIKeyCreate, APIKeyCreated, APIKeyRecord, digest

# Refill the bucket for the time since it was last touched, subtract what the caller spent beyond its
# leases (debt), then grant up to `want` whole tokens. Returns the grant and, when nothing is granted,
# the seconds until one token is there. Redis's own clock, so routers' clocks need not agree.
_LEASE = """
local rate, burst, want, debt = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate) - debt
local granted = 0
if tokens >= 1 then
  granted = math.floor(math.min(want, tokens))
  tokens = tokens - granted
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
local wait = 0
if granted == 0 then wait = (1 - tokens) / rate end
return {tostring(granted), tostring(wait)}
"""


class APIKeyStore:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.docs = DocumentStore(redis)
        self._lease = redis.register_script(_LEASE)

    async def create(self, spec: APIKeyCreate) -> APIKeyCreated:
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        record = APIKeyRecord(
            **spec.model_dump(),
            id=f"key-{secrets.token_hex(6)}",
            shown=secret[:SHOWN_CHARS],
            created_at=time.time(),
            digest=digest(secret),
        )
        await self.docs.put(schema.API_KEY_DOC + record.id, record.model_dump(mode="json"), expected_version=0)
        return APIKeyCreated(**record.public().model_dump(), key=secret)

    async def all(self) -> list[APIKeyRecord]:
        documents = await self.docs.snapshot((schema.API_KEY_DOC,))
        return sorted((APIKeyRecord.model_validate(d.body) for d in documents.values()), key=lambda r: r.created_at)

    async def get(self, key_id: str) -> APIKeyRecord:
        document = await self.docs.get(schema.API_KEY_DOC + key_id)
        if document is None:
            raise NotFound(f"no API key {key_id!r}", param="key_id")
        return APIKeyRecord.model_validate(document.body)

    async def revoke(self, key_id: str) -> APIKeyRecord:
        """Mark a key revoked (kept, so that its usage stays attributable); routers refuse it within a
        second or two."""
        record = await self.get(key_id)
        if record.revoked_at is None:
            now = time.time()
            updated = await self.docs.update(
                schema.API_KEY_DOC + key_id, lambda body: {**body, "revoked_at": body.get("revoked_at") or now}
            )
            record = APIKeyRecord.model_validate(updated.body)
        return record

    async def changes(self) -> int:
        return int(await self.redis.get(schema.API_KEY_CHANGES) or 0)

    async def lease(self, bucket: str, rate_per_s: float, burst: float, want: int, debt: float) -> tuple[int, float]:
        """Take up to `want` tokens from a shared bucket after paying `debt`: (granted, seconds until one
        token is there when none was granted)."""
        granted, wait = await self._lease(keys=[bucket], args=[rate_per_s, burst, want, debt])
        return int(granted), float(wait)
