"""Expert placement policies: which experts each rank holds, per MoE layer. Pure functions.

A placement is, per layer, the expert held in each physical slot
(`slots[layer, rank * slots_per_rank + i]`); an expert's tokens are spread
evenly over its copies, so a rank's load is the sum over its slots of
load[expert] / copies[expert]. Balance is max rank load / mean rank load
(1.0 is perfect). An expert has at most one copy per rank: a second one
there would split none of its load. A move is one expert copy that must be
loaded on a rank that did not hold it before (the bytes a migration
transfers). A slot may be `EMPTY` (-1) in a current placement: the slots of a
rank that just joined an instance; the policies fill them.

* `eplb` (baseline): what DeepSeek's EPLB does, ignoring the current
  placement: give the spare slots to the experts with the highest load per
  copy, then pack copies heaviest first onto the least loaded node, and
  within each node onto the least loaded rank.
* `eplb-matched` (the fair baseline for a policy that knows the current
  placement): EPLB's packing, its nodes and then each node's ranks relabelled
  to the current ones that already hold the most of their copies (an optimal
  assignment at each level, so EPLB's node grouping and balance are kept),
  which is as few moves as EPLB's packing can be reached with.
* `migration-aware` (default): the same copy counts, but start from the
  current placement: drop surplus copies from the most loaded ranks, put new
  copies on the least loaded ranks with free slots (when every free slot is
  on a rank that holds the expert, another expert moves there first, so the
  copy lands on a rank without it), then swap copies between
  the most loaded rank and the others while a swap lowers the maximum by at
  least `min_gain_per_move` per copy moved, and stop once within
  `tolerance` of the balance a from-scratch packing reaches. A layer whose
  balance would improve by less than `skip_below` keeps its placement.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

EMPTY = -1  # a slot holding no expert (the wire form of an expert map uses the same value)


@dataclass(frozen=True)
class Topology:
    ranks: int
    nodes: int
    slots_per_rank: int

    def __post_init__(self) -> None:
        if self.ranks <= 0 or self.nodes <= 0 or self.slots_per_rank <= 0:
            raise ValueError("ranks, nodes and slots_per_rank must be positive")
        if self.ranks % self.nodes:
            raise ValueError(f"{self.ranks} ranks do not split evenly over {self.nodes} nodes")

    @property
    def slots(self) -> int:
        return self.ranks * self.slots_per_rank


@dataclass(frozen=True)
class PlacementResult:
    slots: np.ndarray  # [layers, ranks * slots_per_rank] expert ids
    balance: np.ndarray  # [layers] max/mean rank load
    moves: int  # expert copies loaded on a rank that did not hold them
    skipped_layers: list[int] = field(default_factory=list)


def copy_counts(load: np.ndarray, slots: int, ranks: int) -> np.ndarray:
    """Copies per expert for one layer: one each, spare slots to the highest load per copy, at most one copy per
    rank of `ranks` (a rank holds an expert once: a second copy there would split none of its load)."""
    experts = len(load)
    if slots < experts:
        raise ValueError(f"{slots} slots cannot hold {experts} experts")
    if slots > experts * ranks:
        raise ValueError(f"{slots} slots over {ranks} ranks would hold one of {experts} experts twice on a rank")
    counts = np.ones(experts, dtype=np.int64)
    heap = [(-float(w), e) for e, w in enumerate(load)]
    heapq.heapify(heap)
    for _ in range(slots - experts):
        _, e = heapq.heappop(heap)
        counts[e] += 1
        if counts[e] < ranks:
            heapq.heappush(heap, (-float(load[e]) / counts[e], e))
    return counts


def rank_loads(layer_slots: np.ndarray, load: np.ndarray, topo: Topology) -> np.ndarray:
    held = layer_slots != EMPTY
    counts = np.bincount(layer_slots[held], minlength=len(load))
    per_copy = load / np.maximum(counts, 1)
    per_slot = np.where(held, per_copy[np.where(held, layer_slots, 0)], 0.0)
    return np.asarray(per_slot.reshape(topo.ranks, topo.slots_per_rank).sum(axis=1))


def balance_of(layer_slots: np.ndarray, load: np.ndarray, topo: Topology) -> float:
    loads = rank_loads(layer_slots, load, topo)
    mean = loads.mean()
    return float(loads.max() / mean) if mean > 0 else 1.0


def layer_report(
    slots: list[list[int]], loads: list[list[float]], topo: Topology
) -> tuple[list[list[float]], list[float]]:
    """Per layer: routed tokens per rank, and balance (max / mean; 1.0 for an idle layer)."""
    pairs = [(np.array(s), np.array(w, dtype=float)) for s, w in zip(slots, loads, strict=True)]
    return [rank_loads(s, w, topo).tolist() for s, w in pairs], [balance_of(s, w, topo) for s, w in pairs]


def lower_bound(load: np.ndarray, topo: Topology) -> float:
    """A lower bound on any packing's balance for one layer: the heaviest copy, or the mean."""
    counts = copy_counts(load, topo.slots, topo.ranks)
    per_rank = load.sum() / topo.ranks
    return float(max((load / counts).max(), per_rank) / per_rank) if per_rank > 0 else 1.0


