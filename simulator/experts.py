"""Expert parallelism in the simulator: skewed, drifting expert loads, placement, and their cost in step time.

A pool with an `experts:` entry serves an MoE model whose replicas each span
`ranks` expert-parallel ranks. Expert loads follow the `sim` engine's model
(shared/expertload.py: Zipf-skewed per layer, two experts swapping ranks every
`drift_every_s`). The MoE part of a step waits for its most loaded rank, so a
step takes `1 + moe_fraction * (balance - 1)` times the profile's time, where
balance is max rank load / mean rank load averaged over layers, for the
pool's current placement (one placement per pool: its replicas see the same
traffic mix).

Every `rebalance_every_s` the pool's placement policy (the controller's
`shared.policies.placement`, `none` to never rebalance) plans a new
placement from the current loads; the copies it moves are staged beside the
old ones while serving continues, at the profile's transfer bandwidth spread
over the ranks, and the new placement applies once staged (the live
migration's stage / commit; the commit stall is not modelled).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.expertload import ExpertLoadModel
from shared.policies.placement import PLACEMENT_POLICIES, Topology, balance_of


class ExpertSpec(BaseModel):
    """An MoE pool's expert-parallel shape and rebalancing (the cluster file's `experts: {pool: ...}`)."""

    model_config = ConfigDict(extra="forbid")

    layers: int = Field(default=32, ge=1, le=512)
    experts: int = Field(default=64, ge=2, le=4096)
    top_k: int = Field(default=2, ge=1)
    ranks: int = Field(default=8, ge=1, le=1024, description="Expert-parallel ranks per replica.")
    nodes: int = Field(default=1, ge=1)
    slots_per_rank: int = Field(default=9, ge=1, description="Expert copies a rank holds per layer.")
    skew: float = Field(default=1.0, ge=0, description="Zipf exponent of expert popularity.")
    drift_every_s: float = Field(default=30.0, gt=0, description="Seconds between two experts swapping popularity.")
    moe_fraction: float = Field(default=0.5, ge=0, le=1, description="Share of a step spent in expert layers.")
    policy: Literal["none", "eplb", "migration-aware"] = "migration-aware"
    rebalance_every_s: float = Field(default=60.0, gt=0)
    expert_bytes: int = Field(default=176 * 2**20, ge=1, description="Bytes of one expert's weights (one layer).")
    seed: int = 0

    @model_validator(mode="after")
    def _fits(self) -> ExpertSpec:
        Topology(self.ranks, self.nodes, self.slots_per_rank)  # ranks split evenly over nodes
        if self.ranks * self.slots_per_rank < self.experts:
            raise ValueError(f"{self.ranks} ranks x {self.slots_per_rank} slots cannot hold {self.experts} experts")
        if self.top_k > self.experts:
            raise ValueError("top_k exceeds the number of experts")
        return self


@dataclass
class PoolExperts:
    spec: ExpertSpec
    bandwidth_bytes_per_s: float
    topo: Topology = field(init=False)
    model: ExpertLoadModel = field(init=False)
    slots: np.ndarray = field(init=False)
    pending: tuple[float, np.ndarray] | None = None  # (applies at, placement) while staging
    next_rebalance: float = 0.0
    moves: int = 0
    rebalances: int = 0
    samples: list[tuple[float, float]] = field(default_factory=list)  # (t, balance)

    def __post_init__(self) -> None:
        spec = self.spec
        self.topo = Topology(spec.ranks, spec.nodes, spec.slots_per_rank)
        self.model = ExpertLoadModel(spec.layers, spec.experts, spec.top_k, spec.skew, spec.drift_every_s, spec.seed)
        # Before any statistics: every expert once, then the spare slots round-robin (what a fresh instance loads).
        layer = np.arange(self.topo.slots) % spec.experts
        self.slots = np.tile(layer, (spec.layers, 1))
        self.next_rebalance = spec.rebalance_every_s

    def update(self, t: float) -> float:
        """Advance to time t (drift, staging, rebalance); the step-time factor until the next update."""
        loads = self.model.weights_at(t)
        if self.pending is not None and self.pending[0] <= t:
            self.slots, self.pending = self.pending[1], None
        if self.spec.policy != "none" and t >= self.next_rebalance and self.pending is None:
            self.next_rebalance = t + self.spec.rebalance_every_s
            result = PLACEMENT_POLICIES[self.spec.policy]().place(loads, self.slots, self.topo)
            if result.moves:
                self.moves += result.moves
                self.rebalances += 1
                staging = result.moves * self.spec.expert_bytes / (self.bandwidth_bytes_per_s * self.topo.ranks)
                self.pending = (t + staging, result.slots)
        balance = float(np.mean([balance_of(self.slots[i], loads[i], self.topo) for i in range(len(loads))]))
        self.samples.append((t, balance))
        return 1.0 + self.spec.moe_fraction * (balance - 1.0)

    @property
    def mean_balance(self) -> float:
        return float(np.mean([b for _, b in self.samples])) if self.samples else 1.0
