"""Autoscaling on a bursty trace: the default (predictive) policy vs a pool sized for the peak, reactive, KPA, planner.

The Azure LLM inference 2023 code trace (read by path, never copied), its
last 17 minutes (bursts separated by idle minutes) after WARMUP_S seconds of warm-up, every THIN-th request,
time compressed COMPRESSION times, replayed open-loop (requests leave at their timestamps whatever happens)
against the real local stack: router, controller with the local actuator,
Celery worker, and `sim` workers whose steps follow the cpu-reference
profile sped up by the same COMPRESSION, with a simulated cold start. Each
policy gets a fresh stack, the same requests and the same pool spec but its
scaling policy:

* predictive: the default policy, 1..PEAK replicas;
* peak: fixed at PEAK replicas, ready before the replay starts;
* reactive: queue length over a target, 1..PEAK replicas;
* kpa: the Knative Pod Autoscaler as AIBrix runs it (shared/policies/scaling.py),
  its 180 s stable and 60 s panic windows compressed like the trace, the same
  target per replica as reactive, 1..PEAK replicas;
* planner: the Dynamo-style SLA planner (shared/policies/scaling.py), its
  60 s adjustment interval compressed like the trace, sized from the pool's
  declared capacity (its profile), 1..PEAK replicas;
* fixed N for N below PEAK, ready before the replay starts: with peak, the
  fixed pools the predictive policy is held to (the cheapest one reaching its
  SLO attainment is the best fixed).

Every policy meets the judged window in the state its own scaling reached on the warm-up, whose
requests and worker-seconds are not counted: otherwise fixed pools would start full while scaling
policies met the first burst at one replica with no history to size it from.

A request meets the SLO when it succeeds, its TTFT is within the pool's TTFT
SLO and its mean time between tokens within the TBT SLO (real, compressed
seconds). Worker-seconds integrate every worker the actuator holds
(starting, serving, draining) over the judged window, sampled every 0.5 s.

Last, a bound no policy can run: the same requests in the simulator, with the
cold start the controller measured live, under a clairvoyant schedule that
orders each span's replicas a cold start ahead, lowered span by span while it
stays within one point of the peak pool's live SLO attainment. Its cost over
the simulated peak pool's is what knowing the future would save at that SLO
(the goal is 60% of the peak's worker-seconds). Beside it, what reacting can reach without foresight: ideal
reactors, simulated alike, that order the peak the tick requests queue (perfect detection, instant order)
and hold it a while after; the cheapest reaching the goal's SLO, and the best within 60% of the peak's
worker-seconds.

Run: make bench-autoscale. Last line:
bench-autoscale: slo=<x> peak_slo=<x> reactive_slo=<x> kpa_slo=<x> planner_slo=<x> worker_seconds_vs_peak=<ratio>
  best_fixed=<replicas> worker_seconds_vs_best_fixed=<ratio> clairvoyant_vs_peak=<ratio> reactor_vs_peak=<ratio>
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import numpy as np
import orjson

from cli.localstack import Endpoints, LocalStack, StackConfig
from cli.supervisor import Supervisor
from shared.policies.scaling import PolicyState, PoolSnapshot, ScalingDecision, ScalingPolicy, ScalingReason
from shared.processes import free_port
from simulator.cluster import Simulation
from simulator.config import parse_config
from simulator.report import Metrics, measure
from simulator.workload import Request, Workload

MODEL = "shoal-tiny-moe"
WINDOW_S = (2400.0, 3440.0)  # trace seconds judged
WARMUP_S = 300.0  # trace seconds before the window, replayed and not judged
THIN = 2
COMPRESSION = 12.0
PEAK = 3
MAX_CONTEXT = 3000
MAX_OUTPUT = 256
TTFT_SLO_S = 1.0
TBT_SLO_S = 0.1
SETTLE_S = 10.0
RECONCILE_INTERVAL_S = 0.5  # the controller's, live and simulated
SCHEDULE_STEP_S = 2.5  # the clairvoyant schedule sets the replicas of each span this long (real seconds)
REACTOR_THRESHOLDS = (1, 2, 5, 10)  # waiting requests that make an ideal reactor order the peak
GOAL_VS_PEAK = 0.6  # the goal: the peak pool's SLO attainment within a point at this share of its worker-seconds


def load_trace(path: Path, warmup_s: float = 0.0) -> list[Request]:
    """The window's requests (and `warmup_s` trace seconds before it), arriving in compressed seconds from
    the first one replayed."""
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    start = datetime.fromisoformat(rows[0]["TIMESTAMP"][:26])
    arrivals = []
    for index, row in enumerate(rows):
        offset = (datetime.fromisoformat(row["TIMESTAMP"][:26]) - start).total_seconds()
        if not WINDOW_S[0] - warmup_s <= offset < WINDOW_S[1] or index % THIN:
            continue
        arrivals.append(
            Request(
                (offset - WINDOW_S[0] + warmup_s) / COMPRESSION,
                max(1, min(MAX_CONTEXT, int(row["ContextTokens"]))),
                max(1, min(MAX_OUTPUT, int(row["GeneratedTokens"]))),
            )
        )
    return arrivals


@dataclass
class Outcome:
    ok: bool
    ttft: float = math.inf
    mean_tbt: float = 0.0

    @property
    def meets_slo(self) -> bool:
        return self.ok and self.ttft <= TTFT_SLO_S and self.mean_tbt <= TBT_SLO_S


@dataclass
class RunResult:
    name: str
    outcomes: list[Outcome] = field(default_factory=list)
    replicas: list[tuple[float, int]] = field(default_factory=list)  # (t, workers held)
    decisions: int = 0
    cold_start_s: float = 0.0  # as the controller measured it, at the end

    @property
    def slo(self) -> float:
        return sum(o.meets_slo for o in self.outcomes) / len(self.outcomes)

    @property
    def worker_seconds(self) -> float:
        return sum(count * (t1 - t0) for (t0, count), (t1, _) in zip(self.replicas, self.replicas[1:], strict=False))


def fixed_replicas(name: str) -> int | None:
    """N for "peak" (PEAK) and "fixed N"; None for a scaling policy."""
    if name == "peak":
        return PEAK
    return int(name.removeprefix("fixed ")) if name.startswith("fixed ") else None


def pool_spec(name: str, cold_start_s: float) -> dict[str, Any]:
    fixed = fixed_replicas(name)
    if fixed is not None:
        return pool_body({"policy": "fixed", "params": {"replicas": fixed}}, fixed, cold_start_s)
    scaling: dict[str, Any] = {
        "predictive": {
            "policy": "predictive",
            "params": {"window_s": 20, "peak_window_s": 5, "min_horizon_s": 2, "down_delay_s": 6, "down_cooldown_s": 3},
        },
        "reactive": {"policy": "reactive", "params": {"target_queue": 8, "down_cooldown_s": 4}},
        "kpa": {
            "policy": "kpa",
            "params": {"target": 8, "stable_window_s": 180 / COMPRESSION, "panic_window_s": 60 / COMPRESSION},
        },
        "planner": {"policy": "planner", "params": {"interval_s": 60 / COMPRESSION}},
    }[name]
    return pool_body(scaling, 1, cold_start_s)


def pool_body(scaling: dict[str, Any], min_replicas: int, cold_start_s: float) -> dict[str, Any]:
    return {
        "name": "default",
        "model": MODEL,
        "role": "mixed",
        "engine": "sim",
        "min_replicas": min_replicas,
        "max_replicas": PEAK,
        "slo": {"ttft_p90_s": TTFT_SLO_S, "tbt_p90_s": TBT_SLO_S},
        # One cpu-reference worker sped up COMPRESSION times, at this trace's ~2k-token prompts.
        "capacity": {"prefill_tokens_per_s": 40_000, "decode_tokens_per_s": 1_500},
        "scaling": scaling,
        "worker_env": {
            "SIM_SPEEDUP": str(COMPRESSION),
            "SIM_STARTUP_DELAY_S": str(cold_start_s),
            "HEARTBEAT_INTERVAL_S": "0.5",
            "LEASE_TTL_S": "3",
        },
    }


async def one_request(http: aiohttp.ClientSession, url: str, arrival: Request, index: int) -> Outcome:
    # Distinct leading tokens: the Azure trace carries no prefix information, so no request reuses another's.
    prompt = [16 + (index * 31 + i * 7) % 240 for i in range(arrival.prompt_tokens)]
    body = orjson.dumps(
        {"model": MODEL, "prompt": prompt, "max_tokens": arrival.output_tokens, "ignore_eos": True, "stream": True}
    )
    started = time.perf_counter()
    stamps: list[float] = []
    done = False
    try:
        async with http.post(
            f"{url}/v1/completions", data=body, headers={"content-type": "application/json"}
        ) as response:
            if response.status != 200:
                return Outcome(False)
            async for line in response.content:
                if line.startswith(b'data: {"error"'):
                    return Outcome(False)  # a stream that ends in an error failed, whatever came before
                if line.startswith(b"data: {"):
                    stamps.append(time.perf_counter())
                done = done or line.startswith(b"data: [DONE]")
    except (aiohttp.ClientError, TimeoutError):
        return Outcome(False)
    if not stamps or not done:  # cut off before its end: not served
        return Outcome(False)
    gaps = np.diff(stamps)
    return Outcome(True, stamps[0] - started, float(gaps.mean()) if len(gaps) else 0.0)


async def replay(
    endpoints: Endpoints, arrivals: Sequence[Request], result: RunResult, judged_from: float = 0.0
) -> None:
    """Send `arrivals` open-loop; judge only the requests, worker-seconds and decisions from `judged_from`
    seconds after the first is due."""
    headers = {"authorization": f"Bearer {endpoints.admin_token}"}
    done = asyncio.Event()
    start = time.perf_counter()
    judged_at = time.time() + judged_from

    async def sample() -> None:
        async with httpx.AsyncClient(base_url=endpoints.controller, headers=headers, timeout=10) as admin:
            while not done.is_set():
                status = (await admin.get("/v1/scaling")).json()["pools"]
                held = sum(p["ready"] + p["starting"] + p["draining"] for p in status)
                result.cold_start_s = max((p["cold_start_s"] for p in status), default=0.0)
                if time.perf_counter() - start >= judged_from:
                    result.replicas.append((time.perf_counter(), held))
                await asyncio.sleep(0.5)
            decisions = (await admin.get("/v1/scaling/decisions", params={"limit": 1000})).json()
            result.decisions = sum(d["at"] >= judged_at for d in decisions)

    sampler = asyncio.create_task(sample())
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=endpoints.api_headers) as http:
        tasks = []
        for index, arrival in enumerate(arrivals):
            delay = start + arrival.at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one_request(http, endpoints.router, arrival, index)))
        outcomes = await asyncio.gather(*tasks)
        result.outcomes = [o for a, o in zip(arrivals, outcomes, strict=True) if a.at >= judged_from]
    done.set()
    await sampler


async def ready_workers(endpoints: Endpoints, count: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=10) as http:
        while time.monotonic() < deadline:
            router = (await http.get(f"{endpoints.router}/health")).json()["workers"]
            if router >= count:
                return
            await asyncio.sleep(0.25)
    raise TimeoutError(f"{count} worker(s) were not serving within {timeout_s:.0f}s")


def run_policy(name: str, model: Path, arrivals: Sequence[Request], cold_start_s: float) -> RunResult:
    return run_pool(name, pool_spec(name, cold_start_s), model, arrivals, WARMUP_S / COMPRESSION)


def run_pool(
    name: str, spec: dict[str, Any], model: Path, arrivals: Sequence[Request], judged_from: float = 0.0
) -> RunResult:
    """Replay arrivals open-loop against a fresh local stack whose one pool is `spec` (a PoolCreate body),
    judging from `judged_from` seconds on."""
    supervisor = Supervisor(grace_s=5)
    config = StackConfig(
        model_path=model,
        router_port=free_port(),
        controller_port=free_port(),
        workers=[],
        env={"SHOAL_CONTROLLER_RECONCILE_INTERVAL_S": str(RECONCILE_INTERVAL_S), "SHOAL_LOG_LEVEL": "WARNING"},
    )
    real_stdout, sys.stdout = sys.stdout, io.StringIO()  # the services' logs stay out of the table
    try:
        endpoints = LocalStack(config, supervisor).start()  # its bootstrap declares the model; the pool is ours
        headers = {"authorization": f"Bearer {endpoints.admin_token}"}
        with httpx.Client(base_url=endpoints.controller, headers=headers) as admin:
            admin.post("/v1/pools", json=spec).raise_for_status()
        asyncio.run(ready_workers(endpoints, spec["min_replicas"]))
        result = RunResult(name)
        asyncio.run(replay(endpoints, arrivals, result, judged_from))
        time.sleep(SETTLE_S)
        return result
    finally:
        supervisor.stop_all()
        sys.stdout = real_stdout


@dataclass
class Clairvoyant:
    """A scaling policy for the simulator that knows every arrival: `plan[i]` replicas for the i-th span of
    SCHEDULE_STEP_S, each ordered a cold start before its span begins. No policy can run it; it bounds what
    one could reach."""

    plan: list[int]
    cold_start_s: float

    def decide(self, snapshot: PoolSnapshot, state: PolicyState) -> ScalingDecision:
        span = min(len(self.plan) - 1, int((snapshot.now + self.cold_start_s) / SCHEDULE_STEP_S))
        return ScalingDecision(self.plan[span], ScalingReason.STEADY, "clairvoyant schedule", state)


@dataclass
class IdealReactor:
    """A scaling policy for the simulator that orders the peak pool the tick more than `threshold` requests
    wait, holds it until none has waited for `hold_s`, and falls back to one replica: perfect detection and
    an instant order, so it stands for what reacting to a burst once it queues can reach, with no foresight."""

    threshold: int
    hold_s: float

    def decide(self, snapshot: PoolSnapshot, state: PolicyState) -> ScalingDecision:
        # state.low_since holds the last tick that saw a queue: this policy has no hysteresis of its own.
        if sum(r.waiting for r in snapshot.workers) + snapshot.refused > self.threshold:
            return ScalingDecision(PEAK, ScalingReason.SCALE_UP_QUEUE, "queued", replace(state, low_since=snapshot.now))
        calm = state.low_since is None or snapshot.now - state.low_since > self.hold_s
        return ScalingDecision(1 if calm else PEAK, ScalingReason.STEADY, "reacting", state)


class Simulated:
    """The benchmark's requests in the simulator under any scaling policy, the warm-up not judged, as live;
    the pool is the benchmark's, with the cold start the controller measured live, and starts at the peak
    (the warm-up brings each policy to its own state)."""

    def __init__(self, arrivals: Sequence[Request], judged_from: float, cold_start_s: float) -> None:
        spec = pool_body({"policy": "fixed", "params": {"replicas": PEAK}}, PEAK, cold_start_s)
        self.pool = spec["name"]
        self.config = parse_config(
            {"models": [{"name": MODEL}], "pools": [spec], "reconcile_interval_s": RECONCILE_INTERVAL_S}
        )
        self.workload = Workload("bench-autoscale", list(arrivals))
        self.judged_from = judged_from
        self.cold_start_s = cold_start_s

    def run(self, policy: ScalingPolicy | None = None) -> Metrics:
        """The peak pool, or the pool under `policy`."""
        simulation = Simulation(self.config, self.workload, warm=True, warmup_s=self.judged_from)
        if policy is not None:
            simulation.pools[self.pool].policy = policy
        return measure(simulation.run())


def clairvoyant_bound(simulated: Simulated, peak: Metrics, target: float) -> Metrics:
    """The cheapest clairvoyant schedule found whose SLO attainment reaches `target`: from the peak
    everywhere (`peak`, the simulated peak pool, is that schedule's run), lower one span's replicas at a
    time while the target holds, until no span can go lower (greedy, so an upper bound on the cheapest
    schedule's cost)."""
    spans = math.ceil(simulated.workload.requests[-1].at / SCHEDULE_STEP_S) + 1
    plan = [PEAK] * spans
    best = peak
    lowered = True
    while lowered:
        lowered = False
        # The warm-up's spans stay full: their worker-seconds are not counted.
        for span in range(int(simulated.judged_from / SCHEDULE_STEP_S), spans):
            if plan[span] == 1:
                continue
            trial = [*plan[:span], plan[span] - 1, *plan[span + 1 :]]
            metrics = simulated.run(Clairvoyant(trial, simulated.cold_start_s))
            if metrics.slo_attainment >= target:
                plan, best, lowered = trial, metrics, True
    return best


def ideal_reactors(simulated: Simulated) -> list[tuple[IdealReactor, Metrics]]:
    """Every ideal reactor of the sweep (thresholds, holds of 1 to 30 real seconds), simulated."""
    return [
        (reactor, simulated.run(reactor))
        for reactor in (IdealReactor(n, hold) for n in REACTOR_THRESHOLDS for hold in range(1, 31))
    ]


def describe_reactor(found: tuple[IdealReactor, Metrics] | None, peak: Metrics) -> str:
    if found is None:
        return "is none"
    reactor, metrics = found
    return (
        f"(threshold {reactor.threshold}, hold {reactor.hold_s:g} s) reaches SLO {metrics.slo_attainment:.3f} at "
        f"{metrics.worker_seconds / peak.worker_seconds:.2f} of the peak's worker-s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("trace", type=Path, help="azure_llm_2023_code.csv")
    parser.add_argument("model", type=Path, help="checkpoint folder (the sim engine reads its config and tokenizer)")
    parser.add_argument(
        "--cold-start-s",
        type=float,
        default=2.0,
        help="simulated worker start-up delay, real seconds (x12 in trace time)",
    )
    args = parser.parse_args()
    arrivals = load_trace(args.trace, WARMUP_S)
    judged = sum(a.at >= WARMUP_S / COMPRESSION for a in arrivals)
    print(
        f"{judged} requests judged from {args.trace.name} (seconds {WINDOW_S[0]:.0f}-{WINDOW_S[1]:.0f} after "
        f"{len(arrivals) - judged} in {WARMUP_S:.0f} s of warm-up, every {THIN}th), "
        f"cold start {args.cold_start_s:.1f} s + process start, "
        f"time compressed {COMPRESSION:.0f}x -> {arrivals[-1].at:.0f} s; SLO ttft<={TTFT_SLO_S}s tbt<={TBT_SLO_S}s",
        flush=True,
    )
    results = {}
    for name in ("predictive", "peak", "reactive", "kpa", "planner", *(f"fixed {n}" for n in range(1, PEAK))):
        results[name] = run_policy(name, args.model, arrivals, args.cold_start_s)
        print(f"  {name}: done", flush=True)
    print(
        f"{'policy':<12}{'slo':>8}{'failed':>8}{'ttft p50':>10}{'ttft p90':>10}{'tbt p90':>9}"
        f"{'worker-s':>10}{'mean repl':>10}{'max repl':>9}{'decisions':>10}"
    )
    for name, r in results.items():
        ttfts = [o.ttft for o in r.outcomes if o.ok]
        tbts = [o.mean_tbt for o in r.outcomes if o.ok]
        span = r.replicas[-1][0] - r.replicas[0][0] if len(r.replicas) > 1 else 1.0
        print(
            f"{name:<12}{r.slo:>8.3f}{sum(not o.ok for o in r.outcomes):>8}"
            f"{np.percentile(ttfts, 50) * 1000:>8.0f}ms{np.percentile(ttfts, 90) * 1000:>8.0f}ms"
            f"{np.percentile(tbts, 90) * 1000:>7.0f}ms{r.worker_seconds:>10.0f}{r.worker_seconds / span:>10.2f}"
            f"{max(c for _, c in r.replicas):>9}{r.decisions:>10}"
        )
    default, peak, reactive = results["predictive"], results["peak"], results["reactive"]
    fixed = sorted(
        ((n, r) for name, r in results.items() if (n := fixed_replicas(name)) is not None), key=lambda f: f[0]
    )
    best_n, best = next(((n, r) for n, r in fixed if r.slo >= default.slo), fixed[-1])
    print(
        f"best fixed at the predictive policy's SLO attainment: {best_n} replicas ({best.worker_seconds:.0f} worker-s)"
    )
    cold = default.cold_start_s
    goal = peak.slo - 0.01
    simulated = Simulated(arrivals, WARMUP_S / COMPRESSION, cold)
    simulated_peak = simulated.run()
    bound = clairvoyant_bound(simulated, simulated_peak, goal)
    bound_vs_peak = bound.worker_seconds / simulated_peak.worker_seconds
    print(
        f"clairvoyant bound, simulated with the {cold:.1f} s cold start measured live: a schedule that knows every "
        f"arrival reaches SLO {bound.slo_attainment:.3f} (the goal: {goal:.3f}) at {bound.worker_seconds:.0f} "
        f"worker-s, {bound_vs_peak:.2f} of the simulated peak pool's {simulated_peak.worker_seconds:.0f} "
        f"(SLO {simulated_peak.slo_attainment:.3f})"
    )
    reactors = ideal_reactors(simulated)
    reaching = [(r, m) for r, m in reactors if m.slo_attainment >= goal]
    cheapest = min(reaching, key=lambda rm: rm[1].worker_seconds, default=None)
    affordable = [(r, m) for r, m in reactors if m.worker_seconds <= GOAL_VS_PEAK * simulated_peak.worker_seconds]
    best_affordable = max(affordable, key=lambda rm: rm[1].slo_attainment, default=None)
    reactor_vs_peak = cheapest[1].worker_seconds / simulated_peak.worker_seconds if cheapest else math.nan
    print(
        f"ideal reactors, simulated alike ({len(reactors)}: order {PEAK} replicas the tick more than "
        f"{'/'.join(map(str, REACTOR_THRESHOLDS))} requests wait, hold them 1-30 s after, else 1): "
        f"the cheapest reaching the goal {describe_reactor(cheapest, simulated_peak)}; "
        f"the best within {GOAL_VS_PEAK:.0%} of the peak's worker-s {describe_reactor(best_affordable, simulated_peak)}"
    )
    print(
        f"bench-autoscale: slo={default.slo:.3f} peak_slo={peak.slo:.3f} reactive_slo={reactive.slo:.3f} "
        f"kpa_slo={results['kpa'].slo:.3f} planner_slo={results['planner'].slo:.3f} "
        f"worker_seconds_vs_peak={default.worker_seconds / peak.worker_seconds:.2f} "
        f"best_fixed={best_n} worker_seconds_vs_best_fixed={default.worker_seconds / best.worker_seconds:.2f} "
        f"clairvoyant_vs_peak={bound_vs_peak:.2f} reactor_vs_peak={reactor_vs_peak:.2f}"
    )


if __name__ == "__main__":
    main()
