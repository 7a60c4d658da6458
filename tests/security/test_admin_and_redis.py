"""The admin API's audit log and body limit, and Redis refusing clients without the password."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, ResponseError

from services.controller.api.audit import MAX_BODY_BYTES
from shared.config import ControllerSettings, load_settings
from tests.support.services import ADMIN, VIEWER, running_controller

pytestmark = pytest.mark.integration


async def test_redis_refuses_a_client_without_the_password(redis_url: str) -> None:
    parts = urlsplit(redis_url)
    anonymous = Redis.from_url(urlunsplit(parts._replace(netloc=f"{parts.hostname}:{parts.port}")))
    with pytest.raises((AuthenticationError, ResponseError), match=r"(?i)auth"):
        await anonymous.get("anything")
    await anonymous.aclose()
    wrong = Redis.from_url(urlunsplit(parts._replace(netloc=f":wrong@{parts.hostname}:{parts.port}")))
    with pytest.raises((AuthenticationError, ResponseError)):
        await wrong.ping()
    await wrong.aclose()


def test_the_password_setting_reaches_every_client_and_celery(redis_url: str) -> None:
    parts = urlsplit(redis_url)
    password = parts.password or ""
    bare = urlunsplit(parts._replace(netloc=f"{parts.hostname}:{parts.port}"))
    settings = load_settings(
        ControllerSettings, redis_url=bare, redis_password=password, admin_tokens=["a" * 20 + ":admin"]
    )
    assert password and urlsplit(settings.redis_url).password == password
    assert urlsplit(settings.celery_url).password == password
    assert password not in str(settings.redacted())


@pytest.fixture
async def admin(redis_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with running_controller(redis_url) as controller, httpx.AsyncClient(base_url=controller.url) as http:
        yield http


async def test_every_admin_write_is_audited_who_what_when_result(admin: httpx.AsyncClient) -> None:
    as_admin = {"authorization": f"Bearer {ADMIN}"}
    created = await admin.post("/v1/keys", json={"name": "audited"}, headers=as_admin)
    assert created.status_code == 201
    refused = await admin.post("/v1/keys", json={"name": "nope"}, headers={"authorization": f"Bearer {VIEWER}"})
    assert refused.status_code == 403
    anonymous = await admin.delete("/v1/aliases/chat")
    assert anonymous.status_code == 401
    await admin.get("/v1/keys", headers=as_admin)  # a read: not audited

    entries = (await admin.get("/v1/audit", headers=as_admin)).json()
    assert [(e["method"], e["path"], e["status"]) for e in entries] == [
        ("DELETE", "/v1/aliases/chat", 401),
        ("POST", "/v1/keys", 403),
        ("POST", "/v1/keys", 201),
    ]
    assert entries[0]["who"] == "unauthenticated"
    assert entries[1]["who"].startswith("viewer#") and entries[2]["who"].startswith("admin#")
    assert ADMIN not in entries[2]["who"] and '"audited"' in entries[2]["body"]
    assert entries[0]["at"] >= entries[1]["at"] >= entries[2]["at"] > 0
    assert (await admin.get("/v1/audit", headers={"authorization": f"Bearer {VIEWER}"})).status_code == 403


async def test_a_body_past_the_limit_gets_413_however_it_is_framed(admin: httpx.AsyncClient) -> None:
    as_admin = {"authorization": f"Bearer {ADMIN}", "content-type": "application/json"}
    big = b'{"name": "' + b"x" * MAX_BODY_BYTES + b'"}'
    sized = await admin.post("/v1/keys", content=big, headers=as_admin)
    assert sized.status_code == 413 and sized.json()["error"]["type"] == "invalid_request_error"

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(big), 65536):
            yield big[start : start + 65536]
            await asyncio.sleep(0)

    chunked = await admin.post("/v1/keys", content=chunks(), headers=as_admin)
    assert chunked.status_code == 413
    entries = (await admin.get("/v1/audit", headers=as_admin)).json()
    assert [(e["path"], e["status"]) for e in entries[:2]] == [("/v1/keys", 413), ("/v1/keys", 413)]
    assert (await admin.get("/v1/keys", headers=as_admin)).json() == []
