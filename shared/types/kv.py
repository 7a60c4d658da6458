"""A KV-cache block as it is stored and moved: name, header, payload."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

from shared.hashing import BlockHash


@dataclass(frozen=True, slots=True)
class KVBlock:
    """One block: its chain name, the producer's header and the payload bytes."""

    hash: BlockHash
    header: bytes
    payload: bytes
    # CRC-32 of the payload when already computed and verified (saves a pass).
    crc32: int | None = field(default=None, compare=False)

    def checksum(self) -> int:
        return zlib.crc32(self.payload) if self.crc32 is None else self.crc32
