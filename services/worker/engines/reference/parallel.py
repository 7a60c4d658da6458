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

Live migration changes the map in three steps, each run between two engine
steps on every rank (the leader broadcasts it like a step): `stage` loads
the copies a rank gains under the target map beside the ones it serves with
(a few layers per call, so no pause is long); `commit` switches every rank to
the target map at the same step boundary; `release` frees the copies the new
map no longer uses, or, before a commit, discards the staged ones (rollback).
One migration at a time. Outcomes every rank must agree on (all staged?) are
agreed by an all-reduce, so no rank ever waits on a collective the others
skipped.

Elastic expert parallelism regroups the ranks between two steps (`resize`,
broadcast like a step): every rank leaves its process group and meets the
others in a new one, one rank larger or smaller. To grow, a new process
(`join`) hosts the new rendezvous and waits there; once the group forms, the
leader hands it the expert map and the KV blocks in use (held or cached), and
it holds no expert until a migration gives it some. To shrink, a migration first leaves the last
rank EMPTY; the regroup then leaves it out and it exits. No stage, commit or
release runs across a regroup (one at a time).
"""

from __future__ import annotations

import contextlib
import json
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from torch.distributed import TCPStore  # type: ignore[attr-defined]  # re-exported from torch._C untyped

from services.worker.engines.base import KVBlock
from services.worker.engines.engine import StepResult
from services.worker.engines.experts import ExpertMap, node_count
from services.worker.engines.reference.executor import ReferenceExecutor
from services.worker.engines.reference.model import ExpertWeights, LayerWeights, load_expert
from services.worker.engines.scheduler import Item, Sequence
from shared.errors import FailedPrecondition, InvalidArgument, Unavailable
from shared.telemetry.logging import get_logger

GROUP_TIMEOUT = timedelta(minutes=10)  # the first rank may wait for the others to load their weights
PROBE_TIMEOUT = timedelta(seconds=5)
JOINER_KEY = "shoal/joiner"  # what a joining rank says of itself at its rendezvous

log = get_logger("shoal.worker.parallel")


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def rendezvous(master: str) -> tuple[str, int]:
    """host:port -> (host, port)."""
    host, _, port = master.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(f"a rendezvous address is host:port, not {master!r}", param="master")
    return host, int(port)


@dataclass
class _PlannedSeq:
    """What a follower needs of a sequence to run a step: its tokens, block table and the leader's serial."""

    tokens: list[int]
    block_ids: list[int]
    serial: int


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
            if self.rank not in copies:
                continue  # a copy kept only until the release after a migration: the map says it is not ours
            rows, slot = (ids == expert).nonzero(as_tuple=True)
            if len(copies) > 1:
                mine = (token[rows] % len(copies)) == copies.index(self.rank)
                rows, slot = rows[mine], slot[mine]
            if len(rows):
                out.index_add_(0, rows, layer.experts[expert](x[rows]) * weights[rows, slot, None])
        dist.all_reduce(out)
        return out, counts


def _agree_max(value: int) -> int:
    """The largest `value` over all ranks (every rank calls this at the same point)."""
    tensor = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor[0])


