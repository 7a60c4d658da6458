"""Each service signs in to Redis as its own user and reaches only its own keys (shared/state/acl.py).

Every other suite runs its services as these users too (tests/support/services.py), so a rule that is too
narrow fails there; this suite tries the doors that must stay shut.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

from shared.config import WorkerSettings, load_settings
from shared.config.base import without_credentials
from shared.state import acl, schema
from shared.state.redis import connect
from shared.state.registry import WorkerRegistry
from shared.state.versioned import DocumentStore
from shared.types.workers import WorkerLoad
from tests.support.redis import service_password, service_url
from tests.support.workers import worker_info

pytestmark = pytest.mark.integration


@pytest.fixture
async def users(redis_url: str) -> AsyncIterator[dict[str, Redis]]:
    clients = {name: connect(service_url(redis_url, name)) for name in acl.USER_NAMES}
    yield clients
    for client in clients.values():
        await client.aclose()


async def test_a_worker_registers_as_itself_and_a_router_sees_it(users: dict[str, Redis]) -> None:
    await WorkerRegistry(users["worker"]).heartbeat(worker_info("w1"), WorkerLoad(), lease_ttl_s=30)
    listed = await WorkerRegistry(users["router"]).list_workers()
    assert [record.info.worker_id for record in listed] == ["w1"]
    # Neither the router nor the kvstore can put a worker of its own into the directory.
    for name in ("router", "kvstore"):
        with pytest.raises(NoPermissionError):
            await WorkerRegistry(users[name]).heartbeat(worker_info(f"fake-{name}"), WorkerLoad(), lease_ttl_s=30)
    assert [record.info.worker_id for record in await WorkerRegistry(users["controller"]).list_workers()] == ["w1"]


def _write(key: str) -> Callable[[Redis], Coroutine[Any, Any, Any]]:
    return lambda client: client.set(key, "x")


def _read(key: str) -> Callable[[Redis], Coroutine[Any, Any, Any]]:
    return lambda client: client.get(key)


# (user, what it tries, the door): each must be refused with NOPERM.
REFUSED = [
    ("worker", _write(schema.doc("model:mixtral")), "rewrite the model catalog"),
    ("worker", _write(schema.doc(schema.API_KEY_DOC + "k1")), "mint an API key"),
    ("worker", _read(schema.doc(schema.API_KEY_DOC + "k1")), "read API key digests"),
    ("worker", _read(schema.session("s1")), "read where sessions run"),
    ("worker", _write(schema.job("j1")), "forge a job"),
    ("kvstore", _write(schema.WORKERS), "touch the worker directory"),
    ("kvstore", _read(schema.doc("pool:p")), "read desired state"),
    ("router", _write(schema.doc(schema.API_KEY_DOC + "k1")), "mint an API key"),
    ("router", _write(schema.CORDONED), "cordon a worker"),
    ("router", _write(schema.AUDIT), "write the audit log"),
    ("router", _write(schema.kv_snapshot("w1")), "forge a KV snapshot"),
    ("router", _write(schema.CLUSTER), "fake the cluster mark"),
]


@pytest.mark.parametrize(("user", "attempt", "door"), REFUSED, ids=[f"{u}: {d}" for u, _, d in REFUSED])
async def test_a_service_user_cannot_reach_another_services_keys(
    users: dict[str, Redis], user: str, attempt: Callable[[Redis], Coroutine[Any, Any, Any]], door: str
) -> None:
    with pytest.raises(NoPermissionError):
        await attempt(users[user])


async def test_no_service_user_may_wipe_reconfigure_or_list_redis(users: dict[str, Redis], redis: Redis) -> None:
    await DocumentStore(redis).put("pool:p", {"replicas": 1})
    for name, client in users.items():
        for command in (("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "SET", "appendonly", "no"), ("KEYS", "*")):
            with pytest.raises(NoPermissionError):
                await client.execute_command(*command)
        with pytest.raises(NoPermissionError):
            await client.execute_command("ACL", "SETUSER", name, "allkeys")
    # What the operator's default user wrote is still there.
    assert await DocumentStore(users["controller"]).get("pool:p") is not None


async def test_a_wrong_service_password_is_refused(redis_url: str) -> None:
    password = service_password(redis_url, "worker")
    assert password
    wrong = connect(service_url(redis_url, "worker").replace(password, "0" * len(password)))
    with pytest.raises((AuthenticationError, ResponseError)):
        await wrong.ping()
    await wrong.aclose()
    # The user name comes from SHOAL_REDIS_USERNAME and its password from SHOAL_REDIS_PASSWORD.
    bare = without_credentials(redis_url)
    settings = load_settings(WorkerSettings, redis_url=bare, redis_username="worker", redis_password=password)
    signed_in = connect(settings.redis_url)
    assert await signed_in.execute_command("ACL", "WHOAMI") in (b"worker", "worker")
    await signed_in.aclose()
