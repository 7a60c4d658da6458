"""Agent-graph placement on two GPU generations: our plan vs all-newest vs all-cheapest, and solver time.

The catalogue is two pools serving one model, speeds and prices both from the
performance profiles (shared/perfmodel.py, the one catalogue the simulator and
the controller's placement read too: prefill tokens/s = 1 / prefill_token_s;
decode at a batch of 64 streams of 2k context: the replica's tokens/s, and one
stream's; `cost_per_hour` per replica of 2 GPUs): the newer generation (h100)
and the older (a100). The first table shows each pool's price per million
prefill and decode tokens, and the floor they set: no placement of LLM steps
costs less than the cheapest pool's per-token price relative to the newest's.
When that floor is above the goal (0.70 of all-newest), the catalogue, not the
policy, is what rules the goal out.

The suite: 200 synthetic graphs, 50 of each shape — chains of LLM calls,
fan-out / fan-in, tool-heavy (LLM and tool steps alternating), long context
(retrieval, a 16-32k-token prompt, a summary) — each with a deadline of 1.2
to 2 times what it takes with every step on the newest pool. Every step's
real duration is its estimate times a log-normal factor (sigma 0.3, drawn
once per step, the same for every policy): a graph is executed step by step
and, for our policy, re-planned whenever a step finishes. SLA
attainment is the share of graphs done by their deadline; cost sums each
LLM step's replica-time at its pool's price. Our policy plans with 40% head-room
and re-plans what has not started whenever a step finishes.

Run: make bench-agents. Last line:
bench-agents: cost_vs_newest=<ratio> sla=<x> newest_sla=<x> solver_seconds_1000=<x> cost_floor=<ratio>
"""

from __future__ import annotations

import heapq
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from shared.perfmodel import PROFILES
from shared.policies.agents import Hardware, Plan, PlanStep, place_all, plan, replan

MODEL = "mixtral-8x7b"
NOISE_SIGMA = 0.3
GRAPHS_PER_SHAPE = 50
HEADROOM = 0.4  # plan to 60% of the deadline: step times vary (sigma 0.3) and re-planning recovers slack


def hardware(pool: str, profile_name: str) -> Hardware:
    profile = PROFILES[profile_name]
    batch, context = 64, 2048
    step = profile.step_time(0, 0, batch, batch * context)
    return Hardware(
        pool=pool,
        model=MODEL,
        gpu_type=profile_name,
        cost_per_hour=profile.cost_per_hour,
        prefill_tps=1 / profile.prefill_token_s,
        decode_tps=batch / step,
        stream_tps=1 / step,
    )


CATALOGUE = [hardware("newer", "h100"), hardware("older", "a100")]
GOAL_COST_VS_NEWEST = 0.70


def per_million(hardware: Hardware, tokens_per_s: float) -> float:
    return hardware.cost_per_hour / 3600 / tokens_per_s * 1e6


def catalogue_floor() -> float:
    """Print each pool's price per token; return the least any placement can cost relative to all-newest."""
    newest = CATALOGUE[0]
    print(
        f"{'pool':<8}{'gpu':<6}{'$/h':>7}{'prefill tok/s':>15}{'decode tok/s':>14}{'$/M prefill':>13}{'$/M decode':>12}"
    )
    for h in CATALOGUE:
        print(
            f"{h.pool:<8}{h.gpu_type:<6}{h.cost_per_hour:>7.2f}{h.prefill_tps:>15.0f}{h.decode_tps:>14.0f}"
            f"{per_million(h, h.prefill_tps):>13.3f}{per_million(h, h.decode_tps):>12.3f}"
        )
    # A step's cost is its prefill and decode time at its pool's price: each part costs at least the
    # cheapest pool's price per token of that kind, relative to the newest pool's.
    return min(
        min(per_million(h, h.prefill_tps) / per_million(newest, newest.prefill_tps),
            per_million(h, h.decode_tps) / per_million(newest, newest.decode_tps))
        for h in CATALOGUE
    )  # fmt: skip


