"""Who may call the OpenAI API: the key in `Authorization: Bearer`, and what a request is charged.

An `Access` admits a request (or raises Unauthenticated, or RateLimited when
the key is over its rate or quota) and hands back a `Grant`, which the
endpoint charges the tokens the request used when it ends. `StaticKeys` is
the simplest: a fixed list of keys, no limits (a worker's own API, and
internal callers); the router's managed keys with limits are in
services/router/keys.py.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Sequence
from typing import Protocol

from shared.errors import Unauthenticated


class Grant:
    """One admitted request: which key (None: none needed), and where its tokens are charged."""

    __slots__ = ("_charge", "key_id")

    def __init__(self, key_id: str | None = None, charge: Callable[[int], None] | None = None) -> None:
        self.key_id = key_id
        self._charge = charge

    def charge(self, tokens: int) -> None:
        if self._charge is not None and tokens:
            self._charge(tokens)


OPEN = Grant()


class Access(Protocol):
    async def admit(self, authorization: str | None, request: bool = True) -> Grant:
        """Admit a caller; `request` False only authenticates (listing models), true also takes one
        request from the key's rate."""


def presented_key(authorization: str | None) -> str:
    return (authorization or "").removeprefix("Bearer ").strip()


def refuse() -> Unauthenticated:
    return Unauthenticated("Incorrect API key provided.", param=None)


class StaticKeys:
    """Keys from the settings; none configured: open."""

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys = [key.encode() for key in keys]

    def matches(self, presented: str) -> bool:
        candidate = presented.encode()
        return any(hmac.compare_digest(candidate, key) for key in self.keys)

    async def admit(self, authorization: str | None, request: bool = True) -> Grant:
        if self.keys and not self.matches(presented_key(authorization)):
            raise refuse()
        return OPEN