def count_moves(old: np.ndarray, new: np.ndarray, topo: Topology) -> int:
    """Copies in `new` that their rank did not hold in `old` (multisets per rank, every layer)."""
    moves = 0
    for old_layer, new_layer in zip(old, new, strict=True):
        for rank in range(topo.ranks):
            span = slice(rank * topo.slots_per_rank, (rank + 1) * topo.slots_per_rank)
            before = np.bincount(old_layer[span][old_layer[span] != EMPTY], minlength=1)
            after = np.bincount(new_layer[span][new_layer[span] != EMPTY], minlength=1)
            size = max(len(before), len(after))
            moves += int(
                np.maximum(np.pad(after, (0, size - len(after))) - np.pad(before, (0, size - len(before))), 0).sum()
            )
    return moves


class PlacementPolicy(Protocol):
    name: str

    def place(self, load: np.ndarray, current: np.ndarray, topo: Topology) -> PlacementResult:
        """New placement for `load` [layers, experts] given `current` [layers, slots]."""


def _pack(items: list[tuple[float, int]], bins: int, capacity: int) -> list[list[int]]:
    """Heaviest item first onto the least loaded bin with room. Items: (weight, id)."""
    content: list[list[int]] = [[] for _ in range(bins)]
    heap = [(0.0, b) for b in range(bins)]
    for weight, item in sorted(items, key=lambda x: -x[0]):
        total, b = heapq.heappop(heap)
        content[b].append(item)
        if len(content[b]) < capacity:  # a full bin leaves the heap
            heapq.heappush(heap, (total + weight, b))
    return content


class EPLBPolicy:
    """Baseline: a balanced packing from scratch (node level, then rank level)."""

    name = "eplb"

    def place(self, load: np.ndarray, current: np.ndarray, topo: Topology) -> PlacementResult:
        out = np.empty((load.shape[0], topo.slots), dtype=np.int64)
        per_node = topo.ranks // topo.nodes
        for layer, layer_load in enumerate(load):
            counts = copy_counts(layer_load, topo.slots, topo.ranks)
            copies = [(float(layer_load[e]) / counts[e], e) for e in range(len(layer_load)) for _ in range(counts[e])]
            nodes = _pack(copies, topo.nodes, per_node * topo.slots_per_rank)
            weight = {e: float(layer_load[e]) / counts[e] for e in range(len(layer_load))}
            for node, node_copies in enumerate(nodes):
                ranks = _pack([(weight[e], e) for e in node_copies], per_node, topo.slots_per_rank)
                for offset, rank_copies in enumerate(ranks):
                    rank = node * per_node + offset
                    out[layer, rank * topo.slots_per_rank : (rank + 1) * topo.slots_per_rank] = rank_copies
        return _result(out, load, current, topo)


