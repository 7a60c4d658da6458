"""The simulator's benchmarks, each a table (and a plot) from one run, plus its speed and an honesty check.

1. Speed: 100,000 synthetic requests on 64 fixed H100 replicas.
2. Colocated vs prefill/decode disaggregation at 8 replicas on long prompts
   (8k-token prompts, 256-token outputs, TTFT <= 2 s, TBT <= 30 ms): goodput
   as DistServe defines it, the highest request rate served with >= 90% SLO
   attainment (bisection over the rate), per replica; P/D at its best split
   against colocated at its best prefill chunk (512 to 8k tokens swept: a
   small chunk keeps TBT low, a large one prefills faster). The prefill pool
   runs 8k-token steps (it has no decode to protect).
3. The autoscaler (predictive, 15 s smoothing), the KPA baseline (its
   target swept, the best kept) and the Dynamo-style planner baseline (its
   interval swept, the one reaching the highest SLO attainment kept: the
   planner sizes for the predicted mean at full profiled throughput, so its
   attainment, not its cost, is what it lacks) vs fixed provisioning at equal SLO
   attainment: each policy's cost over that of the cheapest fixed replica
   count that attains at least the policy's own SLO attainment (at most 1.0:
   the policy never loses to the right fixed pool), and the autoscaler's cost
   over the straight line between the two fixed pools around its attainment
   (whole replicas make the first a staircase). On a synthetic day (2 ->
   60 -> 2 requests/s over an hour), on the Azure 2023 code trace at 4x and
   2x its rate and on the Mooncake trace, at cold starts of 10, 60 and 180 s;
   the first 10 minutes are run but not judged (the autoscaler starts at one
   replica and learns, a fixed pool starts full).
4. Routing on the Mooncake trace, 8 H100 replicas: the default (work-scored,
   prefix-aware) vs hit-fraction scoring (the default before work scoring)
   vs load-only (least-load) vs round-robin: prefix-cache hit rate and TTFT;
   then SLO attainment, TTFT p90 and hit rate from 3 to 16 replicas at the
   trace's rate and three times it.
5. Expert placement on an MoE pool (8 expert-parallel ranks per replica):
   never rebalancing vs the EPLB-style baseline vs the migration-aware policy
   (balance, copies moved, time between tokens).
6. Honesty: a two-minute slice of the Azure trace replayed on the live local
   stack (router, controller, two `sim` workers) and in the simulator with the
   same pool spec: TTFT and throughput side by side.

Run: make bench-sim. Last line:
bench-sim: sim_requests_per_s=<x> pd_goodput_per_gpu_ratio=<ratio> autoscale_cost_vs_peak=<ratio> prefix_hit=<x>
  vs_best_fixed=<the worst autoscaler ratio over traces and cold starts> vs_fixed_line=<the same against the line>
  kpa_vs_best_fixed=<the same for the best KPA>
  planner_vs_best_fixed=<the same for the planner> planner_slo=<its lowest SLO attainment over traces and cold starts>
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from simulator.cluster import SimResult, simulate
from simulator.config import SimConfig, parse_config
from simulator.report import Metrics, measure, plot, table
from simulator.workload import SyntheticSpec, Workload, load_trace, reshape, synthetic

MODEL = "shoal-tiny-moe"
GPUS = 8
PD_SLO = {"ttft_p90_s": 2.0, "tbt_p90_s": 0.03}
SLO = {"ttft_p90_s": 2.0, "tbt_p90_s": 0.1}
CAPACITY = {"prefill_tokens_per_s": 40_000, "decode_tokens_per_s": 3_000}
HONESTY_WINDOW_S = 1800.0  # a steady stretch of the Azure code trace (about 2.4 requests/s)
AUTOSCALER = {"policy": "predictive", "params": {"smooth_s": 15}}
# The KPA baseline's target (running + waiting requests per replica), swept: its best is what it is held to.
KPA_TARGETS = (4, 8, 16, 32)


def kpa(target: float) -> dict[str, Any]:
    return {"policy": "kpa", "params": {"target": target}}


# The planner's adjustment interval, swept (Dynamo's examples use 60 s).
PLANNER_INTERVALS_S = (30, 60, 180)


def planner(interval_s: float) -> dict[str, Any]:
    return {"policy": "planner", "params": {"interval_s": interval_s}}


def pool(name: str, replicas: int, role: str = "mixed", **fields: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": name,
        "model": MODEL,
        "role": role,
        "engine": "sim",
        "gpu_type": "h100",
        "min_replicas": replicas,
        "max_replicas": replicas,
        "slo": SLO,
        "capacity": CAPACITY,
        "scaling": {"policy": "fixed", "params": {"replicas": replicas}},
    }
    spec.update(fields)
    return spec


def cluster(*pools: dict[str, Any], preset: str = "default") -> SimConfig:
    return parse_config({"models": [{"name": MODEL}], "pools": list(pools), "routing": {"preset": preset}})


# -- 1. speed -------------------------------------------------------------------------


def bench_speed() -> Metrics:
    spec = SyntheticSpec(rate_rps=600, duration_s=200, prompt_mean=1024, output_mean=128, prefix_groups=50)
    workload = reshape(synthetic(spec.model_copy(update={"prefix_tokens": 1024})), limit=100_000)
    metrics = measure(simulate(cluster(pool("mixed", 64)), workload))
    print(f"\n1. speed: {metrics.requests} requests on 64 replicas, {metrics.span_s:.0f} simulated seconds")
    print(table({"64 x h100": metrics}))
    return metrics


# -- 2. colocated vs P/D ----------------------------------------------------------------


def long_prompts(rate: float) -> Workload:
    return synthetic(SyntheticSpec(rate_rps=rate, duration_s=240, prompt_mean=8192, output_mean=256, sigma=0.5, seed=7))


# Prefill chunk sizes (tokens per step) tried for the colocated pool; the best is the baseline.
CHUNKS = (512, 1024, 2048, 4096, 8192)


def colocated(chunk: int) -> SimConfig:
    return cluster(pool("mixed", GPUS, slo=PD_SLO, worker_env={"MAX_BATCH_TOKENS": str(chunk)}))


def disaggregated(prefill: int) -> SimConfig:
    return cluster(
        pool("prefill", prefill, role="prefill", slo=PD_SLO, worker_env={"MAX_BATCH_TOKENS": "8192"}),
        pool("decode", GPUS - prefill, role="decode", slo=PD_SLO),
    )


def max_goodput_rate(config: SimConfig, low: float = 1.0, high: float = 64.0, steps: int = 7) -> float:
    """Highest rate (requests/s) served with >= 90% SLO attainment: bisection (attainment falls with rate)."""

    def attains(rate: float) -> bool:
        return measure(simulate(config, long_prompts(rate))).slo_attainment >= 0.9

    if not attains(low):
        return 0.0
    for _ in range(steps):
        middle = (low + high) / 2
        low, high = (middle, high) if attains(middle) else (low, middle)
    return low


def bench_pd(out: Path) -> float:
    rates = {f"colocated chunk {chunk}": max_goodput_rate(colocated(chunk)) for chunk in CHUNKS}
    for prefill in (2, 3, 4, 5):
        rates[f"P/D {prefill}:{GPUS - prefill}"] = max_goodput_rate(disaggregated(prefill))
    best = max((name for name in rates if name.startswith("P/D")), key=rates.__getitem__)
    baseline = max((name for name in rates if name.startswith("colocated")), key=rates.__getitem__)
    print(f"\n2. colocated vs P/D at {GPUS} replicas, 8k-token prompts, TTFT<=2 s, TBT<=30 ms")
    print(f"{'':<22}{'goodput (req/s at >=90% SLO)':>30}{'per replica':>13}")
    for name, rate in rates.items():
        print(f"{name:<22}{rate:>30.2f}{rate / GPUS:>13.3f}")
    at = rates[baseline]
    split = int(best.split()[1].split(":")[0])
    results = {
        baseline: simulate(colocated(int(baseline.split()[-1])), long_prompts(at)),
        best: simulate(disaggregated(split), long_prompts(at)),
    }
    print(f"both at the best colocated goodput rate, {at:.1f} req/s:")
    print(table({name: measure(r) for name, r in results.items()}))
    print(f"plot: {plot(results, out / 'pd.png')}")
    return rates[best] / at if at else float("inf")


# -- 3. autoscaler vs fixed ---------------------------------------------------------------


# Every policy and every fixed pool is judged from the same time on: the autoscaler starts at one
# replica and learns its pool's demand, a fixed pool starts full (the "same starting state").
WARMUP_S = 600.0
COLD_STARTS_S = (10.0, 60.0, 180.0)


def scaled_pool(replicas: int, cold_start_s: float, **fields: Any) -> dict[str, Any]:
    return pool("mixed", replicas, worker_env={"SIM_STARTUP_DELAY_S": str(cold_start_s)}, **fields)


class FixedPools:
    """Fixed pools of 1..`most` replicas on one workload, each simulated once when first needed."""

    def __init__(self, workload: Workload, most: int, cold_start_s: float) -> None:
        self.workload, self.most, self.cold_start_s = workload, most, cold_start_s
        self._results: dict[int, SimResult] = {}

    def run(self, replicas: int) -> SimResult:
        if replicas not in self._results:
            config = cluster(scaled_pool(replicas, self.cold_start_s))
            self._results[replicas] = simulate(config, self.workload, warmup_s=WARMUP_S)
        return self._results[replicas]

    def cheapest_at(self, target: float) -> int:
        """The fewest replicas whose SLO attainment reaches `target` (attainment grows with replicas); `most`
        when none does (`reaches` tells)."""
        low, high = 1, self.most
        while low < high:
            middle = (low + high) // 2
            if measure(self.run(middle)).slo_attainment >= target:
                high = middle
            else:
                low = middle + 1
        return low

    def reaches(self, replicas: int, target: float) -> bool:
        return measure(self.run(replicas)).slo_attainment >= target

    def line_cost(self, target: float) -> float:
        """The fixed frontier's cost at `target` on the straight line between the two pool sizes around it:
        whole replicas make the cheapest pool's cost a staircase, where a hair more attainment can cost a
        whole replica, so a ratio against it jumps between neighbouring results."""
        replicas = self.cheapest_at(target)
        above = measure(self.run(replicas))
        if replicas == 1 or above.slo_attainment <= target:
            return above.cost
        below = measure(self.run(replicas - 1))
        share = (target - below.slo_attainment) / (above.slo_attainment - below.slo_attainment)
        return below.cost + share * (above.cost - below.cost)


@dataclass(frozen=True)
class Ratios:
    """Cost over the cheapest fixed pool's at equal SLO attainment, per policy (see bench_autoscale_on)."""

    autoscaler: float
    kpa: float
    planner: float
    planner_slo: float
    # The autoscaler's cost over the fixed frontier's straight line at its SLO attainment (FixedPools.line_cost).
    autoscaler_line: float

    @staticmethod
    def worst(all_ratios: list[Ratios]) -> Ratios:
        return Ratios(
            max(r.autoscaler for r in all_ratios),
            max(r.kpa for r in all_ratios),
            max(r.planner for r in all_ratios),
            min(r.planner_slo for r in all_ratios),
            max(r.autoscaler_line for r in all_ratios),
        )


