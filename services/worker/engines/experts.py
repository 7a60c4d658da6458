"""The expert map: which ranks of an expert-parallel instance hold each expert (no torch here)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shared.errors import InvalidArgument
from shared.policies.placement import EMPTY, MigrationAwarePolicy, Topology


@dataclass(frozen=True)
class ExpertMap:
    """Which ranks hold each expert of each layer (holders[layer][expert]), with a version."""

    holders: tuple[tuple[tuple[int, ...], ...], ...]
    version: int = 0

    @classmethod
    def round_robin(cls, layers: int, experts: int, ranks: int) -> ExpertMap:
        """Expert e on rank e % ranks, in every layer."""
        return cls(tuple(tuple((e % ranks,) for e in range(experts)) for _ in range(layers)))

    @classmethod
    def initial(cls, layers: int, experts: int, ranks: int, redundant_slots: int = 0) -> ExpertMap:
        """Where an instance starts: round robin, and `redundant_slots` more per rank holding copies.

        No load is known yet, so the copies are what the default placement policy gives under an even
        load (each on a rank without the expert); the controller's rebalancing moves them onto the hot
        experts once the instance reports its load."""
        if not redundant_slots:
            return cls.round_robin(layers, experts, ranks)
        per_rank = -(-experts // ranks) + redundant_slots
        if per_rank > experts:
            raise InvalidArgument(
                f"{redundant_slots} redundant expert slots per rank: a rank would hold {per_rank} slots of "
                f"{experts} experts, and it holds an expert at most once"
            )
        current = np.full((layers, ranks * per_rank), EMPTY)  # the spare slots empty: the policy fills them
        for layer in range(layers):
            for rank in range(ranks):
                held = list(range(rank, experts, ranks))
                current[layer, rank * per_rank : rank * per_rank + len(held)] = held
        placed = MigrationAwarePolicy().place(np.ones((layers, experts)), current, Topology(ranks, 1, per_rank))
        return cls.from_slots(0, ranks, per_rank, placed.slots.tolist(), experts)

    def held_by(self, rank: int) -> dict[int, list[int]]:
        """Layer -> experts this rank holds."""
        return {
            layer: [e for e, ranks in enumerate(experts) if rank in ranks] for layer, experts in enumerate(self.holders)
        }

    @classmethod
    def from_slots(
        cls, version: int, ranks: int, slots_per_rank: int, layers: list[list[int]], experts: int
    ) -> ExpertMap:
        """From the wire form: per layer, the expert of each slot (slot s on rank s // slots_per_rank; EMPTY: none)."""
        holders = []
        for layer, slots in enumerate(layers):
            if len(slots) != ranks * slots_per_rank:
                raise InvalidArgument(f"layer {layer}: {len(slots)} slots, expected {ranks} x {slots_per_rank}")
            of = [
                sorted({s // slots_per_rank for s, e in enumerate(slots) if e == expert}) for expert in range(experts)
            ]
            holders.append(tuple(tuple(r) for r in of))
        return cls(tuple(holders), version)

    def to_slots(self, ranks: int) -> tuple[int, list[list[int]]]:
        """(slots_per_rank, per layer the expert of each slot).

        A rank's spare slots repeat its last expert; a rank holding nothing has EMPTY slots."""
        per_rank = [[[e for e, rs in enumerate(experts) if r in rs] for r in range(ranks)] for experts in self.holders]
        width = max(len(held) for layer in per_rank for held in layer)
        return width, [
            [e for held in layer for e in (held + (held[-1:] or [EMPTY]) * (width - len(held)))] for layer in per_rank
        ]

    def validate(self, ranks: int) -> None:
        for layer, experts in enumerate(self.holders):
            for expert, holders in enumerate(experts):
                if not holders or any(not 0 <= r < ranks for r in holders) or len(set(holders)) != len(holders):
                    raise InvalidArgument(
                        f"layer {layer} expert {expert}: holders {holders} are not distinct ranks < {ranks}"
                    )


def node_count(names: Sequence[str]) -> int:
    """Nodes an instance spans, from each rank's machine name in rank order: the count when every node holds
    the same number of consecutive ranks (what node-aware placement assumes), else 1 (placement then treats
    the ranks as one node, which is only less careful about where copies go)."""
    nodes = len(set(names))
    per_node = len(names) // nodes
    groups = [names[i : i + per_node] for i in range(0, len(names), per_node)]
    if len(names) % nodes or any(len(set(group)) != 1 for group in groups):
        return 1
    return nodes
