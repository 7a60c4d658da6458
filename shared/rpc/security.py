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
same folder (SHOAL_TLS_DIR). Certificates are read at start: rotating one is a
rolling restart. Plaintext is an explicit development setting
(SHOAL_RPC_PLAINTEXT) that each service warns about; the internal token, when
set, is checked in both modes.
"""

from __future__ import annotations

import enum
import functools
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from grpc import aio

from shared.config.base import CommonSettings
from shared.errors import FailedPrecondition
from shared.rpc.handlers import WrappingInterceptor
from shared.telemetry.logging import get_logger

log = get_logger("shoal.rpc.security")

IDENTITY_DOMAIN = "shoal.internal"
CA_FILE, CERT_FILE, KEY_FILE = "ca.crt", "tls.crt", "tls.key"


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


@dataclass(frozen=True)
class RpcSecurity:
    """How one service authenticates on internal channels: its role, its certificate, the shared token."""

    role: Role
    tls: TLSFiles | None
    token: str | None = None

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
        if role not in tls.roles:
            claimed = ", ".join(sorted(r.identity for r in tls.roles)) or "no Shoal service"
            raise FailedPrecondition(
                f"the certificate in {tls.folder} names {claimed}, not {role.identity}: give the {role.value} "
                "its own certificate folder"
            )
        return cls(role, tls, token)

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
        credentials = grpc.ssl_server_credentials(
            [(self.tls.key, self.tls.cert)], root_certificates=self.tls.ca, require_client_auth=True
        )
        return int(server.add_secure_port(address, credentials))

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
        """Either side of a data channel: this service's certificate, the CA's, the peer's required."""
        if self.tls is None:
            return None
        context = ssl.create_default_context(purpose, cadata=self.tls.ca.decode())
        context.load_cert_chain(self.tls.folder / CERT_FILE, self.tls.folder / KEY_FILE)
        context.verify_mode = ssl.CERT_REQUIRED
        return context

    def refusal(self, peercert: Mapping[str, Any] | None) -> str | None:
        """Why a data channel's peer (ssl's `getpeercert()`) may not call this service; None: it may."""
        if self.tls is None:
            return None
        names = {value for kind, value in (peercert or {}).get("subjectAltName", ()) if kind == "DNS"}
        return _refusal(names, CALLERS.get(self.role, frozenset()), self.role)


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