def bench_autoscale_on(name: str, workload: Workload, out: Path, cold_start_s: float) -> Ratios:
    """Each policy's cost over that of the cheapest fixed pool reaching the policy's own SLO attainment:
    the autoscaler's, the best over KPA_TARGETS of the KPA baseline's (its target tuned per trace), and
    the planner's at the interval reaching the highest SLO attainment. At the 60 s cold start the whole
    table, a comparison and a plot; at the others a line."""
    slug = name.replace(" ", "-")
    most = 16
    fixed = FixedPools(workload, most, cold_start_s)
    runs = (
        {"autoscaler 1..16": AUTOSCALER}
        | {f"kpa {t:g} 1..16": kpa(t) for t in KPA_TARGETS}
        | {f"planner {i}s 1..16": planner(i) for i in PLANNER_INTERVALS_S}
    )
    results = {
        label: simulate(
            cluster(scaled_pool(1, cold_start_s, max_replicas=most, scaling=s)), workload, warmup_s=WARMUP_S
        )
        for label, s in runs.items()
    }
    ratios, attained, rows = {}, {}, []
    for label, result in results.items():
        metrics = measure(result)
        replicas = fixed.cheapest_at(metrics.slo_attainment)
        fixed_cost = measure(fixed.run(replicas)).cost
        ratios[label], attained[label] = metrics.cost / fixed_cost, metrics.slo_attainment
        at = f"{replicas}" if fixed.reaches(replicas, metrics.slo_attainment) else f"{replicas}*"
        rows.append((label, metrics.slo_attainment, metrics.cost, at, fixed_cost, ratios[label]))
    best_kpa = min((label for label in ratios if label.startswith("kpa")), key=ratios.__getitem__)
    best_planner = max((label for label in ratios if label.startswith("planner")), key=attained.__getitem__)
    auto_metrics = measure(results["autoscaler 1..16"])
    line = auto_metrics.cost / fixed.line_cost(auto_metrics.slo_attainment)
    found = Ratios(ratios["autoscaler 1..16"], ratios[best_kpa], ratios[best_planner], attained[best_planner], line)
    if cold_start_s != 60.0:
        print(
            f"   cold start {cold_start_s:g} s: autoscaler {found.autoscaler:.2f} (SLO "
            f"{attained['autoscaler 1..16']:.3f}; {line:.2f} of the fixed line), best KPA {found.kpa:.2f} "
            f"({best_kpa}), planner "
            f"{found.planner:.2f} at SLO {found.planner_slo:.3f} ({best_planner})"
        )
        return found
    print(
        f"\n3. autoscaler vs fixed on {name} ({len(workload.requests)} requests, cold start 60 s, "
        f"the first {WARMUP_S:g} s not judged)"
    )
    print(f"{'policy':<18}{'SLO':>7}{'cost':>9}{'fixed at equal SLO':>20}{'its cost':>10}{'ratio':>7}")
    for label, slo, cost, at, fixed_cost, ratio in rows:
        print(f"{label:<18}{slo:>7.3f}{cost:>9.2f}{at:>20}{fixed_cost:>10.2f}{ratio:>7.2f}")
    if any(row[3].endswith("*") for row in rows):
        print(f"* no fixed pool of up to {most} replicas reaches that SLO attainment: compared with {most}")
    print(f"   the autoscaler against the straight line between the fixed pools around its SLO attainment: {line:.2f}")
    replicas = fixed.cheapest_at(auto_metrics.slo_attainment)
    print(table({"autoscaler 1..16": auto_metrics, f"fixed {replicas} (equal SLO)": measure(fixed.run(replicas))}))
    shown = {
        "autoscaler": results["autoscaler 1..16"],
        best_kpa: results[best_kpa],
        best_planner: results[best_planner],
        f"fixed {replicas}": fixed.run(replicas),
    }
    print(f"plot: {plot(shown, out / f'autoscale-{slug}.png')}")
    print("   the ratios at other cold starts:")
    return found


