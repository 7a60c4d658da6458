"""Where an expert-parallel instance starts: its share of the experts per rank, and redundant slots for copies."""

from __future__ import annotations

import pytest

from services.worker.engines.experts import ExpertMap, node_count
from shared.config import WorkerSettings
from shared.errors import InvalidArgument

pytestmark = pytest.mark.unit


def test_without_redundant_slots_every_expert_has_one_copy_round_robin() -> None:
    assert ExpertMap.initial(2, 8, 2) == ExpertMap.round_robin(2, 8, 2)


@pytest.mark.parametrize(("experts", "ranks", "redundant"), [(8, 2, 1), (8, 2, 2), (8, 3, 1), (16, 4, 1)])
def test_redundant_slots_hold_copies_of_experts_from_other_ranks(experts: int, ranks: int, redundant: int) -> None:
    start = ExpertMap.initial(3, experts, ranks, redundant)
    start.validate(ranks)  # every expert held, by distinct ranks
    per_rank = -(-experts // ranks) + redundant
    width, slots = start.to_slots(ranks)
    assert width == per_rank  # the wire map shows the spare slots, so the controller's policy can use them
    for layer in start.holders:
        # Each rank's own share stays where round robin put it; the spare slots are all filled with copies.
        assert all(expert % ranks in holders for expert, holders in enumerate(layer))
        assert sum(len(holders) for holders in layer) == ranks * per_rank
    assert ExpertMap.from_slots(0, ranks, width, slots, experts) == start


def test_more_slots_than_experts_on_a_rank_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="at most once"):
        ExpertMap.initial(2, 4, 2, redundant_slots=3)


def test_redundant_slots_need_expert_parallelism() -> None:
    with pytest.raises(ValueError, match="ep_redundant_slots"):
        WorkerSettings(engine="reference", ep_redundant_slots=1)
    assert WorkerSettings(engine="reference", ep_size=2, ep_redundant_slots=1).ep_redundant_slots == 1


@pytest.mark.parametrize(
    ("names", "nodes"),
    [
        (["a", "a", "a", "a"], 1),
        (["a", "a", "b", "b"], 2),
        (["a", "b", "c", "d"], 4),
        (["a", "b", "a", "b"], 1),  # a node's ranks are not consecutive: placement cannot group them
        (["a", "a", "a", "b"], 1),  # nodes of unequal size
    ],
)
def test_the_nodes_of_an_instance_come_from_where_its_ranks_run(names: list[str], nodes: int) -> None:
    assert node_count(names) == nodes
