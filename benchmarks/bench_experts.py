"""Expert placement: the migration-aware policy against an EPLB-style packing from scratch.

DeepSeek-V3's prefill deployment shape: 58 MoE layers x 256 experts, 32 ranks
on 4 nodes, 9 slots per rank (288 per layer: 32 redundant copies). Loads are
Zipf-skewed per layer (a random expert order per layer). The current
placement is the baseline's packing of window 1; window 2 drifts 10% (a
tenth of each layer's load is redistributed with a fresh Zipf order). Both
policies then place window 2: balance (max rank load / mean, averaged over
layers; the lower bound any packing could reach beside it), expert copies
moved from the current placement, and runtime, in one run.

Run: make bench-experts. Last line:
bench-experts: balance_vs_baseline=<ratio> moves_vs_baseline=<ratio> seconds=<x>
"""

from __future__ import annotations

import time

import numpy as np

from shared.policies.placement import EPLBPolicy, MigrationAwarePolicy, Topology, balance_of, lower_bound

LAYERS, EXPERTS = 58, 256
TOPOLOGY = Topology(ranks=32, nodes=4, slots_per_rank=9)
ZIPF = 1.1
DRIFT = 0.10


def zipf_loads(rng: np.random.Generator, tokens: float = 1e6) -> np.ndarray:
    ranks = np.arange(1, EXPERTS + 1, dtype=float) ** -ZIPF
    return np.stack([tokens * ranks[rng.permutation(EXPERTS)] / ranks.sum() for _ in range(LAYERS)])


def main() -> None:
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
    print(
        f"bench-experts: balance_vs_baseline={o_bal / b_bal:.3f} moves_vs_baseline={o_moves / b_moves:.3f} "
        f"seconds={o_s:.2f}"
    )


if __name__ == "__main__":
    main()
