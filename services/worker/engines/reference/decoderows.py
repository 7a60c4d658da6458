"""Decode attention without copying every context every step: one contiguous K/V row per decoding request.

A decoding request attends over its whole context each step. Gathered from
the paged cache, that is a copy of every running context per layer per step
(a fifth of a decode step on the CPU, as much as `transformers` spends
concatenating its cache). Here each decoding request owns a row, kept between
steps: its context is copied in once, when it starts decoding, and each step
then appends the one token it computed. Attention multiplies the rows in
place, one batched matmul over all of them.

The paged cache stays the truth (prefix sharing, export, preemption, the
prefill of a later chunk); a row only mirrors it, and lives while its request
decodes in every step. A request that skips a step (it was preempted, or
finished) loses its row and gets a fresh copy when it decodes again. Rows and
their width grow on demand (every row as wide as the longest context) and are
kept for reuse, up to `max_bytes` for all layers. A step whose rows would not
fit gets no plan: the rows are dropped and the executor gathers the contexts
from the cache, layer by layer, as it would without rows (the worker's
default allows as much as the KV cache on a CPU and none on a GPU, where that
copy runs at device memory speed and memory is scarce).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.worker.engines.blocks import cache_slots

# Width grows in these steps (and at least doubles) so that a batch of decodes does not reallocate each step.
WIDTH_STEP = 64


def past_bias(past: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask of attention scores: -inf where `past` (a position beyond a request's length), else 0."""
    return torch.zeros(past.shape, dtype=dtype, device=past.device).masked_fill_(past, float("-inf"))


