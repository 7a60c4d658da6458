"""The admin API's edge: a request body limit, and an audit log of every write.

`AdminEdge` is ASGI middleware around the whole admin app. It reads a
request's body up to MAX_BODY_BYTES (413 with an OpenAI-style error body
past it, however the body is framed), and after every write (POST, PUT,
PATCH, DELETE) appends to the audit stream in Redis: who (the token's role
and a fingerprint of it, set by the routes' auth check), what (method, path
and the body, cut at AUDIT_BODY_BYTES), when, and the result (status). The
log is read through `GET /v1/audit` and `shoal audit`; it keeps the last
AUDIT_MAXLEN entries (shared/state/schema.py).
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import orjson
from pydantic import BaseModel
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.httpapi import error_body
from shared.state import schema
from shared.telemetry.logging import get_logger

log = get_logger("shoal.controller.audit")

MAX_BODY_BYTES = 1 * 2**20
AUDIT_BODY_BYTES = 2048
WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
UNAUTHENTICATED = "unauthenticated"


def caller(role: str, token: str) -> str:
    """How the audit log names a token's holder: its role and a fingerprint that does not reveal it."""
    return f"{role}#{hashlib.sha256(token.encode()).hexdigest()[:12]}"


class AuditEntry(BaseModel):
    id: str
    at: float
    who: str
    method: str
    path: str
    status: int
    body: str


class AuditLog:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    async def record(self, who: str, method: str, path: str, status: int, body: bytes) -> None:
        fields = {
            "at": f"{time.time():.3f}",
            "who": who,
            "method": method,
            "path": path,
            "status": str(status),
            "body": body[:AUDIT_BODY_BYTES].decode("utf-8", "replace"),
        }
        await self.redis.xadd(schema.AUDIT, fields, maxlen=schema.AUDIT_MAXLEN, approximate=True)

    async def recent(self, limit: int) -> list[AuditEntry]:
        """The newest `limit` entries, newest first."""
        entries = await self.redis.xrevrange(schema.AUDIT, count=limit)
        out = []
        for entry_id, raw in entries:
            fields = {k.decode(): v.decode() for k, v in raw.items()}
            out.append(
                AuditEntry(
                    id=entry_id.decode(),
                    at=float(fields["at"]),
                    who=fields["who"],
                    method=fields["method"],
                    path=fields["path"],
                    status=int(fields["status"]),
                    body=fields["body"],
                )
            )
        return out


class AdminEdge:
    def __init__(self, app: ASGIApp, audit: AuditLog) -> None:
        self.app = app
        self.audit = audit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        if body is None:
            if scope["method"] in WRITES:
                await self._record(scope, 413, b"")
            await _too_large(send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the disconnect, when it comes
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        write = scope["method"] in WRITES
        recorded = False

        async def watch(message: Message) -> None:
            # A write is recorded before its caller sees the answer, so what a caller did is in the log by the
            # time it can ask for the log.
            nonlocal recorded
            if write and message["type"] == "http.response.start":
                recorded = True
                await self._record(scope, int(message["status"]), body)
            await send(message)

        try:
            await self.app(scope, replay, watch)
        finally:
            if write and not recorded:  # it failed before answering
                await self._record(scope, 500, body)

    async def _record(self, scope: Scope, status: int, body: bytes) -> None:
        who = str(scope.get("state", {}).get("who", UNAUTHENTICATED))
        try:
            await self.audit.record(who, scope["method"], scope["path"], status, body)
        except (RedisError, OSError) as exc:
            log.error(
                "admin write not audited: redis unreachable",
                method=scope["method"],
                path=scope["path"],
                who=who,
                status=status,
                error=str(exc),
            )


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None past MAX_BODY_BYTES."""
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        parts.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(parts)


async def _too_large(send: Send) -> None:
    payload: dict[str, Any] = error_body(f"request body larger than {MAX_BODY_BYTES} bytes", "invalid_request_error")
    content = orjson.dumps(payload)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": content})
