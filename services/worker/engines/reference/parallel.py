"""Expert parallelism: one model instance spread over N ranks (processes), torch.distributed.

Every rank holds the attention weights and a full KV cache, and runs every
step on the same batch; each layer's experts are spread over the ranks by
an `ExpertMap` (an expert may have copies on several ranks). In a MoE
layer each rank applies only its own experts to the tokens assigned to it
(a token routed to an expert with several copies goes to copy
`token % copies`, so copies share the tokens evenly), and one all-reduce
sums the partial outputs: dispatch and combine in one collective. Gloo on
CPU, NCCL on GPUs.

Rank 0 (the leader) is a normal worker: its engine schedules, samples and
serves gRPC. Before each step it broadcasts the step's plan (token ids,
positions, block tables) so the followers run the same forward pass; KV
blocks imported on the leader are broadcast too, so every rank's cache stays
identical. Followers run `follow()` until the leader sends `stop`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist

from services.worker.engines.base import KVBlock
from services.worker.engines.engine import StepResult
from services.worker.engines.reference.executor import ReferenceExecutor
from services.worker.engines.reference.model import LayerWeights
from services.worker.engines.scheduler import Item, Sequence


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

    def validate(self, ranks: int) -> None:
        for layer, experts in enumerate(self.holders):
            for expert, holders in enumerate(experts):
                if not holders or any(not 0 <= r < ranks for r in holders) or len(set(holders)) != len(holders):
                    raise ValueError(
                        f"layer {layer} expert {expert}: holders {holders} are not distinct ranks < {ranks}"
                    )


@dataclass
class _PlannedSeq:
    """What a follower needs of a sequence to run a step: its tokens and block table."""

    tokens: list[int]
    block_ids: list[int] = field(default_factory=list)


class ExpertParallelRunner:
    """The MoE layer of one rank: its experts on its tokens, then one all-reduce."""

    def __init__(self, rank: int, expert_map: ExpertMap, num_experts: int) -> None:
        self.rank = rank
        self.map = expert_map
        self.num_experts = num_experts

    def __call__(
        self, layer_index: int, layer: LayerWeights, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        holders = self.map.holders[layer_index]
        counts = torch.bincount(ids.flatten(), minlength=self.num_experts)
        token = torch.arange(ids.shape[0], device=ids.device)
        out = torch.zeros_like(x)
        # Experts in ascending order, like the single-process loop, so partial sums round the same way.
        for expert in sorted(layer.experts):
            copies = holders[expert]
            rows, slot = (ids == expert).nonzero(as_tuple=True)
            if len(copies) > 1:
                mine = (token[rows] % len(copies)) == copies.index(self.rank)
                rows, slot = rows[mine], slot[mine]
            if len(rows):
                out.index_add_(0, rows, layer.experts[expert](x[rows]) * weights[rows, slot, None])
        dist.all_reduce(out)
        return out, counts


class ExpertParallelExecutor(ReferenceExecutor):
    """The reference executor of one rank of an expert-parallel instance."""

    def __init__(
        self,
        model_path: Path,
        model_name: str,
        rank: int,
        world_size: int,
        expert_map: ExpertMap | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model_path, model_name, **kwargs)
        self.rank, self.world_size = rank, world_size
        self.expert_map = expert_map or ExpertMap.round_robin(self.num_layers, self.num_experts, world_size)
        self.expert_map.validate(world_size)
        self.experts_of_layer = self.expert_map.held_by(rank)
        self.expert_runner = ExpertParallelRunner(rank, self.expert_map, self.num_experts)
        self._map_version = self.expert_map.version

    # -- leader ---------------------------------------------------------------

    def execute(self, items: list[Item]) -> StepResult:
        plan = [(item.seq.tokens[item.start : item.start + item.length], item.start, item.length, item.sample,
                 list(item.seq.block_ids)) for item in items]  # fmt: skip
        dist.broadcast_object_list([("step", plan)], src=0)
        return super().execute(items)

    def write_block(self, block_id: int, block: KVBlock) -> None:
        dist.broadcast_object_list([("write", (block_id, block))], src=0)
        super().write_block(block_id, block)

    def close(self) -> None:
        """Tell the followers to stop (the engine calls this as it stops)."""
        dist.broadcast_object_list([("stop", None)], src=0)

    # -- followers ------------------------------------------------------------

    def follow(self) -> None:
        """Run the leader's steps until it says stop (followers only)."""
        while True:
            message: list[Any] = [None]
            dist.broadcast_object_list(message, src=0)
            kind, body = message[0]
            if kind == "stop":
                return
            if kind == "write":
                super().write_block(*body)
                continue
            items = []
            for tokens, start, length, sample, block_ids in body:
                seq = _PlannedSeq([0] * start + tokens, block_ids)
                items.append(Item(cast(Sequence, seq), start, length, sample))
            self.forward(items)