@dataclass(frozen=True)
class Case:
    shape: str
    steps: list[PlanStep]
    deadline_s: float
    noise: dict[str, float]


def llm(rng: random.Random, step_id: str, deps: tuple[str, ...], prompt: tuple[int, int] = (1000, 4000)) -> PlanStep:
    return PlanStep(step_id, deps, MODEL, rng.randint(*prompt), rng.randint(64, 512))


def chain(rng: random.Random) -> list[PlanStep]:
    n = rng.randint(4, 10)
    return [llm(rng, f"s{i}", (f"s{i - 1}",) if i else ()) for i in range(n)]


def fan(rng: random.Random) -> list[PlanStep]:
    width = rng.randint(3, 8)
    middle = [
        llm(rng, f"m{i}", ("root",))
        if rng.random() < 0.6
        else PlanStep(f"m{i}", ("root",), fixed_s=rng.uniform(0.5, 3))
        for i in range(width)
    ]
    return [llm(rng, "root", ()), *middle, llm(rng, "join", tuple(m.id for m in middle))]


def tool_heavy(rng: random.Random) -> list[PlanStep]:
    steps: list[PlanStep] = []
    for i in range(rng.randint(3, 6)):
        previous = (steps[-1].id,) if steps else ()
        steps.append(llm(rng, f"think{i}", previous, prompt=(500, 2000)))
        steps.append(PlanStep(f"tool{i}", (f"think{i}",), fixed_s=rng.uniform(0.5, 4)))
    return steps


def long_context(rng: random.Random) -> list[PlanStep]:
    return [
        PlanStep("find", (), fixed_s=0.3),
        llm(rng, "read", ("find",), prompt=(16_000, 32_000)),
        llm(rng, "summary", ("read",), prompt=(1000, 3000)),
    ]


SHAPES: dict[str, Callable[[random.Random], list[PlanStep]]] = {
    "chain": chain,
    "fan-out/in": fan,
    "tool-heavy": tool_heavy,
    "long-context": long_context,
}


def suite(seed: int = 1) -> list[Case]:
    rng = random.Random(seed)
    cases = []
    for shape, make in SHAPES.items():
        for _ in range(GRAPHS_PER_SHAPE):
            steps = make(rng)
            deadline = place_all(steps, CATALOGUE, "newest").latency_s * rng.uniform(1.2, 2.0)
            noise = {s.id: rng.lognormvariate(0, NOISE_SIGMA) for s in steps}
            cases.append(Case(shape, steps, deadline, noise))
    return cases


@dataclass
class Outcome:
    cost: float
    latency_s: float
    replans: int


def execute(case: Case, first: Plan, adaptive: bool) -> Outcome:
    """Run the graph in virtual time: a step starts when its prerequisites finish, on its planned pool,
    and takes its estimate times its noise. With `adaptive`, each time a step finishes the steps not
    started yet are re-planned against the time left: upgraded when late, downgraded when early."""
    pools = {h.pool: h for h in CATALOGUE}
    assignment = {s: c.pool for s, c in first.choices.items()}
    finish: dict[str, float] = {}
    done: set[str] = set()
    events: list[tuple[float, str]] = []
    cost, replans = 0.0, 0

    def start_ready(now: float) -> None:
        nonlocal cost
        for step in case.steps:
            if step.id in finish or not all(d in done for d in step.deps):
                continue
            pool = pools.get(assignment.get(step.id, ""))
            estimate = step.fixed_s
            if pool is not None:
                estimate = pool.latency(step.prompt_tokens, step.output_tokens)
                cost += pool.cost(step.prompt_tokens, step.output_tokens)
            finish[step.id] = now + estimate * case.noise[step.id]
            heapq.heappush(events, (finish[step.id], step.id))

    start_ready(0.0)
    while events:
        now, step_id = heapq.heappop(events)
        done.add(step_id)
        waiting = [s for s in case.steps if s.id not in finish]
        if adaptive and waiting:
            running = {s: t - now for s, t in finish.items() if s not in done}
            left = [s for s in case.steps if s.id not in done]
            update = replan(left, CATALOGUE, case.deadline_s, now, done, running, HEADROOM)
            replans += 1
            for step in waiting:
                assignment[step.id] = update.choices[step.id].pool
        start_ready(now)
    return Outcome(cost, max(finish.values()), replans)


