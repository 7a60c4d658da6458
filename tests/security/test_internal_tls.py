"""Internal channels are mutual TLS with one identity per service: each door tried, each refusal checked.

gRPC and the data channels both: no certificate, a certificate from another
authority, a service that may not call this one, a server that is not the
service the client meant to reach, and a service started with another's
certificate or with none.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.config import KVStoreSettings, WorkerRole, load_settings
from shared.errors import FailedPrecondition, PermissionDenied, Unavailable
from shared.rpc.channel import connect
from shared.rpc.kvchannel import KVChannelClient
from shared.rpc.kvstore_client import KVStoreClient
from shared.rpc.pki import init_pki
from shared.rpc.security import Role, RpcSecurity, TLSFiles
from shared.rpc.serve_client import CHANNEL as SERVE_CHANNEL
from shared.rpc.worker_client import WorkerClient
from tests.support.blocks import blocks
from tests.support.pki import as_worker, security, tls_dir
from tests.support.services import running_kvstore, running_worker

pytestmark = pytest.mark.integration

PLAINTEXT = RpcSecurity(Role.WORKER, None)


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Certificates with the right names from an authority the cluster does not trust."""
    folder = tmp_path_factory.mktemp("foreign-pki")
    init_pki(folder, days=1)
    return folder


def _foreign(folder: Path, role: Role) -> RpcSecurity:
    return RpcSecurity.for_role(role, TLSFiles.load(folder / role.value))


async def _stats(client: KVStoreClient) -> None:
    try:
        await client.stats()
    finally:
        await client.close()


async def test_the_kvstore_admits_its_callers_and_refuses_everyone_else_on_grpc(redis_url: str, foreign: Path) -> None:
    async with running_kvstore(redis_url) as app:
        for caller in (Role.WORKER, Role.ROUTER):
            await _stats(KVStoreClient(app.address, security(caller)))
        with pytest.raises(Unavailable):  # no certificate: the handshake fails
            await _stats(KVStoreClient(app.address, PLAINTEXT))
        with pytest.raises(Unavailable):  # the right name from the wrong authority
            await _stats(KVStoreClient(app.address, _foreign(foreign, Role.WORKER)))
        with pytest.raises(PermissionDenied, match=r"controller\.shoal\.internal may not call the kvstore"):
            await _stats(KVStoreClient(app.address, security(Role.CONTROLLER)))


async def test_a_client_refuses_a_server_that_is_not_the_service_it_dials(redis_url: str) -> None:
    """A worker client reaching the kvstore's port: the kvstore's certificate does not name a worker."""
    async with running_kvstore(redis_url) as app:
        client = WorkerClient(app.address, security(Role.CONTROLLER))
        try:
            with pytest.raises(Unavailable):
                await client.get_load()
        finally:
            await client.close()


async def test_the_kv_data_channel_applies_the_same_rules(redis_url: str, foreign: Path) -> None:
    async with running_kvstore(redis_url) as app:
        data = app.servicer.data_address
        good = KVChannelClient(data, as_worker())
        assert (await good.put(blocks(1), "", 0, timeout_s=5)).stored == 1
        await good.close()
        for caller, error in (
            (PLAINTEXT, Unavailable),
            (_foreign(foreign, Role.WORKER), Unavailable),
            (security(Role.CONTROLLER), PermissionDenied),
        ):
            channel = KVChannelClient(data, caller)
            with pytest.raises(error):
                await channel.get([blocks(1)[0].hash], prefix_only=False, timeout_s=5)
            await channel.close()


async def test_a_worker_admits_the_router_and_controller_but_not_the_kvstore(redis_url: str, tiny_model: Path) -> None:
    async with running_worker(redis_url, model_path=tiny_model, role=WorkerRole.MIXED) as app:
        for caller in (Role.ROUTER, Role.CONTROLLER, Role.WORKER):
            client = WorkerClient(app.address, security(caller))
            assert (await client.get_load()).kv_blocks_total > 0
            await client.close()
        intruder = WorkerClient(app.address, security(Role.KVSTORE))
        with pytest.raises(PermissionDenied, match=r"kvstore\.shoal\.internal may not call the worker"):
            await intruder.get_load()
        await intruder.close()
        # The request path's data channel: the same refusal before any request is read.
        data = app.settings.advertised(app.data_port)
        with pytest.raises(PermissionDenied):
            await connect(data, SERVE_CHANNEL, Role.WORKER, security(Role.KVSTORE), lambda _f: None, lambda: None)
        conn = await connect(data, SERVE_CHANNEL, Role.WORKER, security(Role.ROUTER), lambda _f: None, lambda: None)
        conn.close()


async def test_probes_get_health_alone_in_plaintext_on_the_health_port(redis_url: str) -> None:
    async with running_kvstore(redis_url, health_port=0) as app:
        assert app.server is not None and app.server.health_port
        probe = f"127.0.0.1:{app.server.health_port}"
        async with grpc.aio.insecure_channel(probe) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="shoal.v1.KVStore"), timeout=5
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await channel.unary_unary("/shoal.v1.KVStore/Stats")(b"", timeout=5)
            assert refused.value.code() is grpc.StatusCode.UNIMPLEMENTED


def test_a_service_without_a_certificate_or_with_anothers_does_not_start(redis_url: str) -> None:
    with pytest.raises(FailedPrecondition, match="SHOAL_TLS_DIR"):
        RpcSecurity.from_settings(load_settings(KVStoreSettings, redis_url=redis_url), Role.KVSTORE)
    with pytest.raises(FailedPrecondition, match=r"names worker\.shoal\.internal, not kvstore\.shoal\.internal"):
        RpcSecurity.from_settings(
            load_settings(KVStoreSettings, redis_url=redis_url, tls_dir=tls_dir(Role.WORKER)), Role.KVSTORE
        )
    plaintext = load_settings(KVStoreSettings, redis_url=redis_url, rpc_plaintext=True)
    assert RpcSecurity.from_settings(plaintext, Role.KVSTORE).tls is None


def test_pki_init_keeps_a_valid_set_and_writes_keys_for_the_owner_alone(tmp_path: Path) -> None:
    assert init_pki(tmp_path / "pki", days=10)
    first = (tmp_path / "pki" / "ca.crt").read_bytes()
    assert not init_pki(tmp_path / "pki", days=10)  # services already running keep what they read
    assert (tmp_path / "pki" / "ca.crt").read_bytes() == first
    for key in [tmp_path / "pki" / "ca.key", *(tmp_path / "pki" / r.value / "tls.key" for r in Role)]:
        assert key.stat().st_mode & 0o077 == 0, key
    assert init_pki(tmp_path / "pki", days=10, force=True)
    assert (tmp_path / "pki" / "ca.crt").read_bytes() != first


async def test_plaintext_clients_cannot_reach_a_tls_port_even_for_health(redis_url: str) -> None:
    async with running_kvstore(redis_url) as app, grpc.aio.insecure_channel(app.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError):
            await asyncio.wait_for(
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3), 10
            )
