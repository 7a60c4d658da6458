"""Who a process is on internal channels, and who may call it: mutual TLS with one identity per service.

Each service holds a certificate from the cluster's CA whose DNS name is its
role (`worker.shoal.internal`). A client dials a peer by address but checks the
peer's certificate against the role it means to reach, so addresses (pod IPs,
compose names, 127.0.0.1) need not be in certificates and no service can pass
for another. A server asks every caller for a certificate from the same CA and
admits the roles in `CALLERS` (the flows docs/architecture.md draws); health
and reflection admit any valid certificate. The same rules hold on gRPC and on
the data channels (shared/rpc/channel.py).

Files follow a cert-manager Secret's layout (ca.crt, tls.crt, tls.key), so a
Certificate resource, a Secret a user provides or `shoal pki init` fill the
same folder (SHOAL_TLS_DIR). Services read the folder again every
RELOAD_INTERVAL_S (`RpcSecurity.reload`): a renewed certificate or CA bundle
is used by every connection made after that, on gRPC (servers through
dynamic credentials, clients through channels opened again, see
shared/rpc/client.py) and on the data channels, without a restart.
Connections already made keep the certificate they were made with.
Plaintext is an explicit development setting (SHOAL_RPC_PLAINTEXT) that each
service warns about; the internal token, when set, is checked in both modes.
"""

from __future__ import annotations

import enum
import functools
import os
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc import aio

from shared.config.base import CommonSettings
from shared.errors import FailedPrecondition
from shared.rpc.handlers import WrappingInterceptor
from shared.telemetry.logging import get_logger

log = get_logger("shoal.rpc.security")

IDENTITY_DOMAIN = "shoal.internal"
CA_FILE, CERT_FILE, KEY_FILE = "ca.crt", "tls.crt", "tls.key"
# How often services read their certificate folder again (a Kubernetes Secret volume itself lags a minute).
RELOAD_INTERVAL_S = 10.0


class Role(enum.StrEnum):
    ROUTER = "router"
    CONTROLLER = "controller"
    WORKER = "worker"
    KVSTORE = "kvstore"

    @property
    def identity(self) -> str:
        """The DNS name its certificates carry."""
        return f"{self.value}.{IDENTITY_DOMAIN}"


# Who may call each service (the controller's Celery jobs act as the controller). Workers call one
# another for P/D handoff and expert migration; nothing calls the router or the controller over gRPC.
CALLERS: Mapping[Role, frozenset[Role]] = {
    Role.WORKER: frozenset({Role.ROUTER, Role.CONTROLLER, Role.WORKER}),
    Role.KVSTORE: frozenset({Role.ROUTER, Role.WORKER}),
}

_OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def certificate_roles(pem: bytes) -> set[Role]:
    """The roles a certificate's DNS names claim (names outside IDENTITY_DOMAIN are ignored)."""
    cert = x509.load_pem_x509_certificate(pem)
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {role for role in Role if role.identity in names.get_values_for_type(x509.DNSName)}


@dataclass(frozen=True)
class TLSFiles:
    """A service's certificate folder: the CA to trust, its certificate and its key (PEM)."""

    folder: Path
    ca: bytes
    cert: bytes
    key: bytes

    @classmethod
    def load(cls, folder: Path) -> TLSFiles:
        try:
            ca, cert, key = ((folder / name).read_bytes() for name in (CA_FILE, CERT_FILE, KEY_FILE))
        except OSError as exc:
            raise FailedPrecondition(
                f"cannot read the TLS certificate folder {folder}: {exc}; it needs {CA_FILE}, {CERT_FILE} and "
                f"{KEY_FILE} (make them with `shoal pki init`)"
            ) from None
        return cls(folder, ca, cert, key)

    @property
    def roles(self) -> set[Role]:
        return certificate_roles(self.cert)