@dataclass
class EPLBMatchedPolicy:
    """Baseline: EPLB's packing, relabelled onto the current placement to move as few copies as it can.

    `keep_nodes`: relabel whole nodes, then ranks within them (EPLB's node groups stay on one node); False:
    any rank onto any rank, fewer moves still, as a policy that ignores nodes is free to do."""

    keep_nodes: bool = True
    name: str = "eplb-matched"

    def place(self, load: np.ndarray, current: np.ndarray, topo: Topology) -> PlacementResult:
        packed = EPLBPolicy().place(load, current, topo).slots
        out = np.empty_like(packed)
        nodes = topo.nodes if self.keep_nodes else 1
        per_node = topo.ranks // nodes
        for layer in range(len(load)):
            new = _rank_counts(packed[layer], topo, load.shape[1])
            old = _rank_counts(current[layer], topo, load.shape[1])
            kept = np.minimum(new[:, None, :], old[None, :, :]).sum(axis=2)  # [new rank, old rank] copies kept
            # Per pair of nodes (new, old): the best matching of their ranks and what it keeps.
            inner: dict[tuple[int, int], np.ndarray] = {}
            node_kept = np.zeros((nodes, nodes))
            for a in range(nodes):
                for b in range(nodes):
                    block = kept[a * per_node : (a + 1) * per_node, b * per_node : (b + 1) * per_node]
                    inner[a, b] = max_assignment(block)
                    node_kept[a, b] = block[np.arange(per_node), inner[a, b]].sum()
            for a, b in enumerate(max_assignment(node_kept)):
                for offset, target in enumerate(inner[a, int(b)]):
                    source = (a * per_node + offset) * topo.slots_per_rank
                    to = (int(b) * per_node + int(target)) * topo.slots_per_rank
                    out[layer, to : to + topo.slots_per_rank] = packed[layer, source : source + topo.slots_per_rank]
        return _result(out, load, current, topo)


def _rank_counts(slots: np.ndarray, topo: Topology, experts: int) -> np.ndarray:
    """[ranks, experts] copies each rank holds."""
    grid = slots.reshape(topo.ranks, topo.slots_per_rank)
    counts = np.zeros((topo.ranks, experts), dtype=np.int64)
    rows, cols = np.nonzero(grid != EMPTY)
    np.add.at(counts, (rows, grid[rows, cols]), 1)
    return counts


def max_assignment(score: np.ndarray) -> np.ndarray:
    """For a square `score` [rows, columns], the column of each row that maximises the total (each column
    once): the Hungarian algorithm with potentials, O(n^3)."""
    n = score.shape[0]
    cost = score.max() - score.astype(np.float64)
    u, v = np.zeros(n + 1), np.zeros(n + 1)
    owner = np.zeros(n + 1, dtype=np.int64)  # owner[column] = row (1-based; 0: none)
    for row in range(1, n + 1):
        owner[0] = row
        column = 0
        best = np.full(n + 1, np.inf)
        via = np.zeros(n + 1, dtype=np.int64)
        used = np.zeros(n + 1, dtype=bool)
        while owner[column] != 0:
            used[column] = True
            r = owner[column]
            reduced = cost[r - 1] - u[r] - v[1:]
            free = ~used[1:]
            better = free & (reduced < best[1:])
            best[1:][better] = reduced[better]
            via[1:][better] = column
            candidates = np.where(free, best[1:], np.inf)
            nxt = int(np.argmin(candidates)) + 1
            delta = candidates[nxt - 1]
            u[owner[used]] += delta
            v[used] -= delta
            best[1:][free] -= delta
            column = nxt
        while column:
            previous = via[column]
            owner[column] = owner[previous]
            column = previous
    assignment = np.empty(n, dtype=np.int64)
    for column in range(1, n + 1):
        assignment[owner[column] - 1] = column - 1
    return assignment


