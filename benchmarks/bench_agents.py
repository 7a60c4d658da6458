"""Agent-graph placement on two GPU generations with finite pools: our plan vs all-newest vs all-cheapest.

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

The pools are finite: the newer has 1 replica and the older 2, the same spend
per hour. A replica runs 64 streams at once (a step holds a slot from admission
to its last token; one waits, first come first served, when all are taken) and
prefills one prompt at a time; a step goes to the replica of its pool where its
first token comes soonest. Stream speed does not rise when a replica runs fewer
streams, so light load reads slightly pessimistic.

The suite: 200 synthetic graphs, 50 of each shape — chains of LLM calls,
fan-out / fan-in, tool-heavy (LLM and tool steps alternating), long context
(retrieval, a 16-32k-token prompt, a summary) — each with a deadline of 1.2
to 2 times what it takes with every step on an idle newer pool. Every step's
real duration is its estimate times a log-normal factor (sigma 0.3, drawn
once per step, the same for every policy). The graphs arrive in a Poisson
stream, shuffled, at three loads: the newer pool's offered utilization if
every step ran there (0.5, 1.0, 1.5). Every policy sees the same graphs at the
same times.

Our policy is the controller's runner's (shared/policies/agents.py): plan at
arrival to `HEADROOM` short of the deadline, each pool's latency including
the queueing its workers report now (`queue_wait` over each replica's waiting
steps and TTFT p90 of the last 10 s), and re-plan the steps not started
whenever a step finishes, running steps counted at what their estimates leave.
The baselines place every LLM step on the newest pool, on the cheapest, or
(soonest end: join the shortest queue across pools) on the pool where it
would end soonest as it starts, by the same reports. SLA attainment is the share of graphs done by their
deadline; cost sums each LLM step's replica-time at its pool's price; `wait`
is the mean seconds a step queued for a slot and a prefill.

Run: make bench-agents. Last line, at the heaviest load:
bench-agents: cost_vs_newest=<ratio> sla=<x> newest_sla=<x> soonest_sla=<x> solver_seconds_1000=<x>
cost_floor=<ratio> load=<x>
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

from shared.perfmodel import PROFILES
from shared.policies.agents import (
    HEADROOM,
    Hardware,
    Plan,
    PlanStep,
    StepChoice,
    place_all,
    plan,
    queue_wait,
    replan,
)

MODEL = "mixtral-8x7b"
NOISE_SIGMA = 0.3
GRAPHS_PER_SHAPE = 50
SLOTS = 64  # streams a replica decodes at once: the batch its catalogue speeds are taken at
FLEET = {"newer": 1, "older": 2}  # replicas per pool: the same dollars per hour in each
LOADS = (0.5, 1.0, 1.5)  # the newer pool's offered utilization were every step placed there
TTFT_WINDOW_S = 10.0  # the span a worker's reported TTFT p90 covers


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
    rng.shuffle(cases)
    return cases


def arrivals(cases: Sequence[Case], load: float, seed: int = 2) -> list[float]:
    """Poisson arrival times at which every step on the newer pool would keep it `load` busy: the busier
    of its slots (a step holds one for its whole duration) and its prefill (one prompt at a time)."""
    newer, mean_noise = CATALOGUE[0], math.exp(NOISE_SIGMA**2 / 2)
    llm_steps = [s for c in cases for s in c.steps if s.placed]
    slot_s = sum(newer.latency(s.prompt_tokens, s.output_tokens) for s in llm_steps) / SLOTS
    prefill_s = sum(s.prompt_tokens / newer.prefill_tps for s in llm_steps)
    per_graph_s = mean_noise * max(slot_s, prefill_s) / len(cases) / FLEET[newer.pool]
    rng, now, times = random.Random(seed), 0.0, []
    for _ in cases:
        now += rng.expovariate(load / per_graph_s)
        times.append(now)
    return times


def p90(values: list[float]) -> float:
    return sorted(values)[int(0.9 * (len(values) - 1))] if values else 0.0


@dataclass
class Replica:
    """One replica's queues: slots held from admission to the last token, prefill one prompt at a time.
    Steps are sent in time order, so a step's whole timeline is known when it is sent."""

    slot_free_s: list[float] = field(default_factory=lambda: [0.0] * SLOTS)  # a heap
    prefill_free_s: float = 0.0
    prefill_starts: deque[float] = field(default_factory=deque)
    first_tokens: deque[tuple[float, float]] = field(default_factory=deque)  # (when, TTFT)

    def first_token(self, now: float, prefill_s: float) -> float:
        return max(now, self.slot_free_s[0], self.prefill_free_s) + prefill_s

    def send(self, now: float, prefill_s: float, decode_s: float) -> float:
        """Queue a step; returns when its first token comes."""
        admitted = max(now, heapq.heappop(self.slot_free_s))
        start = max(admitted, self.prefill_free_s)
        self.prefill_free_s = start + prefill_s
        heapq.heappush(self.slot_free_s, self.prefill_free_s + decode_s)
        self.prefill_starts.append(start)
        self.first_tokens.append((self.prefill_free_s, self.prefill_free_s - now))
        return self.prefill_free_s

    def report(self, now: float) -> tuple[int, float]:
        """What the worker's load report says now: steps waiting, TTFT p90 of the last window."""
        while self.prefill_starts and self.prefill_starts[0] <= now:
            self.prefill_starts.popleft()
        while self.first_tokens and self.first_tokens[0][0] < now - TTFT_WINDOW_S:
            self.first_tokens.popleft()
        return len(self.prefill_starts), p90([ttft for when, ttft in self.first_tokens if when <= now])


