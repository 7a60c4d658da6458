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
to then). Redirects are not followed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

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

    async def vet(self, url: str) -> None:
        """`check`, then what the host resolves to now: a wildcard's names must not lead inside."""
        try:
            host = self.check(url)
        except InvalidArgument as exc:
            raise PermissionDenied(exc.message) from None
        if _literal(host) is not None or host in self.names:
            return
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            found = await self.resolve(host, port)
        except OSError as exc:
            raise PermissionDenied(f"{host} does not resolve: {exc}") from None
        for *_, sockaddr in found:
            address = ipaddress.ip_address(sockaddr[0])
            if _internal(address) and not self._listed_address(address):
                raise PermissionDenied(
                    f"{host} resolves to the internal address {address}; HTTP tools may not post there"
                )