@dataclass
class MigrationAwarePolicy:
    """Default: rebalance from the current placement, moving few copies (see the module doc)."""

    tolerance: float = 0.015  # stop within this of the from-scratch balance
    min_gain_per_move: float = 0.0005  # of the mean rank load, per copy moved
    skip_below: float = 0.02  # skip a layer whose balance would improve by less
    name: str = "migration-aware"

    def place(self, load: np.ndarray, current: np.ndarray, topo: Topology) -> PlacementResult:
        out = current.copy()
        skipped = []
        for layer, layer_load in enumerate(load):
            target = lower_bound(layer_load, topo)
            complete = len(np.unique(current[layer])) == len(layer_load)  # a new layout, or a new expert
            kept = balance_of(current[layer], layer_load, topo)
            if complete and kept - target < self.skip_below:
                skipped.append(layer)
                continue
            placed = self._rebalance(current[layer], layer_load, topo, target)
            if complete and kept - balance_of(placed, layer_load, topo) < self.skip_below:
                skipped.append(layer)  # the greedy steps found too little (or worse): moving would not pay
                continue
            out[layer] = placed
        return _result(out, load, current, topo, skipped)

    def _rebalance(self, slots: np.ndarray, load: np.ndarray, topo: Topology, target: float) -> np.ndarray:
        s = topo.slots_per_rank
        counts = copy_counts(load, topo.slots, topo.ranks)
        grid = slots.reshape(topo.ranks, s).copy()
        have = np.bincount(grid[grid != EMPTY], minlength=len(load))
        weight = load / counts
        loads = np.array([weight[row[row != EMPTY]].sum() for row in grid])
        # 1. Drop surplus copies, from the most loaded ranks first, and a rank's second copy of an expert.
        free: list[tuple[int, int]] = [(int(r), int(i)) for r, i in zip(*np.nonzero(grid == EMPTY), strict=True)]
        for r in range(topo.ranks):
            seen: set[int] = set()
            for i, e in enumerate(grid[r].tolist()):
                if e == EMPTY:
                    continue
                if e in seen:
                    grid[r, i] = EMPTY
                    loads[r] -= weight[e]
                    have[e] -= 1
                    free.append((r, i))
                seen.add(e)
        for e in np.nonzero(have > counts)[0]:
            for _ in range(int(have[e] - counts[e])):
                holders = [r for r in range(topo.ranks) if e in grid[r]]
                r = max(holders, key=lambda h: loads[h])
                i = int(np.nonzero(grid[r] == e)[0][0])
                grid[r, i] = EMPTY
                loads[r] -= weight[e]
                free.append((r, i))
        # 2. New copies, heaviest first, onto the least loaded rank with a free slot (not holding it yet).
        missing = [int(e) for e in np.nonzero(counts > have)[0] for _ in range(int(counts[e] - have[e]))]
        for e in sorted(missing, key=lambda x: -weight[x]):
            options = [k for k, (r, _) in enumerate(free) if e not in grid[r]]
            if not options and _free_a_slot_without(e, free, grid, loads, weight):
                options = [len(free) - 1]
            k = min(options or range(len(free)), key=lambda j: loads[free[j][0]])
            r, i = free.pop(k)
            grid[r, i] = e
            loads[r] += weight[e]
        # 3. Swaps between the most loaded rank and any other, while each pays for its two moves.
        mean = loads.mean()
        w = weight[grid]  # [ranks, s]
        for _ in range(topo.ranks * s):
            if mean <= 0 or loads.max() / mean <= target * (1 + self.tolerance):
                break  # balanced (or no load seen yet: nothing to balance by)
            hot = int(loads.argmax())
            # new max of the pair after swapping slot a of `hot` with slot b of rank r: [r, a, b]
            delta = w[hot][None, :, None] - w[:, None, :]
            pair_max = np.maximum(loads[hot] - delta, loads[:, None, None] + delta)
            # No rank may end up holding two copies of one expert.
            a_there = (grid[:, :, None] == grid[hot][None, None, :]).any(axis=1)[:, :, None]
            b_here = np.isin(grid, grid[hot])[:, None, :]
            pair_max[a_there | b_here | (delta <= 0)] = np.inf
            pair_max[hot] = np.inf
            r, a, b = (int(i) for i in np.unravel_index(int(pair_max.argmin()), pair_max.shape))
            gain = loads[hot] - pair_max[r, a, b]
            if not np.isfinite(pair_max[r, a, b]) or gain < 2 * self.min_gain_per_move * mean:
                break
            d = delta[r, a, b]
            loads[hot] -= d
            loads[r] += d
            grid[hot, a], grid[r, b] = grid[r, b], grid[hot, a]
            w[hot, a], w[r, b] = w[r, b], w[hot, a]
        return grid.ravel()


