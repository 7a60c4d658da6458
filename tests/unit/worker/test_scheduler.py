"""The scheduler: what each engine step computes, under the token budget, the request cap and the KV
blocks (pure bookkeeping, no model)."""

from __future__ import annotations

import pytest

from services.worker.engines.base import Finish
from services.worker.engines.blocks import BlockManager
from services.worker.engines.detokenize import OutputText
from services.worker.engines.scheduler import Scheduler, SchedulerConfig, Sequence, State
from services.worker.engines.sim.executor import ByteDetokenizer
from shared.hashing import BlockHasher
from tests.support.engines import request

pytestmark = pytest.mark.unit


def _scheduler(num_blocks: int, max_running: int = 8, budget: int = 64, eos: tuple[int, ...] = ()) -> Scheduler:
    config = SchedulerConfig(max_running, max_batch_tokens=budget, max_waiting=64, max_context=1024, eos_token_ids=eos)
    return Scheduler(config, BlockManager(num_blocks, block_size=4), BlockHasher("m", 4), lambda _id, _block: None)


def _sequence(
    scheduler: Scheduler, request_id: str, prompt: list[int], max_tokens: int = 4, **sampling: object
) -> Sequence:
    engine_request = request(request_id, prompt, max_tokens, **sampling)  # type: ignore[arg-type]
    seq = scheduler.new_sequence(engine_request, OutputText(ByteDetokenizer(), prompt, [], ()))
    scheduler.add(seq)
    return seq


def _step(scheduler: Scheduler, token: int = 17) -> list[tuple[str, int, int, bool]]:
    """One step: what was scheduled (id, start, length, sample), each sampled position given `token`."""
    items = scheduler.schedule()
    scheduler.complete(items, [token if item.sample else None for item in items])
    return [(item.seq.request_id, item.start, item.length, item.sample) for item in items]


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


def test_decodes_go_first_and_a_long_prompt_fills_the_rest_of_the_budget_in_chunks() -> None:
    scheduler = _scheduler(num_blocks=64, budget=8)
    a, b = _sequence(scheduler, "a", [1, 2, 3], 10), _sequence(scheduler, "b", [4, 5], 10)
    assert _step(scheduler) == [("a", 0, 3, True), ("b", 0, 2, True)]  # both prompts fit: admitted whole
    long = _sequence(scheduler, "long", list(range(30, 50)), 2)  # 20 tokens
    # One token for each decoding request, then the prompt's next chunk in what is left: 8 - 2 = 6.
    assert _step(scheduler) == [("a", 3, 1, True), ("b", 2, 1, True), ("long", 0, 6, False)]
    assert _step(scheduler) == [("a", 4, 1, True), ("b", 3, 1, True), ("long", 6, 6, False)]
    assert _step(scheduler) == [("a", 5, 1, True), ("b", 4, 1, True), ("long", 12, 6, False)]
    # The last chunk samples the prompt's first output token.
    assert _step(scheduler) == [("a", 6, 1, True), ("b", 5, 1, True), ("long", 18, 2, True)]
    assert long.num_generated == 1 and a.num_generated == b.num_generated == 5


def test_at_most_max_running_requests_run_and_the_rest_wait_in_arrival_order() -> None:
    scheduler = _scheduler(num_blocks=64, max_running=2)
    first, second, third = (_sequence(scheduler, name, [9, 9, 9], 2) for name in ("first", "second", "third"))
    assert [rid for rid, *_ in _step(scheduler)] == ["first", "second"]
    assert list(scheduler.waiting) == [third]
    _step(scheduler)  # both finish their second token
    for seq in (first, second):
        assert seq.finish is Finish.LENGTH
        scheduler.finish(seq)
    assert [rid for rid, *_ in _step(scheduler)] == ["third"]


def test_out_of_blocks_the_newest_request_is_preempted_and_recomputed_keeping_its_tokens() -> None:
    scheduler = _scheduler(num_blocks=4)  # 16 token slots of 4
    old = _sequence(scheduler, "old", [1, 2, 3, 4, 5, 6, 7], 8)  # 2 blocks now, 4 by its end
    new = _sequence(scheduler, "new", [8, 9, 10, 11], 8)  # 1 block now, a second at its 6th token
    _step(scheduler)
    _step(scheduler)
    assert scheduler.running == [old, new] and scheduler.blocks.num_available == 0
    _step(scheduler)  # old needs its third block and none is free: the newest request gives way
    assert scheduler.preemptions == 1 and scheduler.running == [old]
    assert new.state is State.WAITING and scheduler.waiting[0] is new and new.block_ids == []
    assert new.tokens[new.num_prompt :] == [17, 17] and new.num_computed == 0  # its tokens kept, its KV not
    while old.finish is None:
        _step(scheduler)
    scheduler.finish(old)
    # Back at the head of the queue: prompt and produced tokens recomputed in one chunk, the next sampled.
    assert _step(scheduler) == [("new", 0, 6, True)]
    assert new.tokens[new.num_prompt :] == [17, 17, 17]


def test_end_of_sequence_stop_ids_and_max_tokens_finish_a_request() -> None:
    scheduler = _scheduler(num_blocks=64, eos=(2,))
    by_eos = _sequence(scheduler, "eos", [5, 6], 10, ignore_eos=False)
    by_stop_id = _sequence(scheduler, "stop-id", [5, 7], 10, stop_token_ids=(2,))  # ignores end-of-sequence
    past_eos = _sequence(scheduler, "ignore-eos", [5, 8], 3, stop_token_ids=(3,))
    _step(scheduler, token=2)
    assert (by_eos.finish, by_stop_id.finish, past_eos.finish) == (Finish.STOP, Finish.STOP, None)
    for seq in (by_eos, by_stop_id):
        scheduler.finish(seq)
    _step(scheduler, token=2)
    _step(scheduler, token=2)
    assert past_eos.finish is Finish.LENGTH and past_eos.num_generated == 3


def test_a_cached_prefix_is_not_computed_again() -> None:
    scheduler = _scheduler(num_blocks=16)
    _run_to_end(scheduler, _sequence(scheduler, "warm", [*PREFIX, 30], max_tokens=1))
    again = _sequence(scheduler, "again", [*PREFIX, 31, 32], 2)
    assert _step(scheduler) == [("again", 8, 2, True)]  # the two cached blocks are skipped
    assert again.num_cached == 8