class ExpertParallelExecutor(ReferenceExecutor):
    """The reference executor of one rank of an expert-parallel instance."""

    def __init__(
        self,
        model_path: Path,
        model_name: str,
        rank: int,
        world_size: int,
        expert_map: ExpertMap | None = None,
        host: str = "127.0.0.1",
        joining: bool = False,
        redundant_slots: int = 0,
        node_name: str = "",
        **kwargs: Any,
    ) -> None:
        """`host`: where ranks can reach this one (it hosts the rendezvous of a shrink);
        `joining`: a new last rank, which loads no expert and learns the map in `join`;
        `redundant_slots`: expert slots per rank beyond its share, for copies (`ExpertMap.initial`);
        `node_name`: the machine this rank runs on (default: the host name), for the instance's topology."""
        super().__init__(model_path, model_name, **kwargs)
        self.rank, self.world_size, self.host = rank, world_size, host
        self.expert_map = expert_map or ExpertMap.initial(
            self.num_layers, self.num_experts, world_size, redundant_slots
        )
        self.expert_map.validate(world_size)
        self.experts_of_layer = (
            {layer: [] for layer in range(self.num_layers)} if joining else self.expert_map.held_by(rank)
        )
        self.left = False  # this rank left the instance in a shrink
        self._store: TCPStore | None = None  # the rendezvous of a regrouped process group, kept while it lives
        self.runner = ExpertParallelRunner(rank, self.expert_map, self.num_experts)
        self.expert_runner = self.runner
        self._map_version = self.expert_map.version
        self._migration: str | None = None
        self._target: ExpertMap | None = None
        self._staged: dict[tuple[int, int], ExpertWeights] = {}
        self.node_name = node_name or socket.gethostname()
        self.nodes = 1  # machines the ranks span (node_count); learnt with the other ranks
        if not joining:
            self._gather_nodes()

    # -- leader ---------------------------------------------------------------

    def execute(self, items: list[Item]) -> StepResult:
        plan = [(item.seq.tokens[item.start : item.start + item.length], item.start, item.length, item.sample,
                 list(item.seq.block_ids), item.seq.serial) for item in items]  # fmt: skip
        dist.broadcast_object_list([("step", plan)], src=0)
        return super().execute(items)

    def write_block(self, block_id: int, block: KVBlock) -> None:
        dist.broadcast_object_list([("write", (block_id, block))], src=0)
        super().write_block(block_id, block)

    def close(self) -> None:
        """Tell the followers to stop (the engine calls this as it stops)."""
        dist.broadcast_object_list([("stop", None)], src=0)

    # -- live migration (leader side: validate, broadcast, run) ---------------

    def stage(
        self, migration_id: str, target: ExpertMap, layers: list[int], from_peer: bool = False
    ) -> tuple[int, int]:
        """Load the copies each rank gains under `target` in `layers` (all if empty): (copies, bytes), all ranks.

        From the checkpoint, or (`from_peer`) sent by the lowest rank that holds the expert under the
        served map, point to point: every rank walks the same list of (layer, expert, receiver), so
        sends and receives pair up in order."""
        if self._migration not in (None, migration_id):
            raise FailedPrecondition(f"migration {self._migration} is in flight; one at a time")
        if target.version <= self.expert_map.version:
            raise InvalidArgument(f"target map version {target.version} is not newer than {self.expert_map.version}")
        if len(target.holders) != self.num_layers or any(len(e) != self.num_experts for e in target.holders):
            raise InvalidArgument(f"the target map must cover {self.num_layers} layers x {self.num_experts} experts")
        target.validate(self.world_size)
        if any(layer >= self.num_layers for layer in layers):
            raise InvalidArgument(f"layers must be below {self.num_layers}")
        return self._collective("stage", (migration_id, target, layers or list(range(self.num_layers)), from_peer))

    def commit(self, migration_id: str, version: int) -> None:
        """Switch every rank to the staged target map, between two steps."""
        if self._migration != migration_id or self._target is None or self._target.version != version:
            raise FailedPrecondition(f"no staged migration {migration_id!r} to map version {version}")
        self._collective("commit", None)

    def release(self, migration_id: str, discard_staged: bool) -> tuple[int, int]:
        """Free copies the committed map no longer uses, or (discard_staged) roll an uncommitted migration back."""
        if self._migration not in (None, migration_id):
            raise FailedPrecondition(f"migration {self._migration} is in flight, not {migration_id!r}")
        if discard_staged and self._target is None:
            raise FailedPrecondition("nothing staged to discard: the migration is committed or unknown")
        return self._collective("release", discard_staged)

    def _collective(self, kind: str, body: Any) -> tuple[int, int]:
        dist.broadcast_object_list([(kind, body)], src=0)
        return self._apply(kind, body)

    # -- elastic expert parallelism --------------------------------------------

    def check_joiner(self, ranks: int, master: str) -> None:
        """Before a grow: does rank `ranks - 1` of this model wait at `master`? (leader, off the engine thread)"""
        if ranks != self.world_size + 1:
            return  # not a grow: `resize` says what is wrong
        host, port = rendezvous(master)
        try:
            joiner = json.loads(TCPStore(host, port, is_master=False, timeout=PROBE_TIMEOUT).get(JOINER_KEY))
        except (RuntimeError, ValueError) as exc:  # torch's DistError is a RuntimeError
            # Retryable: the joining process may still be loading its weights.
            raise Unavailable(f"no rank waits to join at {master} yet: {str(exc).splitlines()[0]}") from exc
        if joiner != {"rank": self.world_size, "model": self.model_name}:
            raise FailedPrecondition(
                f"the process at {master} joins as {joiner}, not as rank {self.world_size} of {self.model_name}"
            )

    def resize(self, ranks: int, master: str, blocks: list[int]) -> int:
        """Regroup every rank into `ranks` ranks, between two steps; returns the KV bytes sent to a joiner.

        `blocks`: the KV blocks in use (held or cached), the only ones a joiner needs."""
        if self._migration is not None:
            raise FailedPrecondition(f"migration {self._migration} is in flight; resize after it")
        hosted = None
        if ranks == self.world_size + 1:
            host, port = rendezvous(master)
        elif ranks == self.world_size - 1 and ranks >= 1:
            if any(self.expert_map.held_by(ranks).values()):
                raise FailedPrecondition(
                    f"rank {ranks} still serves experts: migrate to a map that leaves it empty before it leaves"
                )
            hosted = TCPStore(self.host, 0, is_master=True, wait_for_workers=False, timeout=GROUP_TIMEOUT)
            host, port = self.host, hosted.port
        else:
            raise InvalidArgument(
                f"an instance grows or shrinks by one rank at a time: {self.world_size} -> {ranks}", param="ranks"
            )
        dist.broadcast_object_list([("resize", (ranks, host, port))], src=0)
        return self._regroup(ranks, host, port, hosted, blocks)

    def join(self, master: str) -> None:
        """A new last rank: host the rendezvous at `master`, wait for the instance to regroup, take its state."""
        host, port = rendezvous(master)
        self._store = TCPStore(host, port, is_master=True, wait_for_workers=False, timeout=GROUP_TIMEOUT)
        self._store.set(JOINER_KEY, json.dumps({"rank": self.rank, "model": self.model_name}))
        dist.init_process_group(
            backend_for(self.device), store=self._store, rank=self.rank, world_size=self.world_size,
            timeout=GROUP_TIMEOUT,
        )  # fmt: skip
        self._welcome(self.rank)

    def _regroup(
        self, ranks: int, host: str, port: int, hosted: TCPStore | None = None, blocks: list[int] | None = None
    ) -> int:
        """Every rank: leave this process group for one of `ranks` ranks (a rank beyond them leaves for good)."""
        members = self.world_size
        dist.destroy_process_group()
        if self.rank >= ranks:
            self.left = True
            return 0
        self._store = hosted or TCPStore(host, port, is_master=False, timeout=GROUP_TIMEOUT)
        dist.init_process_group(
            backend_for(self.device), store=self._store, rank=self.rank, world_size=ranks, timeout=GROUP_TIMEOUT
        )
        self.world_size = ranks
        return self._welcome(members, blocks)

    def _gather_nodes(self) -> None:
        """Every rank of the (re)formed group: learn which machine each rank runs on."""
        names: list[Any] = [None] * self.world_size
        dist.all_gather_object(names, self.node_name)
        self.nodes = node_count(names)

    def _welcome(self, members: int, blocks: list[int] | None = None) -> int:
        """The leader hands ranks `members`.. what every rank holds: the expert map and the KV blocks in use.

        Returns the bytes sent (leader) or received (joiner)."""
        self._gather_nodes()
        state: list[Any] = [None]
        if self.rank == 0:
            num_blocks = self.k_cache[0].shape[1] // self.block_size
            state = [(self.expert_map, self.block_size, num_blocks, blocks or [])]
        dist.broadcast_object_list(state, src=0)
        expert_map, block_size, num_blocks, in_use = state[0]
        if self.rank >= members:
            self.expert_map = self.runner.map = expert_map
            self._map_version = expert_map.version
            self.allocate_blocks(num_blocks, block_size)
        if not in_use or self.world_size <= members:
            return 0
        slots = torch.tensor(self._slots(in_use, 0, len(in_use) * block_size), device=self.device)
        moved = 0
        for k, v in zip(self.k_cache, self.v_cache, strict=True):
            if self.rank == 0:
                packed = torch.stack([k[:, slots], v[:, slots]])
                for joiner in range(members, self.world_size):
                    dist.send(packed, joiner)
            elif self.rank >= members:
                packed = torch.empty((2, k.shape[0], len(slots), k.shape[2]), dtype=k.dtype, device=k.device)
                dist.recv(packed, 0)
                k[:, slots], v[:, slots] = packed[0], packed[1]
            else:
                continue
            moved += packed.numel() * packed.element_size()
        return moved

    # -- live migration (every rank) ------------------------------------------

    def _apply(self, kind: str, body: Any) -> tuple[int, int]:
        copies = size = 0
        model = self.model
        assert model is not None
        if kind == "stage":
            self._migration, self._target, layers, from_peer = body
            target = self._target
            assert target is not None
            gained = [
                (layer, expert)
                for layer in layers
                for expert, holders in enumerate(target.holders[layer])
                if self.rank in holders and expert not in model.layers[layer].experts
            ]
            # Whatever can fail on one rank (memory, an unreadable checkpoint) happens before any transfer,
            # and every rank learns of it: a rank that raised alone would leave the others in a collective.
            failed = 0
            try:
                if from_peer:
                    buffers = {key: self._expert_buffers() for key in gained}
                else:
                    for layer, expert in gained:
                        if (layer, expert) not in self._staged:
                            weights = load_expert(self.checkpoint, layer, expert, self.dtype, self.device)
                            self._staged[layer, expert] = weights
            except Exception:
                log.exception("this rank could not stage its expert copies", rank=self.rank)
                failed = self.rank + 1
            failed = _agree_max(failed)
            if failed:
                raise FailedPrecondition(
                    f"rank {failed - 1} could not stage its expert copies (out of memory, or its checkpoint "
                    "unreadable: see that rank's log); the migration must roll back"
                )
            if from_peer:
                self._receive_from_peers(target, layers, buffers)
            for key in gained:
                copies, size = copies + 1, size + self._staged[key].nbytes
        elif kind == "commit":
            assert self._target is not None
            missing = sum(
                1
                for layer, experts in enumerate(self._target.holders)
                for expert, holders in enumerate(experts)
                if self.rank in holders and expert not in model.layers[layer].experts
                and (layer, expert) not in self._staged
            )  # fmt: skip
            if _agree_max(missing):
                raise FailedPrecondition("stage every layer before committing")
            for (layer, expert), weights in self._staged.items():
                model.layers[layer].experts[expert] = weights
            self.expert_map = self.runner.map = self._target
            self._map_version = self._target.version
            self._target, self._staged = None, {}
        elif kind == "release":
            if body:  # rollback: the staged copies go, the served map stays
                copies = len(self._staged)
                size = sum(w.nbytes for w in self._staged.values())
                self._staged, self._target = {}, None
            else:
                for layer, experts in enumerate(self.expert_map.holders):
                    held = model.layers[layer].experts
                    for expert in [e for e in held if self.rank not in experts[e]]:
                        copies, size = copies + 1, size + held.pop(expert).nbytes
            self._migration = None
        totals = torch.tensor([copies, size], dtype=torch.int64)
        dist.all_reduce(totals)
        return int(totals[0]), int(totals[1])

    def _receive_from_peers(
        self, target: ExpertMap, layers: list[int], buffers: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        """Copy every gained expert from a rank that serves it now (see `stage`) into `buffers`, allocated
        beforehand (this rank's gains)."""
        model = self.model
        assert model is not None
        for layer in layers:
            served = self.expert_map.holders[layer]
            for expert, holders in enumerate(target.holders[layer]):
                source = min(served[expert])
                for receiver in sorted(set(holders) - set(served[expert])):
                    if self.rank == source:
                        weights = model.layers[layer].experts[expert]
                        dist.send(weights.w13.contiguous(), receiver)
                        dist.send(weights.w2.contiguous(), receiver)
                    elif self.rank == receiver:
                        # Sender and receivers walk the same list: a receiver takes every copy sent to it.
                        w13, w2 = buffers.get((layer, expert)) or self._expert_buffers()
                        dist.recv(w13, source)
                        dist.recv(w2, source)
                        self._staged[layer, expert] = ExpertWeights(w13, w2)

    def _expert_buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Empty w13 and w2 of one expert (a joined rank may hold none to copy the shapes from)."""
        hidden, inner = self.config.hidden_size, self.config.intermediate_size
        return (
            torch.empty(2 * inner, hidden, dtype=self.dtype, device=self.device),
            torch.empty(hidden, inner, dtype=self.dtype, device=self.device),
        )

    # -- followers ------------------------------------------------------------

    def follow(self) -> None:
        """Run the leader's steps until it says stop, or this rank leaves in a shrink (followers only)."""
        while True:
            message: list[Any] = [None]
            dist.broadcast_object_list(message, src=0)
            kind, body = message[0]
            if kind == "stop":
                return
            if kind == "write":
                super().write_block(*body)
                continue
            if kind == "resize":
                self._regroup(*body)
                if self.left:
                    return
                continue
            if kind in ("stage", "commit", "release"):
                with contextlib.suppress(FailedPrecondition):  # every rank agreed to refuse; the leader reports it
                    self._apply(kind, body)
                continue
            items = []
            for tokens, start, length, sample, block_ids, serial in body:
                seq = _PlannedSeq([0] * start + tokens, block_ids, serial)
                items.append(Item(cast(Sequence, seq), start, length, sample))
            self.forward(items)