@dataclass
class Pool:
    hardware: Hardware
    replicas: list[Replica]

    def now_seen(self, now: float) -> Hardware:
        return replace(self.hardware, wait_s=queue_wait(r.report(now) for r in self.replicas))

    def send(self, now: float, step: PlanStep, noise: float) -> tuple[float, float]:
        """Run an LLM step: when it ends, and how long it queued."""
        prefill_s = step.prompt_tokens / self.hardware.prefill_tps * noise
        decode_s = step.output_tokens / self.hardware.stream_tps * noise
        replica = min(self.replicas, key=lambda r: r.first_token(now, prefill_s))
        first = replica.send(now, prefill_s, decode_s)
        return first + decode_s, first - now - prefill_s


@dataclass
class Outcome:
    cost: float = 0.0
    finished_s: float = 0.0
    queued_s: float = 0.0
    llm_steps: int = 0
    on_newer: int = 0
    replans: int = 0

    def add(self, other: Outcome) -> None:
        """Sum the steps' totals (not the graph's finish)."""
        self.cost, self.queued_s, self.replans = (
            self.cost + other.cost,
            self.queued_s + other.queued_s,
            self.replans + other.replans,
        )
        self.llm_steps, self.on_newer = self.llm_steps + other.llm_steps, self.on_newer + other.on_newer


@dataclass
class Running:
    """One graph in flight: each step's planned choice, when each started; what it has cost so far."""

    index: int
    case: Case
    arrived_s: float
    choices: dict[str, StepChoice]
    outcome: Outcome = field(default_factory=Outcome)
    started: dict[str, float] = field(default_factory=dict)
    done: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class Policy:
    first: Callable[[Case, list[Hardware]], Plan]  # from the catalogue as it stands when the graph arrives
    replan: bool = False  # re-plan the steps not started whenever a step finishes
    at_dispatch: bool = False  # each LLM step to the pool where it would end soonest when it starts


POLICIES = {
    "ours (plan + re-plan)": Policy(lambda c, seen: plan(c.steps, seen, c.deadline_s, headroom=HEADROOM), True),
    "all newest": Policy(lambda c, seen: place_all(c.steps, seen, "newest")),
    "all cheapest": Policy(lambda c, seen: place_all(c.steps, seen, "cheapest")),
    "soonest end": Policy(lambda c, seen: place_all(c.steps, seen, "newest"), at_dispatch=True),
}


