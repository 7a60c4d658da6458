"""Placing an agent graph's LLM steps on pools of different hardware. Pure functions.

Each LLM step can run on any pool serving its model. On pool p a step of P
prompt and O output tokens is estimated to take

    latency = wait_s + P / prefill_tps + O / stream_tps     (seconds)
    cost    = cost_per_hour / 3600 * (P / prefill_tps + O / decode_tps)

the replica-time it occupies priced by the hour: prefill runs a replica flat
out, decode shares it with a batch. `wait_s` is the queueing a step meets on
the pool now (`queue_wait`, from the workers' load reports): a saturated
pool is slower for the steps planned now, and its price is unchanged. Tool
and retrieval steps have a fixed estimate and no GPU cost. The graph's
latency is its critical path.

`plan` minimises total cost subject to critical path <= deadline:

* exact on small graphs (up to `exact_limit` LLM steps): a MILP solved by
  HiGHS — binary x[s, p] (step s on pool p), continuous start times t[s] with
  t[s] >= t[u] + latency[u] for every prerequisite u and t[s] + latency[s] <=
  deadline;
* a heuristic on larger ones: every step on its cheapest pool, then, while
  the critical path misses the deadline, the upgrade on the critical path
  that saves the most seconds per unit of added cost;

and when no assignment meets the deadline, the fastest one, flagged. The
plan says why: per step its pool, estimated start, latency and cost.
`replan` plans what is left of a running graph against the time left.

The runner plans to `HEADROOM` short of the deadline (the estimates are
means; real steps vary) and re-plans the steps not started whenever steps
finish: the queues it planned against have moved. bench-agents runs the same
rules.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import highspy

from shared.types.graphs import PLACEHOLDER, GraphSpec, LLMStep, RetrievalStep, dependencies, references

# Plan to 60% of the deadline: estimates are means and real steps vary (bench-agents draws them log-normal,
# sigma 0.3), and a plan to the whole deadline has no slack left for a slow step or a queue that grows.
# There, at the heaviest load, it keeps 0.80 of graphs on time against 0.78 with none.
HEADROOM = 0.4


@dataclass(frozen=True)
class Hardware:
    """One pool as placement sees it (the hardware catalogue's entry)."""

    pool: str
    model: str
    gpu_type: str
    cost_per_hour: float
    prefill_tps: float  # prompt tokens per second on one replica
    decode_tps: float  # generated tokens per second one replica sustains, batched
    stream_tps: float  # generated tokens per second one stream sees (1 / time between tokens)
    measured: bool = False  # from workers' reports, not the pool's declared prior
    wait_s: float = 0.0  # queueing a step meets there now (`queue_wait`)

    def latency(self, prompt: int, output: int) -> float:
        return self.wait_s + prompt / self.prefill_tps + output / self.stream_tps

    def cost(self, prompt: int, output: int) -> float:
        return self.cost_per_hour / 3600 * (prompt / self.prefill_tps + output / self.decode_tps)


@dataclass(frozen=True)
class PlanStep:
    """A step as the planner sees it: an LLM call to place, or fixed work."""

    id: str
    deps: tuple[str, ...]
    model: str = ""  # "" for tool and retrieval steps
    prompt_tokens: int = 0
    output_tokens: int = 0
    fixed_s: float = 0.0  # tool / retrieval estimate, or what is left of a running step

    @property
    def placed(self) -> bool:
        return bool(self.model)


@dataclass(frozen=True)
class StepChoice:
    pool: str  # "" for steps that need no GPU
    start_s: float
    latency_s: float
    cost: float


@dataclass(frozen=True)
class Plan:
    choices: dict[str, StepChoice]
    latency_s: float
    cost: float
    meets_deadline: bool
    solver: str  # milp | heuristic | fastest | fixed
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def queue_wait(loads: Iterable[tuple[int, float]]) -> float:
    """How long a step sent to a pool now waits before its first token, from each schedulable worker's
    load report (requests waiting, time-to-first-token p90): nothing while some worker has no queue
    (the router sends it there), else the least TTFT that workers' recent requests saw, queueing and
    their prefill included. An estimate, read when a plan is made: it never reaches the price."""
    ttfts = []
    for waiting, ttft_p90_s in loads:
        if waiting == 0:
            return 0.0
        ttfts.append(ttft_p90_s)
    return min(ttfts, default=0.0)


class PlanError(ValueError):
    """No pool can run a step (its model is served nowhere)."""


def _options(steps: Sequence[PlanStep], catalogue: Sequence[Hardware]) -> dict[str, list[Hardware]]:
    options = {}
    for step in steps:
        if step.placed:
            options[step.id] = [h for h in catalogue if h.model == step.model]
            if not options[step.id]:
                raise PlanError(f"step {step.id!r}: no pool serves model {step.model!r}")
    return options


def _order(steps: Sequence[PlanStep]) -> list[PlanStep]:
    """Kahn's order; prerequisites outside `steps` (finished ones) are ignored."""
    ids = {s.id for s in steps}
    by_id = {s.id: s for s in steps}
    waiting = {s.id: sum(1 for d in s.deps if d in ids) for s in steps}
    users: dict[str, list[str]] = {s.id: [] for s in steps}
    for s in steps:
        for d in s.deps:
            if d in ids:
                users[d].append(s.id)
    ready = [s.id for s in steps if waiting[s.id] == 0]
    order = []
    while ready:
        current = ready.pop()
        order.append(by_id[current])
        for user in users[current]:
            waiting[user] -= 1
            if waiting[user] == 0:
                ready.append(user)
    if len(order) != len(steps):
        raise PlanError("the graph has a cycle")
    return order


def evaluate(steps: Sequence[PlanStep], assignment: Mapping[str, Hardware], start_at: float = 0.0) -> Plan:
    """Schedule an assignment as early as its prerequisites allow; its latency and cost."""
    finish: dict[str, float] = {}
    choices: dict[str, StepChoice] = {}
    for step in _order(steps):
        start = max((finish[d] for d in step.deps if d in finish), default=start_at)
        hardware = assignment.get(step.id)
        if hardware is None:
            latency, cost, pool = step.fixed_s, 0.0, ""
        else:
            latency = hardware.latency(step.prompt_tokens, step.output_tokens)
            cost, pool = hardware.cost(step.prompt_tokens, step.output_tokens), hardware.pool
        finish[step.id] = start + latency
        choices[step.id] = StepChoice(pool, start, latency, cost)
    makespan = max(finish.values(), default=start_at) - start_at
    total = sum(c.cost for c in choices.values())
    return Plan(choices, makespan, total, True, "fixed")


def place_all(steps: Sequence[PlanStep], catalogue: Sequence[Hardware], pick: str) -> Plan:
    """Baselines: every step on its model's `newest` (fastest prefill) or `cheapest` pool."""
    options = _options(steps, catalogue)

    def choose(candidates: list[Hardware]) -> Hardware:
        if pick == "newest":
            return max(candidates, key=lambda h: (h.prefill_tps, -h.cost_per_hour))
        return min(candidates, key=lambda h: (h.cost_per_hour, -h.prefill_tps))

    return evaluate(steps, {s: choose(c) for s, c in options.items()})


def plan(
    steps: Sequence[PlanStep],
    catalogue: Sequence[Hardware],
    deadline_s: float,
    exact_limit: int = 40,
    start_at: float = 0.0,
    headroom: float = 0.0,
) -> Plan:
    """The cheapest assignment whose critical path meets the deadline (see the module doc).

    `headroom` plans to that share less than the deadline: estimates are means, real steps vary.
    """
    started = time.perf_counter()
    options = _options(steps, catalogue)
    target = deadline_s * (1 - headroom)
    if len(options) <= exact_limit:
        assignment, solver = _milp(steps, options, target), "milp"
    else:
        assignment, solver = _heuristic(steps, options, target), "heuristic"
    notes = []
    if assignment is None:
        by_id = {s.id: s for s in steps}
        assignment = {
            s: min(c, key=lambda h: h.latency(by_id[s].prompt_tokens, by_id[s].output_tokens))
            for s, c in options.items()
        }
        solver = "fastest"
        short = f"{target:.1f} s, the deadline less {headroom:.0%} head-room" if headroom else "the deadline"
        notes.append(f"no assignment meets {short}: every step on its fastest pool")
    result = evaluate(steps, assignment, start_at)
    meets = result.latency_s <= deadline_s + 1e-6
    return Plan(result.choices, result.latency_s, result.cost, meets, solver, time.perf_counter() - started, notes)


def replan(
    steps: Sequence[PlanStep],
    catalogue: Sequence[Hardware],
    deadline_s: float,
    elapsed_s: float,
    done: Collection[str],
    running: Mapping[str, float],
    headroom: float = 0.0,
) -> Plan:
    """Plan what is left: finished steps drop out, running ones keep their pool with `running[id]` s left."""
    left = []
    for step in steps:
        if step.id in done:
            continue
        if step.id in running:
            left.append(PlanStep(step.id, step.deps, fixed_s=running[step.id]))
        else:
            left.append(step)
    remaining = max(0.0, deadline_s - elapsed_s)
    return plan(left, catalogue, remaining, start_at=elapsed_s, headroom=headroom)


def _milp(
    steps: Sequence[PlanStep], options: Mapping[str, list[Hardware]], deadline_s: float
) -> dict[str, Hardware] | None:
    highs = highspy.Highs()  # type: ignore[no-untyped-call]
    highs.setOptionValue("output_flag", False)
    highs.setOptionValue("time_limit", 10.0)
    pick: dict[str, list[tuple[Hardware, Any]]] = {}
    latency: dict[str, Any] = {}
    for step in steps:
        if step.placed:
            pick[step.id] = [
                (h, highs.addBinary(obj=h.cost(step.prompt_tokens, step.output_tokens))) for h in options[step.id]
            ]
            highs.addConstr(sum(var for _, var in pick[step.id]) == 1)
            latency[step.id] = sum(h.latency(step.prompt_tokens, step.output_tokens) * var for h, var in pick[step.id])
        else:
            latency[step.id] = step.fixed_s
    ids = {s.id for s in steps}
    start = {s.id: highs.addVariable(lb=0.0) for s in steps}
    for step in steps:
        for dep in step.deps:
            if dep in ids:
                highs.addConstr(start[step.id] >= start[dep] + latency[dep])
        highs.addConstr(start[step.id] + latency[step.id] <= deadline_s)
    highs.run()
    if highs.getModelStatus() != highspy.HighsModelStatus.kOptimal:
        return None
    values = highs.getSolution().col_value
    return {s: max(choices, key=lambda hv: values[hv[1].index])[0] for s, choices in pick.items()}


def _heuristic(
    steps: Sequence[PlanStep], options: Mapping[str, list[Hardware]], deadline_s: float
) -> dict[str, Hardware] | None:
    by_id = {s.id: s for s in steps}
    assignment = {
        s: min(c, key=lambda h: h.cost(by_id[s].prompt_tokens, by_id[s].output_tokens)) for s, c in options.items()
    }
    for _ in range(10 * len(options) + 10):
        current = evaluate(steps, assignment)
        if current.latency_s <= deadline_s:
            return assignment
        best: tuple[float, str, Hardware] | None = None
        for step_id in _critical_path(steps, current):
            if step_id not in options:
                continue
            step, now = by_id[step_id], assignment[step_id]
            for candidate in options[step_id]:
                saved = now.latency(step.prompt_tokens, step.output_tokens) - candidate.latency(
                    step.prompt_tokens, step.output_tokens
                )
                if saved <= 1e-9:
                    continue
                extra = candidate.cost(step.prompt_tokens, step.output_tokens) - now.cost(
                    step.prompt_tokens, step.output_tokens
                )
                score = saved / max(extra, 1e-12)
                if best is None or score > best[0]:
                    best = (score, step_id, candidate)
        if best is None:
            return None
        assignment[best[1]] = best[2]
    return None


def _critical_path(steps: Sequence[PlanStep], current: Plan) -> list[str]:
    """Steps on the longest path, walked back from the last to finish."""
    by_id = {s.id: s for s in steps}
    end = max(current.choices, key=lambda s: current.choices[s].start_s + current.choices[s].latency_s)
    path = [end]
    while True:
        choice = current.choices[path[-1]]
        deps = [d for d in by_id[path[-1]].deps if d in current.choices]
        tight = [
            d for d in deps if abs(current.choices[d].start_s + current.choices[d].latency_s - choice.start_s) < 1e-9
        ]
        if not tight:
            return path
        path.append(tight[0])


# Tokens a non-LLM step's output adds to a prompt that reads it (planning estimates).
RETRIEVED_TOKENS_PER_DOC = 128
TOOL_OUTPUT_TOKENS = 64


def plan_steps(spec: GraphSpec) -> list[PlanStep]:
    """The planner's view of a graph: prompt sizes from the templates (4 characters a token) plus what
    they read, output sizes from max_tokens."""
    produced: dict[str, int] = {}
    for step in spec.steps:
        if isinstance(step, LLMStep):
            produced[step.id] = step.max_tokens
        elif isinstance(step, RetrievalStep):
            produced[step.id] = step.top_k * RETRIEVED_TOKENS_PER_DOC
        else:
            produced[step.id] = TOOL_OUTPUT_TOKENS
    deps = dependencies(spec)
    out = []
    for step in spec.steps:
        if isinstance(step, LLMStep):
            text = PLACEHOLDER.sub("", step.prompt)
            read = sum(produced.get(name, 0) for kind, name in references(step.prompt) if kind == "steps")
            inputs = sum(len(spec.inputs.get(name, "")) for kind, name in references(step.prompt) if kind == "inputs")
            prompt = step.prompt_tokens_estimate or max(1, (len(text) + inputs) // 4 + read)
            out.append(PlanStep(step.id, tuple(deps[step.id]), step.model, prompt, step.max_tokens))
        else:
            out.append(PlanStep(step.id, tuple(deps[step.id]), fixed_s=step.expected_s))
    return out
