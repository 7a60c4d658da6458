"""Which publisher (worker or kvstore) holds which KV blocks, for prefix matching.

Fed by the KV event stream (shared/state/kvevents.py implements the
follower); queried on the router's hot path: for a prompt's hash chain, how
many leading blocks each publisher holds. Pure data structure, not
thread-safe (the router's event loop is its only user).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from shared.hashing import BlockHash


class KVIndex:
    def __init__(self) -> None:
        self._blocks: dict[str, set[BlockHash]] = {}
        self._owners: dict[BlockHash, set[str]] = {}

    def add(self, publisher: str, hashes: list[BlockHash]) -> None:
        mine = self._blocks.setdefault(publisher, set())
        for block in hashes:
            if block not in mine:
                mine.add(block)
                self._owners.setdefault(block, set()).add(publisher)

    def remove(self, publisher: str, hashes: list[BlockHash]) -> None:
        mine = self._blocks.get(publisher)
        if mine is None:
            return
        for block in hashes:
            if block in mine:
                mine.discard(block)
                self._drop_owner(block, publisher)

    def replace(self, publisher: str, hashes: list[BlockHash]) -> None:
        self.drop(publisher)
        self.add(publisher, hashes)

    def drop(self, publisher: str) -> None:
        for block in self._blocks.pop(publisher, set()):
            self._drop_owner(block, publisher)

    def _drop_owner(self, block: BlockHash, publisher: str) -> None:
        owners = self._owners.get(block)
        if owners is not None:
            owners.discard(publisher)
            if not owners:
                del self._owners[block]

    def publishers(self) -> list[str]:
        return sorted(self._blocks)

    def holds(self, publisher: str, block: BlockHash) -> bool:
        return block in self._blocks.get(publisher, ())

    def block_count(self, publisher: str) -> int:
        return len(self._blocks.get(publisher, ()))

    def prefix_lengths(self, hashes: Sequence[BlockHash], among: Iterable[str] | None = None) -> dict[str, int]:
        """Leading blocks of `hashes` each publisher holds (0 for those holding none)."""
        candidates = set(self._blocks if among is None else among)
        lengths = dict.fromkeys(candidates, 0)
        alive = candidates
        for depth, block in enumerate(hashes):
            owners = self._owners.get(block)
            if not owners:
                break
            still = alive & owners
            if not still:
                break
            for publisher in still:
                lengths[publisher] = depth + 1
            alive = still
        return lengths