def simulate(cases: Sequence[Case], times: Sequence[float], policy: Policy) -> list[Outcome]:
    """Run every graph in virtual time on the finite pools: a step starts when its prerequisites finish,
    on the pool its graph's current plan names, and takes its estimate times its noise plus queueing."""
    pools = {h.pool: Pool(h, [Replica() for _ in range(FLEET[h.pool])]) for h in CATALOGUE}
    # (when, tie-break, graph, step): a graph arriving has no step
    events: list[tuple[float, int, int, str]] = [(t, i, i, "") for i, t in enumerate(times)]
    heapq.heapify(events)
    graphs: dict[int, Running] = {}
    tie = itertools.count(len(times))

    def catalogue(now: float) -> list[Hardware]:
        return [pool.now_seen(now) for pool in pools.values()]

    def start_ready(graph: Running, now: float) -> None:
        for step in graph.case.steps:
            if step.id in graph.started or not all(d in graph.done for d in step.deps):
                continue
            noise = graph.case.noise[step.id]
            graph.started[step.id] = now
            end = now + step.fixed_s * noise
            if step.placed:
                name = graph.choices[step.id].pool
                if policy.at_dispatch:
                    name = min(catalogue(now), key=lambda h: h.latency(step.prompt_tokens, step.output_tokens)).pool
                pool = pools[name]
                end, queued = pool.send(now, step, noise)
                o = graph.outcome
                o.cost += pool.hardware.cost(step.prompt_tokens, step.output_tokens)
                o.queued_s, o.llm_steps = o.queued_s + queued, o.llm_steps + 1
                o.on_newer += pool.hardware.pool == CATALOGUE[0].pool
            heapq.heappush(events, (end, next(tie), graph.index, step.id))

    while events:
        now, _, index, step_id = heapq.heappop(events)
        if not step_id:
            case = cases[index]
            graphs[index] = Running(index, case, now, dict(policy.first(case, catalogue(now)).choices))
            start_ready(graphs[index], now)
            continue
        graph = graphs[index]
        graph.done.add(step_id)
        waiting = [s.id for s in graph.case.steps if s.id not in graph.started]
        if policy.replan and waiting:
            # As the runner: a running step counts at what its estimate leaves, not at its true end.
            left = {
                s: max(0.0, graph.choices[s].latency_s - (now - graph.started[s]))
                for s in graph.started
                if s not in graph.done
            }
            elapsed = now - graph.arrived_s
            update = replan(
                graph.case.steps, catalogue(now), graph.case.deadline_s, elapsed, graph.done, left, HEADROOM
            )
            graph.choices.update({s: update.choices[s] for s in waiting})
            graph.outcome.replans += 1
        start_ready(graph, now)
        if len(graph.done) == len(graph.case.steps):
            graph.outcome.finished_s = now - graph.arrived_s
    return [graphs[i].outcome for i in range(len(cases))]


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


def summary(cases: Sequence[Case], outcomes: Iterable[Outcome]) -> tuple[float, float, dict[str, float], Outcome]:
    """Total cost, SLA attainment overall and per shape, and the steps' totals."""
    met: dict[str, list[bool]] = {}
    total = Outcome()
    for case, o in zip(cases, outcomes, strict=True):
        met.setdefault(case.shape, []).append(o.finished_s <= case.deadline_s)
        total.add(o)
    everything = [ok for rows in met.values() for ok in rows]
    return total.cost, sum(everything) / len(everything), {s: sum(r) / len(r) for s, r in met.items()}, total


def main() -> None:
    cases = suite()
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
        f"{len(cases)} graphs ({GRAPHS_PER_SHAPE} per shape), deadlines 1.2-2x the idle all-newest estimate, "
        f"step noise log-normal sigma {NOISE_SIGMA}; replicas: "
        + ", ".join(f"{pool} {n} x {SLOTS} streams" for pool, n in FLEET.items())
    )
    shapes = list(SHAPES)
    print(
        f"{'load':>5}  {'policy':<23}{'cost':>8}{'SLA':>6}"
        + "".join(f"{s:>13}" for s in shapes)
        + f"{'wait s':>8}{'newer':>7}{'replans':>8}"
    )
    started = time.perf_counter()
    heaviest: dict[str, tuple[float, float]] = {}
    for load in LOADS:
        times = arrivals(cases, load)
        for name, policy in POLICIES.items():
            cost, sla, per_shape, total = summary(cases, simulate(cases, times, policy))
            heaviest[name] = (cost, sla)
            print(
                f"{load:>5.1f}  {name:<23}{cost:>8.4f}{sla:>6.2f}"
                + "".join(f"{per_shape[s]:>13.2f}" for s in shapes)
                + f"{total.queued_s / total.llm_steps:>8.2f}{total.on_newer / total.llm_steps:>7.0%}{total.replans:>8}"
            )
    print(f"(suite ran in {time.perf_counter() - started:.1f} s; newer: share of LLM steps on the newer pool)")
    print(f"{'solver, steps':<16}{'seconds':>9}  solver")
    timings = {}
    for steps in (10, 100, 1000):
        timings[steps], solver = solver_seconds(steps)
        print(f"{steps:<16}{timings[steps]:>9.3f}  {solver}")
    ours, newest = heaviest["ours (plan + re-plan)"], heaviest["all newest"]
    print(
        f"bench-agents: cost_vs_newest={ours[0] / newest[0]:.2f} sla={ours[1]:.2f} newest_sla={newest[1]:.2f} "
        f"soonest_sla={heaviest['soonest end'][1]:.2f} "
        f"solver_seconds_1000={timings[1000]:.3f} cost_floor={floor:.2f} load={LOADS[-1]:.1f}"
    )


if __name__ == "__main__":
    main()
