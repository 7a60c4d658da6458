"""The scheduler, the block manager and the detokenizer (pure bookkeeping, no model)."""

from __future__ import annotations

import pytest

from services.worker.engines.base import Finish
from services.worker.engines.blocks import BlockManager
from services.worker.engines.detokenize import OutputText
from services.worker.engines.scheduler import Scheduler, SchedulerConfig, Sequence
from services.worker.engines.sim.executor import ByteDetokenizer
from shared.hashing import BlockHasher
from tests.support.engines import request

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
    out = OutputText(ByteDetokenizer(), prompt=[20], resume=_bytes("abc"), stop=(), resume_text_chars=3)
    out.add(_bytes("d"))
    assert out.take(final=True) == "d"


def test_a_character_split_across_a_hand_off_comes_out_whole() -> None:
    first, second = _bytes("é")  # two UTF-8 bytes: the first worker's text ends before the character
    out = OutputText(ByteDetokenizer(), prompt=[20], resume=[first], stop=(), resume_text_chars=0)
    out.add([second, *_bytes("x")])
    assert out.take(final=True) == "éx"


def test_text_held_back_for_a_possible_stop_is_sent_after_a_resume() -> None:
    first = OutputText(ByteDetokenizer(), prompt=[20], resume=[], stop=("STOP",))
    for token in _bytes("ab ST"):
        first.add([token])
    sent = first.take(final=False)
    assert sent == "ab "  # "ST" held back when the worker failed
    out = OutputText(
        ByteDetokenizer(), prompt=[20], resume=_bytes("ab ST"), stop=("STOP",), resume_text_chars=len(sent)
    )
    out.add(_bytes("AR"))
    assert sent + out.take(final=True) == "ab STAR"


# -- the scheduler --------------------------------------------------------------------


def _scheduler(num_blocks: int, max_running: int = 8) -> Scheduler:
    config = SchedulerConfig(max_running, max_batch_tokens=64, max_waiting=64, max_context=1024, eos_token_ids=())
    return Scheduler(config, BlockManager(num_blocks, block_size=4), BlockHasher("m", 4), lambda _id, _block: None)


def _sequence(scheduler: Scheduler, request_id: str, prompt: list[int], max_tokens: int = 4) -> Sequence:
    seq = scheduler.new_sequence(request(request_id, prompt, max_tokens), OutputText(ByteDetokenizer(), prompt, [], ()))
    scheduler.add(seq)
    return seq


def _run_to_end(scheduler: Scheduler, seq: Sequence) -> None:
    """Step until `seq` finishes (one sampled token per step), then release it."""
    for _ in range(100):
        items = scheduler.schedule()
        scheduler.complete(items, [17 if item.sample else None for item in items])
        if seq.finish is not None:
            scheduler.finish(seq)
            return
    raise AssertionError("the sequence never finished")


PREFIX = list(range(20, 28))  # two full blocks of 4


def test_a_request_that_cannot_be_admitted_holds_no_cached_prefix() -> None:
    scheduler = _scheduler(num_blocks=6)
    _run_to_end(scheduler, _sequence(scheduler, "warm", [*PREFIX, 30], max_tokens=1))
    assert scheduler.blocks.match_prefix(scheduler.hasher.hashes(PREFIX)) != []  # the prefix is cached
    running = _sequence(scheduler, "big", list(range(40, 52)), max_tokens=8)  # holds 3 blocks, more to come
    scheduler.schedule()
    assert running in scheduler.running
    available = scheduler.blocks.num_available
    waiting = _sequence(scheduler, "shares-the-prefix", [*PREFIX, *range(60, 68)], max_tokens=8)
    assert scheduler.schedule()[0].seq is running  # only the running request steps
    assert waiting in scheduler.waiting
    assert waiting.block_ids == []  # it took no reference on the prefix while it waits
    assert scheduler.blocks.num_available == available


def test_a_waiting_request_cannot_starve_the_head_of_the_queue() -> None:
    scheduler = _scheduler(num_blocks=6)
    _run_to_end(scheduler, _sequence(scheduler, "warm", [*PREFIX, 30], max_tokens=1))
    running = _sequence(scheduler, "big", list(range(40, 52)), max_tokens=1)
    scheduler.schedule()
    waiting = _sequence(scheduler, "shares-the-prefix", [*PREFIX, *range(60, 68)], max_tokens=4)
    scheduler.schedule()  # cannot fit beside `running`: it waits
    scheduler.finish(running, Finish.LENGTH)
    # A request preempted earlier goes back to the head of the queue; it needs 5 of the 6 blocks.
    head = scheduler.new_sequence(request("head", list(range(80, 97)), 2), OutputText(ByteDetokenizer(), [], [], ()))
    scheduler.waiting.appendleft(head)
    admitted = [item.seq for item in scheduler.schedule()]
    assert admitted == [head]  # the cached prefix was evictable, not pinned by the request behind it
    _run_to_end(scheduler, head)
    _run_to_end(scheduler, waiting)
