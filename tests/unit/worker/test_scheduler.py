"""Block manager and detokenizer invariants (pure bookkeeping, no model)."""

from __future__ import annotations

import pytest

from services.worker.engines.blocks import BlockManager
from services.worker.engines.detokenize import OutputText
from services.worker.engines.sim.executor import ByteDetokenizer

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


def _bytes(text: str) -> list[int]:
    return [16 + b for b in text.encode()]


def test_multibyte_characters_come_out_whole_and_stops_are_never_leaked() -> None:
    out = OutputText(ByteDetokenizer(), prompt=[20], resume=[], stop=("STOP",))
    released = ""
    for token in _bytes("héllo ST"):
        out.add([token])
        released += out.take(final=False)
    assert released == "héllo "  # "ST" is held back: it may start "STOP"
    for token in _bytes("OP and more"):
        out.add([token])
    assert out.stopped
    assert released + out.take(final=True) == "héllo "


def test_resumed_text_is_not_released_again() -> None:
    out = OutputText(ByteDetokenizer(), prompt=[20], resume=_bytes("abc"), stop=())
    out.add(_bytes("d"))
    assert out.take(final=True) == "d"