def _free_a_slot_without(
    e: int, free: list[tuple[int, int]], grid: np.ndarray, loads: np.ndarray, weight: np.ndarray
) -> bool:
    """When every free slot is on a rank that holds `e` (a second copy there would split none of its load), move
    another expert from a rank without `e` into one of them, and leave that expert's slot free (last in `free`).

    Of the possible moves, the one whose two ranks end up least loaded, once `e` fills the slot. False when there
    is none."""
    best: tuple[float, int, int, int] | None = None
    for k, (r, _) in enumerate(free):
        for r2 in range(len(grid)):
            if e in grid[r2]:
                continue
            for j, x in enumerate(grid[r2].tolist()):
                if x == EMPTY or x in grid[r]:
                    continue
                worst = max(loads[r] + weight[x], loads[r2] - weight[x] + weight[e])
                if best is None or worst < best[0]:
                    best = (worst, k, r2, j)
    if best is None:
        return False
    _, k, r2, j = best
    r, i = free.pop(k)
    x = int(grid[r2, j])
    grid[r, i], grid[r2, j] = x, EMPTY
    loads[r] += weight[x]
    loads[r2] -= weight[x]
    free.append((r2, j))
    return True


def _result(
    out: np.ndarray, load: np.ndarray, current: np.ndarray, topo: Topology, skipped: list[int] | None = None
) -> PlacementResult:
    balance = np.array([balance_of(out[layer], load[layer], topo) for layer in range(len(load))])
    return PlacementResult(out, balance, count_moves(current, out, topo), skipped or [])


def vacate_last_rank(policy: PlacementPolicy, load: np.ndarray, current: np.ndarray, topo: Topology) -> PlacementResult:
    """A placement leaving the last rank EMPTY, so it can leave the instance: the policy over the other ranks.

    Balance is over the ranks that stay."""
    rest = Topology(ranks=topo.ranks - 1, nodes=1, slots_per_rank=topo.slots_per_rank) if topo.ranks > 1 else None
    if rest is None or rest.slots < load.shape[1]:
        raise ValueError(f"{topo.ranks - 1} ranks x {topo.slots_per_rank} slots cannot hold {load.shape[1]} experts")
    inner = policy.place(load, current[:, : rest.slots], rest)
    slots = np.concatenate([inner.slots, np.full((len(load), topo.slots_per_rank), EMPTY)], axis=1)
    return PlacementResult(slots, inner.balance, count_moves(current, slots, topo), inner.skipped_layers)


PLACEMENT_POLICIES: dict[str, type[EPLBPolicy] | type[EPLBMatchedPolicy] | type[MigrationAwarePolicy]] = {
    "eplb": EPLBPolicy,
    "eplb-matched": EPLBMatchedPolicy,
    "migration-aware": MigrationAwarePolicy,
}
