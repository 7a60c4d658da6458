"""Where agent graphs' HTTP tools may post: hosts the operator allow-listed, never internal addresses by accident.

A graph's author picks its tools' URLs, and the controller posts to them
from inside the cluster, where a URL can reach what the author cannot: the
cloud's metadata service, Redis, the workers, the admin API (server-side
request forgery). So a URL's host must be on SHOAL_CONTROLLER_TOOL_HOSTS,
whose entries are host names (`api.example.com`), wildcards
(`*.example.com`) or addresses and networks (`203.0.113.7`,
`10.20.0.0/16`); empty, no HTTP tool runs. Loopback, link-local (the
metadata service), private, shared, multicast and reserved addresses are
refused unless an address entry covers them; a name reached through a
wildcard must also resolve to addresses like that (a name listed exactly is
trusted with what it resolves to), checked when the graph is submitted (for
what the URL says) and again before every call (for what the name resolves
to then); the call then connects to the address that was checked (`pinned`:
the name stays in the Host header and TLS's server name), so a second lookup
cannot lead elsewhere. Redirects are not followed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from shared.errors import InvalidArgument, PermissionDenied

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# (host, port) -> getaddrinfo's answer; the event loop's resolver unless a test stands in for DNS.
Resolver = Callable[[str, int], Awaitable[list[tuple[Any, ...]]]]


async def _resolve(host: str, port: int) -> list[tuple[Any, ...]]:
    return await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)


def _internal(address: Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return bool(
        address.is_loopback
        or address.is_link_local
        or address.is_private
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
        or (isinstance(address, ipaddress.IPv4Address) and address in ipaddress.IPv4Network("100.64.0.0/10"))
    )


def _literal(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


class EgressPolicy:
    def __init__(self, allowed: Sequence[str], resolve: Resolver = _resolve) -> None:
        self.resolve = resolve
        self.names: set[str] = set()
        self.suffixes: list[str] = []
        self.networks: list[Network] = []
        for raw in allowed:
            entry = raw.strip().lower().rstrip(".")
            if not entry:
                continue
            if entry.startswith("*."):
                self.suffixes.append(entry[1:])
                continue
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.names.add(entry)

    def _listed_address(self, address: Address) -> bool:
        return any(address in network for network in self.networks)

    def check(self, url: str) -> str:
        """The URL's host if the policy lets a tool post there (names are resolved later, by `vet`); raises
        InvalidArgument saying why not."""
        parts = urlsplit(url)
        host = (parts.hostname or "").rstrip(".")
        if parts.scheme not in ("http", "https") or not host:
            raise InvalidArgument(f"{url!r} is not an http(s) URL with a host")
        address = _literal(host)
        if address is not None:
            if self._listed_address(address):
                return host
            if _internal(address):
                raise InvalidArgument(f"{host} is an internal address; HTTP tools may not post there")
            raise InvalidArgument(f"{host} is not on SHOAL_CONTROLLER_TOOL_HOSTS, the hosts HTTP tools may post to")
        if host in self.names or any(host.endswith(suffix) for suffix in self.suffixes):
            return host
        raise InvalidArgument(f"{host} is not on SHOAL_CONTROLLER_TOOL_HOSTS, the hosts HTTP tools may post to")

    async def vet(self, url: str) -> Address:
        """`check`, then what the host resolves to now (a wildcard's names must not lead inside): the address
        the call must connect to."""
        try:
            host = self.check(url)
        except InvalidArgument as exc:
            raise PermissionDenied(exc.message) from None
        literal = _literal(host)
        if literal is not None:
            return literal
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            found = await self.resolve(host, port)
        except OSError as exc:
            raise PermissionDenied(f"{host} does not resolve: {exc}") from None
        addresses = [ipaddress.ip_address(sockaddr[0]) for *_, sockaddr in found]
        if not addresses:
            raise PermissionDenied(f"{host} resolves to no address")
        if host not in self.names:  # a name listed exactly is trusted with what it resolves to
            for address in addresses:
                if _internal(address) and not self._listed_address(address):
                    raise PermissionDenied(
                        f"{host} resolves to the internal address {address}; HTTP tools may not post there"
                    )
        return addresses[0]


def pinned(url: str, address: Address) -> tuple[str, dict[str, str], dict[str, str]]:
    """(URL, headers, httpx extensions) that reach `address` for `url`: the host name stays in the Host
    header and, for https, in TLS's server name (which the certificate is checked against)."""
    parts = urlsplit(url)
    at = f"[{address}]" if address.version == 6 else str(address)
    netloc = f"{at}:{parts.port}" if parts.port else at
    shown = parts.netloc.rpartition("@")[2]  # no credentials in the Host header
    extensions = {"sni_hostname": parts.hostname or ""} if parts.scheme == "https" else {}
    return urlunsplit(parts._replace(netloc=netloc)), {"host": shown}, extensions
