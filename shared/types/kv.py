"""A KV-cache block as it is stored and moved: name, header, payload."""

from __future__ import annotations

from dataclasses import dataclass

from shared.hashing import BlockHash


@dataclass(frozen=True, slots=True)
class KVBlock:
    """One block: its chain name, the producer's header and the payload bytes."""

    hash: BlockHash
    header: bytes
    payload: bytes