def _key_matches(cert_pem: bytes, key_pem: bytes) -> bool:
    """Whether the private key is the certificate's (a folder caught between two writes may pair them wrong)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except ValueError:
        return False
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return bool(cert.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki))


class RpcSecurity:
    """How one service authenticates on internal channels: its role, its certificate, the shared token.

    `tls` is the certificate folder as last read; `generation` counts the reloads that changed it, so
    what holds a channel knows when to open it again."""

    def __init__(self, role: Role, tls: TLSFiles | None, token: str | None = None) -> None:
        self.role = role
        self.token = token
        self.generation = 0
        self._tls = tls
        self._contexts: list[tuple[ssl.Purpose, ssl.SSLContext]] = []
        self._served_generation = 0

    @property
    def tls(self) -> TLSFiles | None:
        return self._tls

    @classmethod
    def from_settings(cls, settings: CommonSettings, role: Role) -> RpcSecurity:
        if settings.rpc_plaintext:
            log.warning(
                "SHOAL_RPC_PLAINTEXT: internal gRPC and data channels run without TLS; any process that reaches "
                "a port can call it (development setting)",
                role=role.value,
            )
            return cls(role, None, settings.internal_token)
        if settings.tls_dir is None:
            raise FailedPrecondition(
                "internal channels use mutual TLS: set SHOAL_TLS_DIR to this service's certificate folder "
                "(`shoal pki init DIR` makes one per service), or SHOAL_RPC_PLAINTEXT=true in development"
            )
        return cls.for_role(role, TLSFiles.load(settings.tls_dir), settings.internal_token)

    @classmethod
    def for_role(cls, role: Role, tls: TLSFiles, token: str | None = None) -> RpcSecurity:
        """`tls` checked to name `role`: a service started with another's certificate stops at once."""
        _check(role, tls)
        return cls(role, tls, token)

    # -- renewals --------------------------------------------------------------------------------

    def reload(self) -> bool:
        """Read the certificate folder again; True when it changed. A folder that cannot be used (unreadable,
        another role's certificate, a key that is not the certificate's) is logged and the last one kept."""
        current = self._tls
        if current is None:
            return False
        try:
            files = TLSFiles.load(current.folder)
            _check(self.role, files)
        except FailedPrecondition as exc:
            log.error("certificate folder not reloaded; the last certificate stays in use", error=str(exc))
            return False
        if files == current:
            return False
        if not _key_matches(files.cert, files.key):
            log.error("certificate folder not reloaded: tls.key is not tls.crt's key", folder=str(files.folder))
            return False
        self._tls = files
        for purpose, context in self._contexts:
            self._load(context, purpose, files)
        self.generation += 1
        log.info("certificates reloaded", folder=str(files.folder), generation=self.generation)
        return True

    async def watch(self) -> None:
        """One reload, for a service's Ticker (reading three small files: no thread needed)."""
        self.reload()

    # -- gRPC ------------------------------------------------------------------------------------

    def grpc_channel(
        self, address: str, peer: Role, options: list[tuple[str, Any]], interceptors: list[aio.ClientInterceptor]
    ) -> aio.Channel:
        """An asyncio channel to `address` that accepts only a certificate of `peer`."""
        if self.tls is None:
            return aio.insecure_channel(address, options=options, interceptors=interceptors)
        named = [*options, ("grpc.ssl_target_name_override", peer.identity)]
        return aio.secure_channel(address, self._credentials(self.tls), options=named, interceptors=interceptors)

    def blocking_channel(self, address: str, peer: Role) -> grpc.Channel:
        """The same for synchronous code (Celery tasks, probes)."""
        if self.tls is None:
            return grpc.insecure_channel(address)
        named = [("grpc.ssl_target_name_override", peer.identity)]
        return grpc.secure_channel(address, self._credentials(self.tls), options=named)

    @staticmethod
    def _credentials(tls: TLSFiles) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(tls.ca, tls.key, tls.cert)

    def add_port(self, server: aio.Server, address: str) -> int:
        if self.tls is None:
            return int(server.add_insecure_port(address))
        self._served_generation = self.generation
        credentials = grpc.dynamic_ssl_server_credentials(
            self._server_certificate(self.tls), self._renewed_server_certificate, require_client_authentication=True
        )
        return int(server.add_secure_port(address, credentials))

    @staticmethod
    def _server_certificate(tls: TLSFiles) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(tls.key, tls.cert)], root_certificates=tls.ca)

    def _renewed_server_certificate(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC asks before each new connection's handshake: the folder as reloaded, once per reload."""
        tls = self._tls
        if tls is None or self._served_generation == self.generation:
            return None
        self._served_generation = self.generation
        return self._server_certificate(tls)

    def server_interceptors(self) -> list[aio.ServerInterceptor]:
        return [] if self.tls is None else [CallerInterceptor(self.role)]

    # -- data channels (asyncio TLS) -------------------------------------------------------------

    @functools.cached_property
    def client_ssl(self) -> ssl.SSLContext | None:
        return self._ssl_context(ssl.Purpose.SERVER_AUTH)

    @functools.cached_property
    def server_ssl(self) -> ssl.SSLContext | None:
        return self._ssl_context(ssl.Purpose.CLIENT_AUTH)

    def _ssl_context(self, purpose: ssl.Purpose) -> ssl.SSLContext | None:
        """Either side of a data channel: this service's certificate, the CA's, the peer's required. A reload
        loads the new files into the same context, so connections made after it use them."""
        if self.tls is None:
            return None
        # Not create_default_context: without cadata it would trust the system's public CAs too.
        client = purpose is ssl.Purpose.SERVER_AUTH
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT if client else ssl.PROTOCOL_TLS_SERVER)
        self._load(context, purpose, self.tls)
        self._contexts.append((purpose, context))
        return context

    @staticmethod
    def _load(context: ssl.SSLContext, purpose: ssl.Purpose, tls: TLSFiles) -> None:
        # A fresh trust store cannot be swapped into a context: the new CAs are added to the old ones, which is
        # what a CA rotation needs anyway (both trusted until every certificate is the new CA's).
        context.load_verify_locations(cadata=tls.ca.decode())
        # The bytes `reload` checked (certificate and key a pair), not the folder again: it may be mid-write
        # by now. load_cert_chain reads only paths, so they go through an in-memory file (no disk, which may
        # be read-only, ever holds a copy of the key).
        fd = os.memfd_create("shoal-tls-chain", os.MFD_CLOEXEC)
        try:
            with open(fd, "wb", closefd=False) as chain:
                chain.write(tls.cert + b"\n" + tls.key)
            context.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        context.verify_mode = ssl.CERT_REQUIRED

    def refusal(self, peercert: Mapping[str, Any] | None) -> str | None:
        """Why a data channel's peer (ssl's `getpeercert()`) may not call this service; None: it may."""
        if self.tls is None:
            return None
        names = {value for kind, value in (peercert or {}).get("subjectAltName", ()) if kind == "DNS"}
        return _refusal(names, CALLERS.get(self.role, frozenset()), self.role)