def attention(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Softmax attention over batched [..., queries, dim] x [..., positions, dim], `bias` added to the scores."""
    scores = torch.matmul(queries, keys.transpose(-1, -2)).mul_(queries.shape[-1] ** -0.5).add_(bias)
    return torch.matmul(torch.softmax(scores, dim=-1), values)


@dataclass(frozen=True)
class DecodePlan:
    """Where this step's decoding requests live: row of each (in item order) and what to copy in first."""

    rows: torch.Tensor  # [B] row of each decoding request
    positions: torch.Tensor  # [B] position of the token each computes
    fill_rows: torch.Tensor | None  # per copied position: its row ...
    fill_positions: torch.Tensor | None  # ... its position ...
    fill_slots: torch.Tensor | None  # ... and its cache slot
    used: int  # rows [0, used) take part in attention
    width: int  # positions [0, width) take part in attention
    bias: torch.Tensor  # [used, 1, 1, width]: 0 at the positions each row holds, -inf past them


class DecodeRows:
    """Per layer, K and V of [rows, kv_heads, width, head_dim]; row r holds one request's context."""

    def __init__(
        self,
        layers: int,
        kv_heads: int,
        head_dim: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        max_bytes: int,
    ) -> None:
        self.layers, self.kv_heads, self.head_dim, self.block_size = layers, kv_heads, head_dim, block_size
        self.dtype, self.device, self.max_bytes = dtype, device, max_bytes
        self._itemsize = torch.empty((), dtype=dtype).element_size()
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self._row_of: dict[int, int] = {}  # request serial -> row
        self._length: list[int] = []  # positions each row holds
        self._allocate(0, 0)

    @property
    def capacity(self) -> tuple[int, int]:
        """(rows, width) allocated."""
        return self.k[0].shape[0], self.k[0].shape[2]

    def _bytes(self, rows: int, width: int) -> int:
        """Rows of every layer, K and V."""
        return 2 * self.layers * rows * self.kv_heads * width * self.head_dim * self._itemsize

    def _allocate(self, rows: int, width: int) -> None:
        """Rows of every layer, keeping what the old ones held."""
        shape = (rows, self.kv_heads, width, self.head_dim)
        old = self.k + self.v
        self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.layers)]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.layers)]
        for new, kept in zip(self.k + self.v, old, strict=False):  # none kept on the first allocation
            new[: kept.shape[0], :, : kept.shape[2]] = kept

    def drop(self) -> None:
        """Forget every row and free their memory."""
        self._row_of.clear()
        self._length.clear()
        self.k, self.v = [], []
        self._allocate(0, 0)

    def plan(self, decodes: list[tuple[int, int, list[int]]]) -> DecodePlan | None:
        """Rows for this step's decodes, each (request serial, position of its new token, block table);
        None when they would not fit in `max_bytes` (every row is dropped then)."""
        width = max(start for _, start, _ in decodes) + 1
        if self._bytes(len(decodes), width) > self.max_bytes:
            self.drop()
            return None
        now = {serial for serial, _, _ in decodes}
        for serial in [s for s in self._row_of if s not in now]:
            self._length[self._row_of.pop(serial)] = 0
        taken = set(self._row_of.values())
        free = (row for row in range(len(self._length) + len(decodes)) if row not in taken)
        rows: list[int] = []
        fills: list[tuple[int, int, list[int]]] = []  # (row, positions to copy, block table)
        for serial, start, blocks in decodes:
            row = self._row_of.get(serial)
            if row is None or self._length[row] != start:  # new, or its context changed since the last step
                row = row if row is not None else next(free)
                self._row_of[serial] = row
                fills.append((row, start, blocks))
            rows.append(row)
        used = max(rows) + 1
        if not self._grow(used, width):
            self.drop()
            return None
        self._length += [0] * (used - len(self._length))
        for row, (_, start, _) in zip(rows, decodes, strict=True):
            self._length[row] = start + 1
        # A row no request holds attends to one (zero) position, not to none (NaN).
        lengths = torch.tensor([max(n, 1) for n in self._length[:used]], device=self.device)
        bias = past_bias(torch.arange(width, device=self.device)[None, :] >= lengths[:, None], self.dtype)

        def tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=self.device)

        fill_rows = fill_positions = fill_slots = None
        if fills:
            fill_rows = tensor([row for row, length, _ in fills for _ in range(length)])
            fill_positions = torch.cat([torch.arange(length, device=self.device) for _, length, _ in fills])
            fill_slots = tensor(
                [s for _, length, blocks in fills for s in cache_slots(blocks, self.block_size, 0, length)]
            )
        return DecodePlan(
            tensor(rows),
            tensor([start for _, start, _ in decodes]),
            fill_rows,
            fill_positions,
            fill_slots,
            used,
            width,
            bias[:, None, None, :],
        )

    def _grow(self, rows: int, width: int) -> bool:
        """Make room for `rows` x `width`; False when that would pass `max_bytes`."""
        have_rows, have_width = self.capacity
        if rows <= have_rows and width <= have_width:
            return True
        exact = max(rows, have_rows), max(-(-width // WIDTH_STEP) * WIDTH_STEP, have_width)
        # At least doubled where it grows, so that requests joining one at a time do not copy every row
        # each time; the exact size when doubling would pass the budget.
        roomy = (
            max(exact[0], 2 * have_rows) if rows > have_rows else have_rows,
            max(exact[1], 2 * have_width) if width > have_width else have_width,
        )
        for size in (roomy, exact):
            if self._bytes(*size) <= self.max_bytes:
                self._allocate(*size)
                return True
        return False

    def write(
        self, layer: int, plan: DecodePlan, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor,
        v: torch.Tensor,
    ) -> None:  # fmt: skip
        """Copy in the contexts of new rows from the cache ([kv_heads, slots, head_dim]), then append
        each request's new K and V ([B, kv_heads, head_dim])."""
        for rows, cache, new in ((self.k[layer], k_cache, k), (self.v[layer], v_cache, v)):
            if plan.fill_slots is not None:
                rows[plan.fill_rows, :, plan.fill_positions] = cache[:, plan.fill_slots].transpose(0, 1)
            rows[plan.rows, :, plan.positions] = new

    def attend(self, layer: int, plan: DecodePlan, q: torch.Tensor) -> torch.Tensor:
        """Attention of each request's query [B, heads, head_dim] over its row: [B, heads, head_dim].

        The query heads of one KV head fold into the query axis, so no K/V copy per query head is
        needed; the rows are read in place (a strided view, no copy)."""
        batch, heads, dim = q.shape
        group = heads // self.kv_heads
        queries = q.new_zeros(plan.used, self.kv_heads, group, dim)
        queries[plan.rows] = q.view(batch, self.kv_heads, group, dim)
        keys = self.k[layer][: plan.used, :, : plan.width]
        values = self.v[layer][: plan.used, :, : plan.width]
        return attention(queries, keys, values, plan.bias)[plan.rows].reshape(batch, heads, dim)
