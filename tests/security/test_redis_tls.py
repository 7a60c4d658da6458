"""Redis over TLS (rediss://) with a locally made CA: the services' clients and Celery connect, and a
client that speaks plaintext or does not trust the CA is refused."""

from __future__ import annotations

import io
import secrets
from collections.abc import Iterator
from urllib.parse import quote

import httpx
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from services.controller.jobs.celery_app import configure
from shared.config import ControllerSettings, load_settings
from shared.processes import free_port, redis_server_argv, spawn, wait_for_port
from shared.rpc.pki import Authority
from shared.rpc.security import CA_FILE, CERT_FILE, KEY_FILE
from shared.state.redis import connect
from tests.support.services import ADMIN, running_controller

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A redis-server answering only TLS, with a password, its certificate (for 127.0.0.1) from a CA made
    here: (rediss URL without the password, password)."""
    folder = tmp_path_factory.mktemp("redis-tls") / "redis"
    Authority.new(days=1).issue(folder, ["localhost"], days=1, addresses=["127.0.0.1"])
    ca, cert, key = (str(folder / name) for name in (CA_FILE, CERT_FILE, KEY_FILE))
    port, password = free_port(), secrets.token_hex(16)
    argv = redis_server_argv(0, str(folder), password=password)
    argv += ["--tls-port", str(port), "--tls-cert-file", cert, "--tls-key-file", key]
    argv += ["--tls-ca-cert-file", ca, "--tls-auth-clients", "no"]
    process = spawn("redis-tls", argv, out=io.StringIO())
    try:
        wait_for_port("127.0.0.1", port, timeout_s=10, process=process)
        query = f"ssl_cert_reqs=required&ssl_ca_certs={quote(ca)}"
        yield f"rediss://127.0.0.1:{port}/0?{query}", password
    finally:
        process.terminate(grace_s=5)


def settings(url: str, password: str) -> ControllerSettings:
    return load_settings(ControllerSettings, redis_url=url, redis_password=password, admin_tokens=[f"{ADMIN}:admin"])


async def test_the_services_clients_and_celery_connect_over_tls(tls_redis: tuple[str, str]) -> None:
    url, password = tls_redis
    config = settings(url, password)
    client = connect(config.redis_url)
    assert await client.ping()
    await client.aclose()
    app = configure(config)
    with app.connection_for_write() as broker:
        broker.ensure_connection(max_retries=1)
    assert app.backend.client.ping()  # the result backend, on the next database of the same server


async def test_the_controller_runs_on_a_tls_redis(tls_redis: tuple[str, str]) -> None:
    url, password = tls_redis
    async with (
        running_controller(url, redis_password=password) as front,
        httpx.AsyncClient(base_url=front.url, headers=front.headers()) as http,
    ):
        assert (await http.post("/v1/keys", json={"name": "over-tls"})).status_code == 201
        assert [k["name"] for k in (await http.get("/v1/keys")).json()] == ["over-tls"]


async def test_plaintext_and_untrusting_clients_are_refused(tls_redis: tuple[str, str]) -> None:
    url, password = tls_redis
    port = url.split(":")[2].split("/")[0]
    plaintext = Redis.from_url(f"redis://:{password}@127.0.0.1:{port}/0", socket_timeout=5)
    with pytest.raises(RedisConnectionError):
        await plaintext.ping()
    await plaintext.aclose()
    untrusting = Redis.from_url(f"rediss://:{password}@127.0.0.1:{port}/0?ssl_cert_reqs=required", socket_timeout=5)
    with pytest.raises(RedisConnectionError, match=r"(?i)certificate"):
        await untrusting.ping()
    await untrusting.aclose()
