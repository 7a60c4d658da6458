"""The block manager: paged KV blocks, named by their hash chain, cached until evicted LRU first."""

from __future__ import annotations

import pytest

from services.worker.engines.blocks import BlockManager

pytestmark = pytest.mark.unit


def test_released_named_blocks_stay_cached_until_evicted_lru_first() -> None:
    blocks = BlockManager(num_blocks=3, block_size=4)
    a, b = blocks.allocate(), blocks.allocate()
    assert a is not None and b is not None
    blocks.register(a, b"A" * 16)
    blocks.register(b, b"B" * 16)
    blocks.release([a, b])  # tail first: b becomes evictable before a
    assert blocks.num_available == 3
    assert blocks.match_prefix([b"A" * 16, b"B" * 16]) == [a, b]
    c = blocks.allocate()  # the never-used block goes first
    d = blocks.allocate()  # then the least recently released: b
    assert d == b
    assert blocks.match_prefix([b"A" * 16, b"B" * 16]) == [a]
    assert ("remove", b"B" * 16) in blocks.drain_events()
    assert c is not None and blocks.allocate() == a and blocks.allocate() is None


def test_a_held_block_is_never_evicted() -> None:
    blocks = BlockManager(num_blocks=1, block_size=4)
    block = blocks.allocate()
    assert block is not None
    blocks.register(block, b"X" * 16)
    assert blocks.allocate() is None
    blocks.release([block])
    blocks.hold(blocks.match_prefix([b"X" * 16]))
    assert blocks.allocate() is None
    with pytest.raises(RuntimeError, match="released more often"):
        blocks.release([block, block])


def test_duplicate_names_keep_the_first_block() -> None:
    blocks = BlockManager(num_blocks=2, block_size=4)
    first, second = blocks.allocate(), blocks.allocate()
    assert first is not None and second is not None
    assert blocks.register(first, b"S" * 16) == first
    assert blocks.register(second, b"S" * 16) == first
    blocks.release([second])
    assert blocks.num_available == 1  # the unnamed copy went back to the free list
