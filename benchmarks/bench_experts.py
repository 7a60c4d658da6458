"""Expert placement: the migration-aware policy against an EPLB-style packing from scratch.

DeepSeek-V3's prefill deployment shape: 58 MoE layers x 256 experts, 32 ranks
on 4 nodes, 9 slots per rank (288 per layer: 32 redundant copies). Loads are
Zipf-skewed per layer (a random expert order per layer). The current
placement is the baseline's packing of window 1; window 2 drifts 10% (a
tenth of each layer's load is redistributed with a fresh Zipf order). Both
policies then place window 2: balance (max rank load / mean, averaged over
layers; the lower bound any packing could reach beside it), expert copies
moved from the current placement, and runtime, in one run.

Then, on the reference engine (tiny model, one instance over 2 ranks with
gloo, when a model folder is given): time between tokens p50/p99 of 4
concurrent greedy streams, without a migration and while migrations run back
to back (each moves experts 0 and 1 between the ranks in every layer:
stage, commit, release), same run.

Run: make bench-experts. Last line:
bench-experts: balance_vs_baseline=<ratio> moves_vs_baseline=<ratio> seconds=<x> tbt_p99_migrating_vs_not=<ratio>
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import numpy as np

from shared.policies.placement import EPLBPolicy, MigrationAwarePolicy, Topology, balance_of, lower_bound
from shared.rpc.shoal.v1 import common_pb2, worker_pb2
from shared.rpc.worker_client import WorkerClient
from tests.support.models import TINY_MODEL_NAME
from tests.support.redis import redis_server
from tests.support.services import ep_worker_processes

LAYERS, EXPERTS = 58, 256
TOPOLOGY = Topology(ranks=32, nodes=4, slots_per_rank=9)
ZIPF = 1.1
DRIFT = 0.10


def zipf_loads(rng: np.random.Generator, tokens: float = 1e6) -> np.ndarray:
    ranks = np.arange(1, EXPERTS + 1, dtype=float) ** -ZIPF
    return np.stack([tokens * ranks[rng.permutation(EXPERTS)] / ranks.sum() for _ in range(LAYERS)])


STREAMS, STREAM_TOKENS, WINDOW_S = 4, 64, 8.0


async def tbt_under(client: WorkerClient, migrate: bool) -> tuple[list[float], int]:
    """Gaps between streamed tokens for WINDOW_S seconds, and how many migrations finished meanwhile."""
    gaps: list[float] = []
    stop = asyncio.Event()

    async def stream(index: int) -> None:
        n = 0
        while not stop.is_set():
            message = worker_pb2.GenerateRequest(
                request_id=f"s{index}-{n}-{migrate}",
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

    async def migrations() -> int:
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

    streams = [asyncio.create_task(stream(i)) for i in range(STREAMS)]
    migrating = asyncio.create_task(migrations()) if migrate else None
    await asyncio.sleep(WINDOW_S)
    stop.set()
    await asyncio.gather(*streams)
    return gaps, (await migrating) if migrating else 0


def migration_tbt(model: Path) -> tuple[float, float, float, float, int]:
    """(p50, p99 without; p50, p99 while migrating) in ms, and migrations done."""
    with redis_server() as url, ep_worker_processes(url, model, 2) as (address, _):

        async def run() -> tuple[list[float], list[float], int]:
            client = WorkerClient(address)
            try:
                await tbt_under(client, migrate=False)  # warm-up
                calm, _ = await tbt_under(client, migrate=False)
                busy, done = await tbt_under(client, migrate=True)
                return calm, busy, done
            finally:
                await client.close()

        calm, busy, done = asyncio.run(run())
    ms = [float(np.percentile(g, q)) * 1000 for g in (calm, busy) for q in (50, 99)]
    return ms[0], ms[1], ms[2], ms[3], done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path, nargs="?", help="checkpoint folder for the TBT-during-migration part")
    args = parser.parse_args()
    rng = np.random.default_rng(7)
    window1 = zipf_loads(rng)
    window2 = (1 - DRIFT) * window1 + DRIFT * zipf_loads(rng)
    baseline, ours = EPLBPolicy(), MigrationAwarePolicy()
    current = baseline.place(window1, np.zeros((LAYERS, TOPOLOGY.slots), dtype=np.int64), TOPOLOGY).slots
    rows = {}
    for policy in (baseline, ours):
        started = time.perf_counter()
        result = policy.place(window2, current, TOPOLOGY)
        rows[policy.name] = (float(result.balance.mean()), result.moves, time.perf_counter() - started)
    kept = float(np.mean([balance_of(current[layer], window2[layer], TOPOLOGY) for layer in range(LAYERS)]))
    bound = float(np.mean([lower_bound(layer, TOPOLOGY) for layer in window2]))
    print(
        f"{LAYERS} layers x {EXPERTS} experts, {TOPOLOGY.ranks} ranks on {TOPOLOGY.nodes} nodes, "
        f"{TOPOLOGY.slots_per_rank} slots/rank; Zipf {ZIPF}, {DRIFT:.0%} drift"
    )
    print(f"{'policy':<18}{'balance':>9}{'moves':>8}{'seconds':>9}")
    for name, (balance, moves, seconds) in rows.items():
        print(f"{name:<18}{balance:>9.3f}{moves:>8}{seconds:>9.2f}")
    print(f"{'(no rebalance)':<18}{kept:>9.3f}{0:>8}")
    print(f"{'(lower bound)':<18}{bound:>9.3f}")
    b_bal, b_moves, _ = rows["eplb"]
    o_bal, o_moves, o_s = rows["migration-aware"]
    summary = f"balance_vs_baseline={o_bal / b_bal:.3f} moves_vs_baseline={o_moves / b_moves:.3f} seconds={o_s:.2f}"
    if args.model is not None:
        p50, p99, m50, m99, done = migration_tbt(args.model)
        print(f"\nreference engine, 2 ranks (gloo), {STREAMS} streams, {WINDOW_S:.0f} s each")
        print(f"{'':<28}{'tbt p50 ms':>11}{'tbt p99 ms':>11}{'migrations':>11}")
        print(f"{'no migration':<28}{p50:>11.1f}{p99:>11.1f}{0:>11}")
        print(f"{'migrations back to back':<28}{m50:>11.1f}{m99:>11.1f}{done:>11}")
        summary += f" tbt_p99_migrating_vs_not={m99 / p99:.2f}"
    print(f"bench-experts: {summary}")


if __name__ == "__main__":
    main()
