"""The expert map: which ranks of an expert-parallel instance hold each expert (no torch here)."""

from __future__ import annotations

from dataclasses import dataclass

from shared.errors import InvalidArgument
from shared.policies.placement import EMPTY  # every slot of a rank that holds nothing: it just joined, or will leave


@dataclass(frozen=True)
class ExpertMap:
    """Which ranks hold each expert of each layer (holders[layer][expert]), with a version."""

    holders: tuple[tuple[tuple[int, ...], ...], ...]
    version: int = 0

    @classmethod
    def round_robin(cls, layers: int, experts: int, ranks: int) -> ExpertMap:
        """Expert e on rank e % ranks, in every layer."""
        return cls(tuple(tuple((e % ranks,) for e in range(experts)) for _ in range(layers)))

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
