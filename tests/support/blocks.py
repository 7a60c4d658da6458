"""Deterministic KV blocks for store tests."""

from __future__ import annotations

import hashlib

from shared.types.kv import KVBlock


def block(index: int, size: int = 4096) -> KVBlock:
    name = hashlib.blake2b(f"block-{index}".encode(), digest_size=16).digest()
    seed = hashlib.blake2b(name).digest()
    payload = (seed * (size // len(seed) + 1))[:size]
    return KVBlock(name, f'{{"i":{index}}}'.encode(), payload)


def blocks(count: int, size: int = 4096, start: int = 0) -> list[KVBlock]:
    return [block(i, size) for i in range(start, start + count)]
