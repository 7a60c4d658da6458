"""Expert placement policies over synthetic loads (pure, no services)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from shared.policies.placement import (
    EMPTY,
    EPLBMatchedPolicy,
    EPLBPolicy,
    MigrationAwarePolicy,
    Topology,
    balance_of,
    copy_counts,
    count_moves,
    lower_bound,
    max_assignment,
    vacate_last_rank,
)

pytestmark = pytest.mark.unit

TOPO = Topology(ranks=8, nodes=2, slots_per_rank=5)  # 40 slots for 32 experts: 8 spare copies


def zipf(rng: np.random.Generator, layers: int = 6, experts: int = 32) -> np.ndarray:
    weights = np.arange(1, experts + 1, dtype=float) ** -1.1
    return np.stack([1000 * weights[rng.permutation(experts)] for _ in range(layers)])


def test_spare_slots_go_to_the_heaviest_load_per_copy() -> None:
    load = np.array([100.0, 10.0, 10.0, 1.0])
    assert copy_counts(load, slots=7, ranks=4).tolist() == [4, 1, 1, 1]
    # No more copies than ranks: a rank holds an expert once, so the next heaviest take the rest.
    assert copy_counts(load, slots=7, ranks=2).tolist() == [2, 2, 2, 1]
    with pytest.raises(ValueError, match="cannot hold"):
        copy_counts(np.ones(5), slots=4, ranks=2)
    with pytest.raises(ValueError, match="twice on a rank"):
        copy_counts(np.ones(2), slots=6, ranks=2)


def test_both_policies_place_every_copy_and_balance_a_skewed_load() -> None:
    load = zipf(np.random.default_rng(1))
    empty = np.zeros((len(load), TOPO.slots), dtype=np.int64)
    for policy in (EPLBPolicy(), MigrationAwarePolicy()):
        result = policy.place(load, empty, TOPO)
        for layer, layer_load in enumerate(load):
            placed = np.bincount(result.slots[layer], minlength=len(layer_load))
            assert placed.tolist() == copy_counts(layer_load, TOPO.slots, TOPO.ranks).tolist()
            assert result.balance[layer] <= lower_bound(layer_load, TOPO) * 1.15


def test_an_unchanged_balanced_placement_is_left_alone() -> None:
    load = zipf(np.random.default_rng(2))
    current = EPLBPolicy().place(load, np.zeros((len(load), TOPO.slots), dtype=np.int64), TOPO).slots
    result = MigrationAwarePolicy(skip_below=0.05).place(load, current, TOPO)
    assert result.moves == 0 and (result.slots == current).all()
    assert result.skipped_layers == list(range(len(load)))


def test_after_drift_it_rebalances_as_well_as_from_scratch_moving_far_less() -> None:
    rng = np.random.default_rng(3)
    before = zipf(rng)
    after = 0.85 * before + 0.15 * zipf(rng)
    current = EPLBPolicy().place(before, np.zeros((len(before), TOPO.slots), dtype=np.int64), TOPO).slots
    baseline = EPLBPolicy().place(after, current, TOPO)
    ours = MigrationAwarePolicy().place(after, current, TOPO)
    assert ours.balance.mean() <= baseline.balance.mean() * 1.02
    assert ours.moves < baseline.moves / 2
    assert ours.moves == count_moves(current, ours.slots, TOPO)
    kept = np.mean([balance_of(current[i], after[i], TOPO) for i in range(len(after))])
    assert ours.balance.mean() < kept
    for layer in ours.slots:  # no rank holds two copies of one expert
        for rank in layer.reshape(TOPO.ranks, TOPO.slots_per_rank):
            assert len(set(rank.tolist())) == TOPO.slots_per_rank


def test_few_ranks_get_each_copy_on_a_rank_without_the_expert() -> None:
    # Two ranks of five slots for eight experts, the spare slots starting as copies of experts 0 and 1. Dropping
    # those can free both slots on the rank that already holds the expert due a second copy: another expert
    # then moves over to make room on the other rank, where the copy splits the expert's load.
    topo = Topology(ranks=2, nodes=2, slots_per_rank=5)
    start = np.array([0, 1, 2, 4, 6, 0, 1, 3, 5, 7])
    rng = np.random.default_rng(6)
    loads = [np.array([89.0, 37, 49, 52, 298, 200, 196, 103])] + [rng.pareto(1.2, 8) * 100 + 1 for _ in range(40)]
    for load in loads:
        result = MigrationAwarePolicy().place(load[None, :], start[None, :], topo)
        for rank in result.slots[0].reshape(topo.ranks, topo.slots_per_rank):
            assert len(set(rank.tolist())) == topo.slots_per_rank, (load, result.slots[0])
        if result.skipped_layers:  # kept: what it would reach is not worth the moves
            assert (result.slots[0] == start).all() and result.moves == 0
        else:
            assert np.bincount(result.slots[0], minlength=8).tolist() == copy_counts(load, 10, 2).tolist()
            assert result.balance[0] <= balance_of(start, load, topo) - MigrationAwarePolicy.skip_below
    assert not MigrationAwarePolicy().place(loads[0][None, :], start[None, :], topo).skipped_layers


def test_bad_topologies_are_refused() -> None:
    with pytest.raises(ValueError, match="split evenly"):
        Topology(ranks=6, nodes=4, slots_per_rank=2)
    with pytest.raises(ValueError, match="positive"):
        Topology(ranks=0, nodes=1, slots_per_rank=2)


def test_a_joined_rank_is_filled_and_a_leaving_rank_is_emptied() -> None:
    load = zipf(np.random.default_rng(4))
    smaller = Topology(ranks=7, nodes=1, slots_per_rank=5)
    current = EPLBPolicy().place(load, np.zeros((len(load), smaller.slots), dtype=np.int64), smaller).slots
    grown = np.concatenate([current, np.full((len(load), 5), EMPTY)], axis=1)  # rank 7 joined, holds nothing
    topo = Topology(ranks=8, nodes=1, slots_per_rank=5)
    assert balance_of(grown[0], load[0], topo) > balance_of(current[0], load[0], smaller)  # an idle rank
    filled = MigrationAwarePolicy().place(load, grown, topo)
    assert (filled.slots != EMPTY).all()
    assert filled.moves == count_moves(grown, filled.slots, topo) > 0
    assert filled.balance.mean() <= np.mean([lower_bound(layer, topo) for layer in load]) * 1.05

    vacated = vacate_last_rank(MigrationAwarePolicy(), load, filled.slots, topo)
    assert (vacated.slots[:, 35:] == EMPTY).all() and (vacated.slots[:, :35] != EMPTY).all()
    for layer, layer_load in zip(vacated.slots, load, strict=True):
        assert np.bincount(layer[:35], minlength=32).tolist() == copy_counts(layer_load, 35, 7).tolist()
    assert vacated.moves == count_moves(filled.slots, vacated.slots, topo)
    with pytest.raises(ValueError, match="cannot hold 32 experts"):
        vacate_last_rank(MigrationAwarePolicy(), load, current[:, :30], Topology(ranks=6, nodes=1, slots_per_rank=5))


def test_the_assignment_is_the_best_of_every_permutation() -> None:
    rng = np.random.default_rng(4)
    for n in (1, 2, 3, 5, 6):
        for _ in range(20):
            score = rng.integers(0, 10, (n, n))
            chosen = max_assignment(score)
            assert sorted(chosen.tolist()) == list(range(n))
            best = max(sum(score[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n)))
            assert score[np.arange(n), chosen].sum() == best


def test_eplb_matched_keeps_eplbs_balance_and_node_grouping_with_fewer_moves() -> None:
    rng = np.random.default_rng(5)
    before = zipf(rng)
    after = 0.9 * before + 0.1 * zipf(rng)
    current = EPLBPolicy().place(before, np.zeros((len(before), TOPO.slots), dtype=np.int64), TOPO).slots
    raw, matched = EPLBPolicy().place(after, current, TOPO), EPLBMatchedPolicy().place(after, current, TOPO)
    assert np.allclose(matched.balance, raw.balance)
    assert matched.moves < raw.moves
    per_node = TOPO.slots_per_rank * TOPO.ranks // TOPO.nodes
    for layer in range(len(after)):  # the same node groups, each on one node
        groups = {frozenset(raw.slots[layer, n * per_node : (n + 1) * per_node].tolist()) for n in range(TOPO.nodes)}
        moved = {frozenset(matched.slots[layer, n * per_node : (n + 1) * per_node].tolist()) for n in range(TOPO.nodes)}
        assert groups == moved


def test_eplb_matched_moves_nothing_when_the_packing_only_relabels_ranks() -> None:
    load = zipf(np.random.default_rng(6))
    packed = EPLBPolicy().place(load, np.zeros((len(load), TOPO.slots), dtype=np.int64), TOPO).slots
    # The same packing with its nodes swapped and each node's ranks in reverse: nothing needs to move.
    grid = packed.reshape(len(load), TOPO.nodes, TOPO.ranks // TOPO.nodes, TOPO.slots_per_rank)
    current = grid[:, ::-1, ::-1, :].reshape(len(load), TOPO.slots)
    assert EPLBPolicy().place(load, current, TOPO).moves > 0
    assert EPLBMatchedPolicy().place(load, current, TOPO).moves == 0
