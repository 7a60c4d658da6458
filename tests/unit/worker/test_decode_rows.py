"""Decode attention over per-request rows, against attention over the paged cache it mirrors."""

from __future__ import annotations

import pytest
import torch

from services.worker.engines.reference.decoderows import WIDTH_STEP, DecodePlan, DecodeRows

pytestmark = pytest.mark.unit

KV_HEADS, HEADS, DIM, BLOCK = 2, 4, 8, 4


class PagedCache:
    """One layer's paged K/V cache ([kv_heads, slots, dim]) and the requests' block tables in it."""

    def __init__(self, blocks: int, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.k = torch.randn(KV_HEADS, blocks * BLOCK, DIM, generator=self.generator)
        self.v = torch.randn(KV_HEADS, blocks * BLOCK, DIM, generator=self.generator)
        # Shuffled, so no request's blocks are contiguous.
        self.free = torch.randperm(blocks, generator=self.generator).tolist()
        self.tables: dict[int, list[int]] = {}

    def table(self, serial: int, length: int) -> list[int]:
        table = self.tables.setdefault(serial, [])
        while len(table) * BLOCK < length:
            table.append(self.free.pop())
        return table

    def slots(self, serial: int, length: int) -> torch.Tensor:
        table = torch.tensor(self.tables[serial])
        return (table[:, None] * BLOCK + torch.arange(BLOCK)).flatten()[:length]

    def reference(self, serial: int, q: torch.Tensor, length: int) -> torch.Tensor:
        """Attention of q [heads, dim] over positions [0, length) read from the cache."""
        slots = self.slots(serial, length)
        k = self.k[:, slots].repeat_interleave(HEADS // KV_HEADS, dim=0)  # [heads, length, dim]
        v = self.v[:, slots].repeat_interleave(HEADS // KV_HEADS, dim=0)
        probs = torch.softmax((q[:, None, :] @ k.transpose(1, 2)).squeeze(1) * DIM**-0.5, dim=-1)
        return (probs[:, None, :] @ v).squeeze(1)


def rows_of(max_bytes: int) -> DecodeRows:
    return DecodeRows(1, KV_HEADS, DIM, BLOCK, torch.float32, torch.device("cpu"), max_bytes)


def step(rows: DecodeRows, cache: PagedCache, decodes: dict[int, int]) -> DecodePlan:
    """One decode step of every (serial -> position of its new token), checked against the cache."""
    entries = [(serial, start, cache.table(serial, start + 1)) for serial, start in decodes.items()]
    plan = rows.plan(entries)
    assert plan is not None
    new_k = torch.randn(len(entries), KV_HEADS, DIM, generator=cache.generator)
    new_v = torch.randn(len(entries), KV_HEADS, DIM, generator=cache.generator)
    for index, (serial, start, _) in enumerate(entries):  # the executor writes the cache first
        slot = cache.slots(serial, start + 1)[-1]
        cache.k[:, slot], cache.v[:, slot] = new_k[index], new_v[index]
    rows.write(0, plan, cache.k, cache.v, new_k, new_v)
    q = torch.randn(len(entries), HEADS, DIM, generator=cache.generator)
    got = rows.attend(0, plan, q)
    for index, (serial, start, _) in enumerate(entries):
        assert torch.allclose(got[index], cache.reference(serial, q[index], start + 1), atol=1e-5), serial
    return plan


def copied(plan: DecodePlan) -> int:
    """Positions copied from the cache into rows this step."""
    return 0 if plan.fill_slots is None else plan.fill_slots.numel()


def test_rows_give_the_attention_of_the_paged_cache_and_copy_each_context_once() -> None:
    cache = PagedCache(blocks=64)
    rows = rows_of(2**30)
    assert copied(step(rows, cache, {1: 5, 2: 9})) == 5 + 9
    # Both continue (only their new tokens are written) and a third starts decoding (its context is copied).
    assert copied(step(rows, cache, {1: 6, 2: 10, 3: 3})) == 3
    assert copied(step(rows, cache, {1: 7, 2: 11, 3: 4})) == 0


def test_a_request_that_skips_a_step_is_copied_again_with_what_the_cache_holds_then() -> None:
    cache = PagedCache(blocks=64)
    rows = rows_of(2**30)
    step(rows, cache, {1: 5, 2: 9})
    step(rows, cache, {1: 6})  # 2 was preempted: its row is let go
    # Recomputed, its K/V may differ from what its row held: the row must come from the cache again.
    slots = cache.slots(2, 10)
    cache.k[:, slots] = torch.randn(KV_HEADS, 10, DIM, generator=cache.generator)
    assert copied(step(rows, cache, {1: 7, 2: 10})) == 10
    # A request whose position is not one past its last step's is copied again too.
    assert copied(step(rows, cache, {1: 8, 2: 12})) == 12


def test_rows_and_width_grow_keeping_what_the_rows_hold() -> None:
    cache = PagedCache(blocks=128)
    rows = rows_of(2**30)
    step(rows, cache, {1: 3, 2: 4})
    assert rows.capacity == (2, WIDTH_STEP)
    long_start = WIDTH_STEP + 5
    plan = step(rows, cache, {1: 4, 2: 5, 3: long_start, 4: 2, 5: 7})
    assert copied(plan) == long_start + 2 + 7  # the old rows were carried over, not copied again
    assert rows.capacity[0] == 5 and rows.capacity[1] >= long_start + 1
    for offset in range(1, 4):
        step(rows, cache, {1: 4 + offset, 2: 5 + offset, 3: long_start + offset, 4: 2 + offset, 5: 7 + offset})


def test_a_finished_request_frees_its_row_for_the_next() -> None:
    cache = PagedCache(blocks=64)
    rows = rows_of(2**30)
    step(rows, cache, {1: 5, 2: 9, 3: 2})
    plan = step(rows, cache, {1: 6, 3: 3, 4: 6})  # 2 finished; 4 takes its row
    assert rows.capacity[0] == 3 and plan.used == 3
    assert copied(plan) == 6


def test_rows_that_would_pass_the_memory_budget_give_no_plan_and_are_dropped() -> None:
    cache = PagedCache(blocks=64)
    token_bytes = 2 * KV_HEADS * DIM * 4  # one layer's K and V of one position
    rows = rows_of(max_bytes=2 * WIDTH_STEP * token_bytes)  # two rows of the first width
    assert copied(step(rows, cache, {1: 5, 2: 9})) == 5 + 9
    # A third request does not fit: no plan (the executor gathers from the cache), and the rows are freed.
    assert rows.plan([(s, n, cache.table(s, n + 1)) for s, n in {1: 6, 2: 10, 3: 3}.items()]) is None
    assert rows.capacity == (0, 0)
    # Back within the budget, rows are made again: each context copied once more, then only appended to.
    assert copied(step(rows, cache, {1: 7, 3: 4})) == 7 + 4
    assert copied(step(rows, cache, {1: 8, 3: 5})) == 0
    # A context longer than the budget's width does not fit either.
    assert rows.plan([(1, 9 + WIDTH_STEP, cache.table(1, 10 + WIDTH_STEP))]) is None


def test_rows_grow_by_doubling_as_requests_join_one_at_a_time_unless_the_budget_allows_only_what_is_needed() -> None:
    cache = PagedCache(blocks=128)
    rows = rows_of(2**30)
    capacities = []
    for joined in range(1, 10):
        step(rows, cache, {serial: 3 + joined - serial for serial in range(joined)})
        capacities.append(rows.capacity[0])
    assert capacities == [1, 2, 4, 4, 8, 8, 8, 8, 16]  # 5 allocations for 9 requests, not 9
    token_bytes = 2 * KV_HEADS * DIM * 4
    tight = rows_of(max_bytes=3 * WIDTH_STEP * token_bytes)
    step(tight, cache, {1: 5, 2: 9})
    step(tight, cache, {1: 6, 2: 10, 3: 4})  # doubling to 4 rows would pass the budget; 3 fit
    assert tight.capacity == (3, WIDTH_STEP)