def bench_autoscale_all(name: str, workload: Workload, out: Path) -> Ratios:
    """The worst ratios over the cold starts (and the planner's lowest SLO attainment)."""
    ordered = sorted(COLD_STARTS_S, key=lambda c: c != 60.0)  # the full table first
    return Ratios.worst([bench_autoscale_on(name, workload, out, cold) for cold in ordered])


# -- 4. routing on Mooncake ---------------------------------------------------------------


ROUTING_PRESETS = ("default", "hit-fraction", "least-load", "round-robin")
# (replicas, rate scale): from saturated to underloaded, at the trace's rate and three times it.
ROUTING_SWEEP = ((3, 1.0), (4, 1.0), (8, 1.0), (16, 1.0), (6, 3.0), (8, 3.0), (16, 3.0))


def bench_routing(traces: Path, out: Path) -> Metrics:
    workload = load_trace(traces / "mooncake_synthetic_trace.jsonl", "mooncake")
    results = {preset: simulate(cluster(pool("mixed", 8), preset=preset), workload) for preset in ROUTING_PRESETS}
    metrics = {preset: measure(r) for preset, r in results.items()}
    print(f"\n4. routing on the Mooncake trace ({len(workload.requests)} requests, 8 x h100)")
    print(table(metrics))
    print(f"plot: {plot(results, out / 'routing.png')}")
    print("\nSLO attainment / TTFT p90 (s) / prefix hit rate, per cluster size and rate scale:")
    print(f"{'replicas':>8}{'rate':>6}" + "".join(f"{preset:>24}" for preset in ROUTING_PRESETS))
    for replicas, scale in ROUTING_SWEEP:
        scaled = reshape(workload, rate_scale=scale) if scale != 1.0 else workload
        row = [measure(simulate(cluster(pool("mixed", replicas), preset=p), scaled)) for p in ROUTING_PRESETS]
        cells = "".join(f"{m.slo_attainment:>9.3f} {m.ttft_s[1]:>6.2f} {m.prefix_hit_rate or 0.0:>6.3f}" for m in row)
        print(f"{replicas:>8}{scale:>5g}x{cells}")
    return metrics["default"]


