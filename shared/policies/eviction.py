"""Eviction policies of the kvstore (and of the simulator's stores): which block leaves a full tier first.

A policy only orders blocks; the store enforces pins (a pinned block is
never offered as a victim) and budgets. Built-ins are listed in POLICIES by
name; `SHOAL_KVSTORE_EVICTION` picks one.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Protocol

from shared.hashing import BlockHash


class EvictionPolicy(Protocol):
    """Orders one tier's blocks for eviction. Called from the store's event loop only."""

    def inserted(self, block: BlockHash, session: str) -> None:
        """A block entered the tier (`session` is "" when not tagged)."""

    def accessed(self, block: BlockHash, session: str) -> None:
        """A block was read or written again."""

    def removed(self, block: BlockHash) -> None:
        """A block left the tier (evicted, deleted, moved)."""

    def candidates(self) -> Iterator[BlockHash]:
        """Blocks in eviction order, first victim first (pinned ones are skipped by the store). Lazy:
        take what you need (itertools.islice) before changing the policy."""


class LRUPolicy:
    """Least recently used first."""

    def __init__(self) -> None:
        self._order: OrderedDict[BlockHash, None] = OrderedDict()

    def inserted(self, block: BlockHash, session: str) -> None:
        self._order[block] = None
        self._order.move_to_end(block)

    def accessed(self, block: BlockHash, session: str) -> None:
        if block in self._order:
            self._order.move_to_end(block)

    def removed(self, block: BlockHash) -> None:
        self._order.pop(block, None)

    def candidates(self) -> Iterator[BlockHash]:
        return iter(self._order)


class SessionLRUPolicy:
    """LRU, but blocks that belong to an agent session go last.

    Agent turns come back to their prefix after a tool call that may take
    seconds to minutes; anonymous prefixes are less likely to return. So all
    blocks never tagged with a session are evicted (LRU among them) before
    any session block (LRU among those). Pins still protect a session's
    blocks absolutely while their TTL runs.
    """

    def __init__(self) -> None:
        self._anonymous = LRUPolicy()
        self._session = LRUPolicy()
        self._tagged: set[BlockHash] = set()

    def inserted(self, block: BlockHash, session: str) -> None:
        if session or block in self._tagged:
            self._anonymous.removed(block)
            self._tagged.add(block)
            self._session.inserted(block, session)
        else:
            self._anonymous.inserted(block, session)

    def accessed(self, block: BlockHash, session: str) -> None:
        if session and block not in self._tagged:
            self.inserted(block, session)
        elif block in self._tagged:
            self._session.accessed(block, session)
        else:
            self._anonymous.accessed(block, session)

    def removed(self, block: BlockHash) -> None:
        self._tagged.discard(block)
        self._anonymous.removed(block)
        self._session.removed(block)

    def candidates(self) -> Iterator[BlockHash]:
        yield from self._anonymous.candidates()
        yield from self._session.candidates()


POLICIES: dict[str, Callable[[], EvictionPolicy]] = {
    "lru": LRUPolicy,
    "session-lru": SessionLRUPolicy,
}


def make_policy(name: str) -> EvictionPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}; choose one of {', '.join(POLICIES)}") from None
