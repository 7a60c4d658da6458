"""One client per peer address, created on first use and closed together."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Generic, Protocol, TypeVar


class _Closable(Protocol):
    def close(self) -> Awaitable[None]: ...


C = TypeVar("C", bound=_Closable)


class ClientPool(Generic[C]):
    def __init__(self, factory: Callable[[str], C]) -> None:
        self._factory = factory
        self._clients: dict[str, C] = {}

    def get(self, address: str) -> C:
        client = self._clients.get(address)
        if client is None:
            client = self._clients[address] = self._factory(address)
        return client

    async def discard(self, address: str) -> None:
        client = self._clients.pop(address, None)
        if client is not None:
            await client.close()

    async def retain(self, addresses: set[str]) -> None:
        """Close the clients of every other address (peers that left)."""
        for address in [a for a in self._clients if a not in addresses]:
            await self.discard(address)

    async def close(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.close()