def solver_seconds(steps: int, seed: int = 3) -> tuple[float, str]:
    """Plan a random DAG of `steps` LLM steps (each reads up to 3 earlier ones) to a deadline between
    all-newest and all-cheapest; returns the solver's time and which solver ran."""
    rng = random.Random(seed)
    graph = [
        llm(rng, f"s{i}", tuple(f"s{j}" for j in rng.sample(range(i), min(i, rng.randint(0, 3))))) for i in range(steps)
    ]
    fast, slow = place_all(graph, CATALOGUE, "newest"), place_all(graph, CATALOGUE, "cheapest")
    result = plan(graph, CATALOGUE, (fast.latency_s + slow.latency_s) / 2)
    return result.seconds, result.solver


def main() -> None:
    cases = suite()
    policies: dict[str, Callable[[Case], Outcome]] = {
        "ours (plan + re-plan)": lambda c: execute(
            c, plan(c.steps, CATALOGUE, c.deadline_s, headroom=HEADROOM), adaptive=True
        ),
        "all newest": lambda c: execute(c, place_all(c.steps, CATALOGUE, "newest"), adaptive=False),
        "all cheapest": lambda c: execute(c, place_all(c.steps, CATALOGUE, "cheapest"), adaptive=False),
    }
    floor = catalogue_floor()
    print(
        f"cost floor: no placement costs less than {floor:.2f} of all-newest on this catalogue"
        + (
            f" (above the {GOAL_COST_VS_NEWEST:.2f} goal: the prices rule it out)"
            if floor > GOAL_COST_VS_NEWEST
            else ""
        )
    )
    print(
        f"{len(cases)} graphs ({GRAPHS_PER_SHAPE} per shape), deadlines 1.2-2x the all-newest estimate, "
        f"step noise log-normal sigma {NOISE_SIGMA}"
    )
    results: dict[str, dict[str, list[tuple[float, bool]]]] = {}
    started = time.perf_counter()
    replans = 0
    for name, run in policies.items():
        per_shape: dict[str, list[tuple[float, bool]]] = {}
        for case in cases:
            outcome = run(case)
            replans += outcome.replans
            per_shape.setdefault(case.shape, []).append((outcome.cost, outcome.latency_s <= case.deadline_s))
        results[name] = per_shape
    print(f"{'policy':<24}{'shape':<14}{'cost':>10}{'SLA':>8}")
    totals: dict[str, tuple[float, float]] = {}
    for name, per_shape in results.items():
        everything = [x for rows in per_shape.values() for x in rows]
        for shape, rows in per_shape.items():
            print(f"{name:<24}{shape:<14}{sum(c for c, _ in rows):>10.4f}{sum(ok for _, ok in rows) / len(rows):>8.2f}")
        totals[name] = (sum(c for c, _ in everything), sum(ok for _, ok in everything) / len(everything))
        print(f"{name:<24}{'all':<14}{totals[name][0]:>10.4f}{totals[name][1]:>8.2f}")
    print(f"(suite ran in {time.perf_counter() - started:.1f} s; {replans} re-plans)")
    print(f"{'solver, steps':<16}{'seconds':>9}  solver")
    timings = {}
    for steps in (10, 100, 1000):
        timings[steps], solver = solver_seconds(steps)
        print(f"{steps:<16}{timings[steps]:>9.3f}  {solver}")
    ours, newest = totals["ours (plan + re-plan)"], totals["all newest"]
    print(
        f"bench-agents: cost_vs_newest={ours[0] / newest[0]:.2f} sla={ours[1]:.2f} newest_sla={newest[1]:.2f} "
        f"solver_seconds_1000={timings[1000]:.3f} cost_floor={floor:.2f}"
    )


if __name__ == "__main__":
    main()
