"""The serialized form of one KV-cache block, as workers export and import it.

A block travels as a small JSON header and a payload. The header names the
producer's model and cache geometry (layers, KV heads, head size, block size,
dtype), the block's chain hash and a CRC-32 of the payload; an importer
refuses a block whose header does not match its own model or whose payload
does not match its checksum. The payload is the raw tensor of shape
[layers, 2 (K, V), kv_heads, block_size, head_dim]. The kvstore treats both
parts as opaque bytes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from services.worker.engines.base import KVBlock
from shared.errors import InvalidArgument
from shared.hashing import BlockHash
from shared.types.kv import checksum

FORMAT = "shoal-kv/2"  # 2: the header carries the payload's CRC-32C (1: zlib CRC-32)


@dataclass(frozen=True)
class KVGeometry:
    model: str
    layers: int
    kv_heads: int
    head_dim: int
    block_size: int
    dtype: str
    itemsize: int

    @property
    def payload_bytes(self) -> int:
        return self.layers * 2 * self.block_size * self.kv_heads * self.head_dim * self.itemsize


def encode_block(geometry: KVGeometry, block_hash: BlockHash, payload: bytes | bytearray) -> KVBlock:
    crc = checksum(payload)
    header = {"format": FORMAT, **asdict(geometry), "hash": block_hash.hex(), "crc32c": crc}
    return KVBlock(block_hash, json.dumps(header, separators=(",", ":")).encode(), payload, crc)


def check_block(geometry: KVGeometry, block: KVBlock) -> None:
    """Raise InvalidArgument unless `block` was made for `geometry` and is intact."""
    try:
        header = json.loads(block.header)
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument("imported KV block has an unreadable header", param="kv_source") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise InvalidArgument(f"imported KV block is not in {FORMAT} format", param="kv_source")
    for key, expected in asdict(geometry).items():
        if header.get(key) != expected:
            raise InvalidArgument(
                f"imported KV block has {key}={header.get(key)!r}; this worker needs {expected!r}",
                param="kv_source",
            )
    if header.get("hash") != block.hash.hex():
        raise InvalidArgument("imported KV block header names another block", param="kv_source")
    if len(block.payload) != geometry.payload_bytes:
        raise InvalidArgument(
            f"imported KV block holds {len(block.payload)} bytes; expected {geometry.payload_bytes}",
            param="kv_source",
        )
    if block.checksum() != header.get("crc32c"):
        raise InvalidArgument("imported KV block is corrupt (checksum mismatch)", param="kv_source")
