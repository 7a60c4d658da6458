"""Expert placement: the migration-aware policy against EPLB matched to the current placement.

DeepSeek-V3's prefill deployment shape: 58 MoE layers x 256 experts, 32 ranks
on 4 nodes, 9 slots per rank (288 per layer: 32 redundant copies). Loads are
Zipf-skewed per layer (a random expert order per layer). The current
placement is the baseline's packing of window 1; window 2 drifts 10% (a
tenth of each layer's load is redistributed with a fresh Zipf order). The
policies then place window 2: balance (max rank load / mean, averaged over
layers; the lower bound any packing could reach beside it), expert copies
moved from the current placement, and runtime, in one run. The baseline the
summary compares with is EPLB's packing matched to the current placement:
its ranks relabelled by an optimal assignment to keep the most copies where
they are, any rank onto any rank (the migration-aware policy ignores nodes
too), the fewest moves EPLB's answer can be reached with. Beside it: EPLB's
raw output, and the matching that keeps EPLB's node groups on one node.

Then, on the reference engine (tiny model, one instance over 2 ranks with
gloo, when a model folder is given): time between tokens p50/p99 of 4
concurrent greedy streams, without a migration, while migrations run back
to back (each moves experts 0 and 1 between the ranks in every layer:
stage, commit, release), and while the instance grows to 3 ranks and shrinks
back, over and over (each cycle starts a joining process, regroups with it,
then regroups without it: the elastic steps without their migrations), same
run; with the largest gap between two tokens.

Run: make bench-experts. Last line:
bench-experts: balance_vs_baseline=<ratio> moves_vs_baseline=<ratio> seconds=<x> tbt_p99_migrating_vs_not=<ratio>
tbt_p99_regrouping_vs_not=<ratio>
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import numpy as np

from shared.errors import Unavailable
from shared.policies.placement import (
    EPLBMatchedPolicy,
    EPLBPolicy,
    MigrationAwarePolicy,
    PlacementPolicy,
    Topology,
    balance_of,
    lower_bound,
)
from shared.rpc.shoal.v1 import common_pb2, worker_pb2
from shared.rpc.worker_client import WorkerClient
from tests.support.models import TINY_MODEL_NAME
from tests.support.pki import as_controller
from tests.support.redis import redis_server
from tests.support.services import ep_joiner, ep_worker_processes

LAYERS, EXPERTS = 58, 256
TOPOLOGY = Topology(ranks=32, nodes=4, slots_per_rank=9)
ZIPF = 1.1
DRIFT = 0.10


def zipf_loads(rng: np.random.Generator, tokens: float = 1e6) -> np.ndarray:
    ranks = np.arange(1, EXPERTS + 1, dtype=float) ** -ZIPF
    return np.stack([tokens * ranks[rng.permutation(EXPERTS)] / ranks.sum() for _ in range(LAYERS)])


STREAMS, STREAM_TOKENS, WINDOW_S = 4, 64, 8.0


Background = Callable[[WorkerClient, asyncio.Event], Coroutine[Any, Any, int]]


async def tbt_under(client: WorkerClient, background: Background | None) -> tuple[list[float], int]:
    """Gaps between streamed tokens for WINDOW_S seconds, and how many background operations finished."""
    gaps: list[float] = []
    stop = asyncio.Event()

    async def stream(index: int) -> None:
        n = 0
        while not stop.is_set():
            message = worker_pb2.GenerateRequest(
                request_id=f"s{index}-{n}-{time.monotonic()}",
                model=TINY_MODEL_NAME,
                prompt_token_ids=[16 + (index * 13 + i) % 200 for i in range(32)],
                sampling=common_pb2.SamplingParams(max_tokens=STREAM_TOKENS, ignore_eos=True),
            )
            last = None
            async for _ in client.generate(message, timeout_s=120):
                now = time.perf_counter()
                if last is not None:
                    gaps.append(now - last)
                last = now
            n += 1

    streams = [asyncio.create_task(stream(i)) for i in range(STREAMS)]
    busy = asyncio.create_task(background(client, stop)) if background else None
    await asyncio.sleep(WINDOW_S)
    stop.set()
    await asyncio.gather(*streams)
    return gaps, (await busy) if busy else 0


async def migrations(client: WorkerClient, stop: asyncio.Event) -> int:
    done = 0
    while not stop.is_set():
        wire = (await client.expert_stats()).expert_map
        target = common_pb2.ExpertMap(version=wire.version + 1, num_ranks=wire.num_ranks,
                                      slots_per_rank=wire.slots_per_rank)  # fmt: skip
        for layer in wire.layers:
            slots = list(layer.slot_experts)
            a, b = slots.index(0), slots.index(1)
            slots[a], slots[b] = 1, 0
            target.layers.add(layer=layer.layer, slot_experts=slots)
        migration = f"bench-{done}"
        for first in range(0, len(wire.layers), 2):
            layers = list(range(first, min(len(wire.layers), first + 2)))
            await client.stage_experts(worker_pb2.StageExpertsRequest(migration_id=migration, target=target,
                                                                      layers=layers))  # fmt: skip
        await client.commit_expert_map(migration, target.version)
        await client.release_experts(migration, discard_staged=False)
        done += 1
    return done


def regroups(redis_url: str, model: Path) -> Background:
    """Grow to 3 ranks and shrink back until stopped (the cycle in progress finishes)."""

    async def cycle(client: WorkerClient, stop: asyncio.Event) -> int:
        done = 0
        while not stop.is_set():
            master, joiner = ep_joiner(redis_url, model, 3, "ep-worker")
            try:
                while True:
                    try:
                        await client.resize_experts(3, master)
                        break
                    except Unavailable:  # still loading
                        await asyncio.sleep(0.2)
                await client.resize_experts(2)
                await asyncio.to_thread(joiner.popen.wait, 30)
            finally:
                joiner.terminate(grace_s=10)
            done += 1
        return done

    return cycle


Row = tuple[str, float, float, float, int]


def live_tbt(model: Path) -> list[Row]:
    """(label, p50, p99, max gap in ms, operations done) without and with each background operation."""
    with redis_server() as url, ep_worker_processes(url, model, 2) as (address, _):

        async def run() -> list[Row]:
            client = WorkerClient(address, as_controller())
            rows = []
            try:
                await tbt_under(client, None)  # warm-up
                for label, background in [
                    ("no migration", None),
                    ("migrations back to back", migrations),
                    ("regroups 2->3->2", regroups(url, model)),
                ]:
                    gaps, done = await tbt_under(client, background)
                    ms = [float(np.percentile(gaps, q)) * 1000 for q in (50, 99)]
                    rows.append((label, ms[0], ms[1], max(gaps) * 1000, done))
                return rows
            finally:
                await client.close()

        return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path, nargs="?", help="checkpoint folder for the TBT-during-migration part")
    args = parser.parse_args()
    rng = np.random.default_rng(7)
    window1 = zipf_loads(rng)
    window2 = (1 - DRIFT) * window1 + DRIFT * zipf_loads(rng)
    current = EPLBPolicy().place(window1, np.zeros((LAYERS, TOPOLOGY.slots), dtype=np.int64), TOPOLOGY).slots
    rows = {}
    policies: dict[str, PlacementPolicy] = {
        "eplb": EPLBPolicy(),
        "eplb-matched nodes": EPLBMatchedPolicy(keep_nodes=True),
        "eplb-matched": EPLBMatchedPolicy(keep_nodes=False),
        "migration-aware": MigrationAwarePolicy(),
    }
    for label, policy in policies.items():
        started = time.perf_counter()
        result = policy.place(window2, current, TOPOLOGY)
        rows[label] = (float(result.balance.mean()), result.moves, time.perf_counter() - started)
    kept = float(np.mean([balance_of(current[layer], window2[layer], TOPOLOGY) for layer in range(LAYERS)]))
    bound = float(np.mean([lower_bound(layer, TOPOLOGY) for layer in window2]))
    print(
        f"{LAYERS} layers x {EXPERTS} experts, {TOPOLOGY.ranks} ranks on {TOPOLOGY.nodes} nodes, "
        f"{TOPOLOGY.slots_per_rank} slots/rank; Zipf {ZIPF}, {DRIFT:.0%} drift"
    )
    print(f"{'policy':<20}{'balance':>9}{'moves':>8}{'seconds':>9}")
    for name, (balance, moves, seconds) in rows.items():
        print(f"{name:<20}{balance:>9.3f}{moves:>8}{seconds:>9.2f}")
    print(f"{'(no rebalance)':<20}{kept:>9.3f}{0:>8}")
    print(f"{'(lower bound)':<20}{bound:>9.3f}")
    b_bal, b_moves, _ = rows["eplb-matched"]
    o_bal, o_moves, o_s = rows["migration-aware"]
    summary = f"balance_vs_baseline={o_bal / b_bal:.3f} moves_vs_baseline={o_moves / b_moves:.3f} seconds={o_s:.2f}"
    if args.model is not None:
        rows_live = live_tbt(args.model)
        print(f"\nreference engine, 2 ranks (gloo), {STREAMS} streams, {WINDOW_S:.0f} s each")
        print(f"{'':<28}{'tbt p50 ms':>11}{'tbt p99 ms':>11}{'max gap ms':>11}{'done':>6}")
        for label, p50, p99, gap, done in rows_live:
            print(f"{label:<28}{p50:>11.1f}{p99:>11.1f}{gap:>11.1f}{done:>6}")
        calm, migrating, regrouping = (row[2] for row in rows_live)
        summary += f" tbt_p99_migrating_vs_not={migrating / calm:.2f} tbt_p99_regrouping_vs_not={regrouping / calm:.2f}"
    print(f"bench-experts: {summary}")


if __name__ == "__main__":
    main()