def _check(role: Role, tls: TLSFiles) -> None:
    if role not in tls.roles:
        claimed = ", ".join(sorted(r.identity for r in tls.roles)) or "no Shoal service"
        raise FailedPrecondition(
            f"the certificate in {tls.folder} names {claimed}, not {role.identity}: give the {role.value} "
            "its own certificate folder"
        )


def _refusal(names: Iterable[str], allowed: frozenset[Role], role: Role) -> str | None:
    claimed = set(names)
    if any(caller.identity in claimed for caller in allowed):
        return None
    who = ", ".join(sorted(claimed)) or "a certificate with no service name"
    callers = ", ".join(sorted(caller.value for caller in allowed)) or "no service"
    return f"{who} may not call the {role.value} (its callers: {callers})"


class CallerInterceptor(WrappingInterceptor):
    """Admits a call when the client certificate names a role allowed to call this service."""

    skip = _OPEN_PREFIXES

    def __init__(self, role: Role) -> None:
        self._role = role
        self._allowed = CALLERS.get(role, frozenset())

    async def _check(self, context: aio.ServicerContext[Any, Any]) -> None:
        names = (name.decode() for name in context.auth_context().get("x509_subject_alternative_name", ()))
        reason = _refusal(names, self._allowed, self._role)
        if reason is not None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, reason)

    def wrap_unary(self, fn: Any, method: str) -> Any:
        async def wrapper(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            await self._check(context)
            return await fn(request, context)

        return wrapper

    def wrap_stream(self, fn: Any, method: str) -> Any:
        async def wrapper(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            await self._check(context)
            async for item in fn(request, context):
                yield item

        return wrapper
