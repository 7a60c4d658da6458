"""The block-hash chain: the one way every service names a KV-cache block.

A prompt is cut into blocks of `block_size` tokens; block i is named by
h_i = BLAKE2b-128(h_{i-1} || token ids of block i as little-endian uint32),
with h_{-1} a seed derived from the model name and the block size. A name
therefore identifies a block *and its whole prefix*: two prompts share the
name of block i exactly when they share their first (i+1)·block_size tokens.
Only full blocks are named; a partial tail block is always recomputed.

Workers name the blocks of their prefix cache this way, the kvstore keys its
blocks by these names, and the router hashes prompts the same way to find the
worker holding the longest prefix. Changing this function invalidates every
cache, so it is versioned by the seed's tag.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

BlockHash = bytes
"""A 16-byte digest naming one block and its prefix."""

HASH_BYTES = 16
_SEED_TAG = b"shoal-kv-chain-v1"


def chain_seed(model: str, block_size: int) -> BlockHash:
    """The chain's starting value for one model and block size."""
    data = b"|".join([_SEED_TAG, model.encode(), str(block_size).encode()])
    return hashlib.blake2b(data, digest_size=HASH_BYTES).digest()


@dataclass(frozen=True, slots=True)
class BlockHasher:
    """Names blocks of token ids for one model. Pure and thread-safe."""

    model: str
    block_size: int

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {self.block_size}")

    @property
    def seed(self) -> BlockHash:
        return chain_seed(self.model, self.block_size)

    def hashes(self, token_ids: Sequence[int]) -> list[BlockHash]:
        """Names of every full block of `token_ids`, in order."""
        return self.extend(self.seed, token_ids)

    def extend(self, parent: BlockHash, token_ids: Sequence[int]) -> list[BlockHash]:
        """Continue a chain from `parent` over the full blocks of `token_ids`."""
        size = self.block_size
        full = len(token_ids) - len(token_ids) % size
        if full == 0:
            return []
        words = array("I", token_ids[:full])
        if sys.byteorder == "big":
            words.byteswap()
        raw = words.tobytes()
        step = 4 * size
        out: list[BlockHash] = []
        h = parent
        blake = hashlib.blake2b
        for start in range(0, len(raw), step):
            h = blake(h + raw[start : start + step], digest_size=HASH_BYTES).digest()
            out.append(h)
        return out


def to_hex(h: BlockHash) -> str:
    return h.hex()


def from_hex(text: str) -> BlockHash:
    """Parse a hex block name, refusing anything that is not 16 bytes."""
    raw = bytes.fromhex(text)
    if len(raw) != HASH_BYTES:
        raise ValueError(f"a block hash is {HASH_BYTES} bytes, got {len(raw)} from {text!r}")
    return raw