# -- 5. expert placement ---------------------------------------------------------------------


def bench_experts(out: Path) -> None:
    workload = synthetic(SyntheticSpec(rate_rps=30, duration_s=600, prompt_mean=1024, output_mean=256, seed=4))
    shape = {"layers": 16, "experts": 64, "ranks": 8, "slots_per_rank": 9, "skew": 1.0}
    results = {
        policy: simulate(
            parse_config(
                {
                    "models": [{"name": MODEL}],
                    "pools": [pool("moe", 4)],
                    "experts": {"moe": {**shape, "policy": policy}},
                }
            ),
            workload,
        )
        for policy in ("none", "eplb", "migration-aware")
    }
    print(
        "\n5. expert placement: 4 replicas x 8 EP ranks, 16 layers x 64 experts, Zipf 1.0, drifting, "
        "rebalanced every 60 s"
    )
    print(table({policy: measure(r) for policy, r in results.items()}))
    print(f"plot: {plot(results, out / 'experts.png')}")


# -- 6. honesty -----------------------------------------------------------------------------


def bench_honesty(traces: Path, model: Path) -> None:
    from benchmarks.bench_autoscale import run_pool

    azure = load_trace(traces / "azure_llm_2023_code.csv", "azure")
    workload = reshape(azure, start_s=HONESTY_WINDOW_S, duration_s=120, max_prompt=3000, max_output=256)
    spec = pool("default", 2, gpu_type="cpu", capacity={"prefill_tokens_per_s": 9000, "decode_tokens_per_s": 400})
    result = simulate(cluster(spec), workload)
    simulated = measure(result)
    live = run_pool("honesty", spec, model, workload.requests)
    served = [(r, o) for r, o in zip(workload.requests, live.outcomes, strict=True) if o.ok]
    live_ttft = np.percentile([o.ttft for _, o in served], [50, 90])
    live_tbt = float(np.percentile([o.mean_tbt for _, o in served], 50))
    # A live request's last token came mean_tbt * (tokens - 1) after its first.
    live_end = max(r.at + o.ttft + o.mean_tbt * (r.output_tokens - 1) for r, o in served)
    tokens = sum(r.output_tokens for r, _ in served)
    sim_tokens = sum(j.request.output_tokens for j in result.jobs if not j.refused)
    rows = [
        ("TTFT p50 (ms)", live_ttft[0] * 1000, simulated.ttft_s[0] * 1000),
        ("TTFT p90 (ms)", live_ttft[1] * 1000, simulated.ttft_s[1] * 1000),
        ("TBT p50, per-request mean (ms)", live_tbt * 1000, simulated.tbt_s[0] * 1000),
        ("output tokens / s (to the last)", tokens / live_end, sim_tokens / simulated.span_s),
        ("requests served", float(len(served)), float(simulated.served)),
    ]
    print(
        f"\n6. honesty: {len(workload.requests)} Azure requests (trace seconds {HONESTY_WINDOW_S:.0f}+120), "
        "live local stack vs simulator, 2 cpu-reference sim workers"
    )
    print(f"{'':<34}{'live':>10}{'simulated':>11}{'sim / live':>12}")
    for label, real, sim in rows:
        print(f"{label:<34}{real:>10.1f}{sim:>11.1f}{sim / real if real else float('nan'):>12.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("traces", type=Path, help="folder of the public traces (read by path)")
    parser.add_argument("model", type=Path, help="checkpoint for the live stack of the honesty check")
    parser.add_argument("--out", type=Path, default=Path("bench-out/sim"), help="folder for the plots")
    parser.add_argument("--skip-live", action="store_true", help="leave out the honesty check on the live stack")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    speed = bench_speed()
    pd_ratio = bench_pd(args.out)
    day = synthetic(
        SyntheticSpec(rate_rps=2, peak_rps=60, period_s=3600, duration_s=3600, prompt_mean=2048, output_mean=64, seed=5)
    )
    azure = load_trace(args.traces / "azure_llm_2023_code.csv", "azure")
    mooncake = load_trace(args.traces / "mooncake_synthetic_trace.jsonl", "mooncake")
    traces = {
        "day": day,
        "azure code x4": reshape(azure, rate_scale=4),
        "azure code x2": reshape(azure, rate_scale=2),
        "mooncake": mooncake,
    }
    slugs = {
        "day": "a synthetic day",
        "azure code x4": "azure-code-x4",
        "azure code x2": "azure-code-x2",
        "mooncake": "mooncake",
    }
    by_trace = {name: bench_autoscale_all(slugs[name], workload, args.out) for name, workload in traces.items()}
    print("cost / fixed cost at equal SLO, worst over cold starts:")
    for name, r in by_trace.items():
        print(
            f"   {name}: autoscaler {r.autoscaler:.2f} ({r.autoscaler_line:.2f} of the fixed line), best KPA "
            f"{r.kpa:.2f}, planner {r.planner:.2f} "
            f"(its SLO attainment down to {r.planner_slo:.3f})"
        )
    worst = Ratios.worst(list(by_trace.values()))
    routing = bench_routing(args.traces, args.out)
    bench_experts(args.out)
    if not args.skip_live:
        bench_honesty(args.traces, args.model)
    print(
        f"bench-sim: sim_requests_per_s={speed.sim_requests_per_s:.0f} pd_goodput_per_gpu_ratio={pd_ratio:.2f} "
        f"autoscale_cost_vs_peak={by_trace['day'].autoscaler:.2f} prefix_hit={routing.prefix_hit_rate or 0.0:.3f} "
        f"vs_best_fixed={worst.autoscaler:.2f} vs_fixed_line={worst.autoscaler_line:.2f} "
        f"kpa_vs_best_fixed={worst.kpa:.2f} "
        f"planner_vs_best_fixed={worst.planner:.2f} planner_slo={worst.planner_slo:.3f}"
    )


if __name__ == "__main__":
    main()
