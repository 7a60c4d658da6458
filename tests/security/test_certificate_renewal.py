"""A renewed certificate or a new CA is used without a restart (RpcSecurity.reload), on gRPC and on the
data channels, by servers and clients; connections made before keep working; a folder caught half-written
is not loaded, and one rewritten during a reload loads the files as they were checked.

The test swaps the kvstore's certificate for one from another authority, so which certificate a
handshake used shows in who can connect: a client trusting only the new authority succeeds only once the
server presents the new certificate.
"""

from __future__ import annotations

import shutil
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from shared.errors import Unavailable
from shared.rpc import security as security_module
from shared.rpc.kvchannel import KVChannelClient
from shared.rpc.kvstore_client import KVStoreClient
from shared.rpc.pki import init_pki
from shared.rpc.security import CA_FILE, CERT_FILE, KEY_FILE, Role, RpcSecurity, TLSFiles
from tests.support.blocks import blocks
from tests.support.services import running_kvstore

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def authorities(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two authorities with a certificate for every service each: before and after a rotation."""
    old, new = tmp_path_factory.mktemp("old-ca"), tmp_path_factory.mktemp("new-ca")
    init_pki(old, days=1)
    init_pki(new, days=1)
    return old, new


def install(folder: Path, source: Path, trusted: list[Path]) -> None:
    """Put `source`'s certificate and key in `folder`, trusting the CAs of `trusted` (a bundle)."""
    folder.mkdir(exist_ok=True)
    for name in (CERT_FILE, KEY_FILE):
        shutil.copyfile(source / name, folder / name)
    (folder / CA_FILE).write_bytes(b"".join((ca / CA_FILE).read_bytes() for ca in trusted))


def loaded(role: Role, folder: Path) -> RpcSecurity:
    return RpcSecurity.for_role(role, TLSFiles.load(folder))


async def reachable(client: KVStoreClient) -> bool:
    try:
        await client.stats()
    except Unavailable:
        return False
    return True


async def reachable_anew(address: str, folder: Path) -> bool:
    """Whether a client with `folder`'s certificate gets in on a connection of its own (a channel that
    failed before waits out its reconnect backoff: a fresh one shows the server's certificate now)."""
    client = KVStoreClient(address, loaded(Role.WORKER, folder), data_channel=False)
    try:
        return await reachable(client)
    finally:
        await client.close()


async def test_a_server_and_a_client_take_up_a_new_authority_without_a_restart(
    redis_url: str, authorities: tuple[Path, Path], tmp_path: Path
) -> None:
    old, new = authorities
    served = tmp_path / "kvstore"
    install(served, old / "kvstore", [old])
    rotating = tmp_path / "worker"
    install(rotating, old / "worker", [old])
    async with running_kvstore(redis_url, tls_dir=served) as app:
        before = KVStoreClient(app.address, loaded(Role.WORKER, old / "worker"), data_channel=False)
        client_security = loaded(Role.WORKER, rotating)
        moving = KVStoreClient(app.address, client_security, data_channel=False)
        data = app.servicer.data_address
        try:
            assert await reachable(before)
            assert not await reachable_anew(app.address, new / "worker")  # the server's is the old authority's

            # The kvstore's Secret is renewed from the new authority; it trusts both during the rotation.
            install(served, new / "kvstore", [old, new])
            assert app.security.reload() and not app.security.reload()  # once per change
            assert await reachable_anew(app.address, new / "worker")  # a new connection: the new certificate
            assert await reachable(before)  # its connection made before the renewal still works
            assert not await reachable_anew(app.address, old / "worker")  # but a new one meets the new certificate
            kv = KVChannelClient(data, loaded(Role.WORKER, new / "worker"))
            assert (await kv.put(blocks(1), "", 0, timeout_s=5)).stored == 1
            await kv.close()

            # A client that trusts only the old authority meets the new certificate; once its own folder is
            # renewed, its next call opens a channel with the new files.
            assert not await reachable(moving)
            install(rotating, new / "worker", [new])
            assert client_security.reload()
            assert await reachable(moving)
            kv = KVChannelClient(data, client_security)
            assert (await kv.put(blocks(2), "", 0, timeout_s=5)).stored >= 1
            await kv.close()
        finally:
            for client in (before, moving):
                await client.close()


async def test_a_half_written_folder_is_not_loaded(authorities: tuple[Path, Path], tmp_path: Path) -> None:
    old, new = authorities
    folder = tmp_path / "worker"
    install(folder, old / "worker", [old])
    security = loaded(Role.WORKER, folder)
    context = security.client_ssl
    shutil.copyfile(new / "worker" / CERT_FILE, folder / CERT_FILE)  # the key is still the old one
    assert not security.reload()
    assert security.tls is not None and security.tls.cert == (old / "worker" / CERT_FILE).read_bytes()
    install(folder, old / "kvstore", [old])  # another service's certificate
    assert not security.reload() and security.generation == 0
    install(folder, new / "worker", [new])
    assert security.reload() and security.generation == 1
    assert security.client_ssl is context  # loaded into the context connections are made with


def presented(client: ssl.SSLContext, server: Path) -> bytes:
    """The certificate (DER) `client` shows a kvstore whose folder is `server`, in a handshake in memory."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(server / CERT_FILE, server / KEY_FILE)
    context.load_verify_locations(cadata=(server / CA_FILE).read_text())
    context.verify_mode = ssl.CERT_REQUIRED
    pipes = [ssl.MemoryBIO() for _ in range(4)]
    ours = client.wrap_bio(pipes[0], pipes[1], server_hostname=Role.KVSTORE.identity)
    theirs = context.wrap_bio(pipes[1], pipes[0], server_side=True)
    for _ in range(10):
        done = 0
        for side in (ours, theirs):
            try:
                side.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
        if done == 2:
            break
    certificate = theirs.getpeercert(binary_form=True)
    assert certificate is not None
    return certificate


def der(folder: Path) -> bytes:
    return x509.load_pem_x509_certificate((folder / CERT_FILE).read_bytes()).public_bytes(serialization.Encoding.DER)


async def test_a_folder_rewritten_during_a_reload_loads_what_was_checked(
    authorities: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old, new = authorities
    folder = tmp_path / "worker"
    install(folder, old / "worker", [old, new])
    security = loaded(Role.WORKER, folder)
    context = security.client_ssl
    assert context is not None and presented(context, old / "kvstore") == der(old / "worker")
    install(folder, new / "worker", [old, new])
    checked = security_module._key_matches

    def then_rewritten(cert: bytes, key: bytes) -> bool:
        # The folder changes again right after the check (a renewal writes its files one at a time): the
        # old certificate is back beside the new key, a pair that does not match.
        matches = checked(cert, key)
        shutil.copyfile(old / "worker" / CERT_FILE, folder / CERT_FILE)
        return matches

    monkeypatch.setattr(security_module, "_key_matches", then_rewritten)
    assert security.reload()
    assert presented(context, new / "kvstore") == der(new / "worker")
