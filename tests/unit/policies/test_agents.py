"""Agent graphs: located validation errors, and placement on heterogeneous pools."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import pytest
from pydantic import ValidationError

from shared.policies.agents import (
    Hardware,
    PlanError,
    PlanStep,
    evaluate,
    place_all,
    plan,
    plan_steps,
    queue_wait,
    replan,
)
from shared.types.graphs import GraphSpec, check_graph

pytestmark = pytest.mark.unit

NEW = Hardware("new", "m", "h100", 8.0, prefill_tps=40_000, decode_tps=3_000, stream_tps=80)
OLD = Hardware("old", "m", "a100", 2.0, prefill_tps=13_000, decode_tps=1_500, stream_tps=40)
CATALOGUE = [NEW, OLD]


def graph(steps: list[dict[str, Any]], **extra: Any) -> GraphSpec:
    return GraphSpec.model_validate({"steps": steps, "sla": {"deadline_s": 30}, **extra})


def problems(spec: GraphSpec) -> list[str]:
    return [str(p) for p in check_graph(spec, models={"m"}, tools={"calc"}, retrievers={"docs"})]


def test_a_valid_graph_has_no_problems() -> None:
    spec = graph(
        [
            {"id": "find", "kind": "retrieval", "retriever": "docs", "query": "{{inputs.q}}"},
            {"id": "ask", "kind": "llm", "model": "m", "prompt": "Context: {{steps.find}} Q: {{inputs.q}}"},
            {"id": "sum", "kind": "tool", "tool": "calc", "args": {"expr": "{{steps.ask}}"}, "after": ["find"]},
        ],
        inputs={"q": "why"},
    )
    assert problems(spec) == []
    assert spec.result_step == "sum"


def test_every_problem_is_reported_with_its_location() -> None:
    spec = graph(
        [
            {"id": "a", "kind": "llm", "model": "gpt-9", "prompt": "{{steps.b}} {{inputs.missing}}"},
            {"id": "b", "kind": "llm", "model": "m", "prompt": "{{steps.a}} {{nothing}}", "after": ["ghost"]},
            {"id": "a", "kind": "tool", "tool": "rm", "args": {"x": "{{steps.zzz}}"}},
            {"id": "r", "kind": "retrieval", "retriever": "web", "query": "{{steps.r}}"},
        ],
        output="nope",
    )
    found = problems(spec)
    expected = [
        "steps[2].id: duplicate id 'a' (also steps[0])",
        "steps[0].model: unknown model 'gpt-9'; known: m",
        "steps[0].prompt: references input 'missing', which was not given",
        "steps[1].after[0]: unknown step 'ghost'",
        "steps[1].prompt: {{nothing}} references nothing: use {{steps.ID}} or {{inputs.NAME}}",
        "steps[2].args.x: references unknown step 'zzz'",
        "steps[2].tool: unknown tool 'rm'; known: calc",
        "steps[3].query: step 'r' reads its own output",
        "steps[3].retriever: unknown retriever 'web'; known: docs",
        "output: unknown step 'nope'",
    ]
    for line in expected:
        assert line in found, (line, found)
    assert not any("cycle" in p for p in found)


def test_a_cycle_is_reported_at_its_first_step() -> None:
    spec = graph(
        [
            {"id": "x", "kind": "llm", "model": "m", "prompt": "start"},
            {"id": "a", "kind": "llm", "model": "m", "prompt": "{{steps.c}} {{steps.x}}"},
            {"id": "b", "kind": "tool", "tool": "calc", "args": {"e": "{{steps.a}}"}},
            {"id": "c", "kind": "llm", "model": "m", "prompt": "go", "after": ["b"]},
        ]
    )
    assert problems(spec) == ["steps[1]: cycle: a -> c -> b -> a"]


def test_malformed_specs_are_refused_by_the_schema() -> None:
    with pytest.raises(ValidationError, match="exactly one of tool"):
        graph([{"id": "t", "kind": "tool", "tool": "calc", "url": "http://x"}])
    with pytest.raises(ValidationError, match="String should match pattern"):
        graph([{"id": "Bad Id", "kind": "llm", "model": "m", "prompt": "p"}])


def chain(n: int, prompt: int = 2000, output: int = 200) -> list[PlanStep]:
    return [PlanStep(f"s{i}", (f"s{i - 1}",) if i else (), "m", prompt, output) for i in range(n)]


def test_loose_deadline_puts_everything_on_the_cheapest_pool() -> None:
    steps = chain(3)
    result = plan(steps, CATALOGUE, deadline_s=1000)
    assert result.solver == "milp" and result.meets_deadline
    assert {c.pool for c in result.choices.values()} == {"old"}
    assert result.cost == pytest.approx(place_all(steps, CATALOGUE, "cheapest").cost)


def test_tight_deadline_upgrades_just_enough_steps() -> None:
    steps = chain(4)
    slow, fast = place_all(steps, CATALOGUE, "cheapest"), place_all(steps, CATALOGUE, "newest")
    deadline = (slow.latency_s + fast.latency_s) / 2
    for limit in (40, 0):  # exact, then the heuristic
        result = plan(steps, CATALOGUE, deadline, exact_limit=limit)
        assert result.meets_deadline and result.latency_s <= deadline + 1e-6
        assert slow.cost < result.cost < fast.cost
        assert {c.pool for c in result.choices.values()} == {"new", "old"}
    assert plan(steps, CATALOGUE, deadline).cost <= plan(steps, CATALOGUE, deadline, exact_limit=0).cost + 1e-12


def test_the_exact_plan_is_optimal_on_random_small_graphs() -> None:
    rng = random.Random(4)
    for _ in range(5):
        steps = [
            PlanStep(
                f"s{i}",
                tuple(f"s{j}" for j in range(i) if rng.random() < 0.3),
                "m",
                rng.randint(500, 8000),
                rng.randint(20, 400),
            )
            for i in range(7)
        ]
        deadline = 0.8 * place_all(steps, CATALOGUE, "cheapest").latency_s
        best = plan(steps, CATALOGUE, deadline)
        # Brute force over all 2^7 assignments.
        feasible = []
        for mask in range(2**7):
            assignment = {s.id: CATALOGUE[(mask >> i) & 1] for i, s in enumerate(steps)}
            result = evaluate(steps, assignment)
            if result.latency_s <= deadline + 1e-9:
                feasible.append(result.cost)
        assert best.meets_deadline == bool(feasible)
        if feasible:
            assert best.cost == pytest.approx(min(feasible), rel=1e-6)


def test_an_impossible_deadline_gets_the_fastest_plan_flagged() -> None:
    result = plan(chain(3), CATALOGUE, deadline_s=0.01)
    assert not result.meets_deadline and result.solver == "fastest"
    assert {c.pool for c in result.choices.values()} == {"new"}
    assert "no assignment meets the deadline" in result.notes[0]
    with_headroom = plan(chain(3), CATALOGUE, deadline_s=0.01, headroom=0.4)
    assert "no assignment meets 0.0 s, the deadline less 40% head-room" in with_headroom.notes[0]


def test_queue_wait_is_nothing_while_a_worker_has_no_queue_else_the_least_recent_ttft() -> None:
    assert queue_wait([]) == 0.0
    assert queue_wait([(3, 4.0), (0, 9.0)]) == 0.0
    assert queue_wait([(3, 4.0), (1, 2.5), (7, 6.0)]) == 2.5


def test_a_queued_fast_pool_loses_the_steps_its_queue_would_make_late() -> None:
    steps = chain(3)
    fast = place_all(steps, CATALOGUE, "newest")
    deadline = fast.latency_s * 1.1
    assert {c.pool for c in plan(steps, CATALOGUE, deadline).choices.values()} == {"new"}
    # Waiting behind a queue on the new pool is slower than running on the old one.
    step_on_old = OLD.latency(2000, 200)
    queued = [replace(NEW, wait_s=step_on_old), OLD]
    moved = plan(steps, queued, deadline)
    assert moved.solver == "fastest" and {c.pool for c in moved.choices.values()} == {"old"}
    # The queue costs time, not money: the same assignment's price is unchanged.
    assert evaluate(steps, {s.id: queued[0] for s in steps}).cost == pytest.approx(fast.cost)
    assert evaluate(steps, {s.id: queued[0] for s in steps}).latency_s == pytest.approx(
        fast.latency_s + 3 * step_on_old
    )


def test_replanning_a_late_graph_upgrades_what_is_left() -> None:
    steps = chain(4)
    relaxed = plan(steps, CATALOGUE, deadline_s=place_all(steps, CATALOGUE, "cheapest").latency_s + 1)
    assert {c.pool for c in relaxed.choices.values()} == {"old"}
    # Step 0 ran late: half the deadline is gone with only it done.
    late = replan(steps, CATALOGUE, relaxed.latency_s, elapsed_s=relaxed.latency_s / 2, done={"s0"}, running={})
    assert set(late.choices) == {"s1", "s2", "s3"}
    assert "new" in {c.pool for c in late.choices.values()}
    assert min(c.start_s for c in late.choices.values()) == pytest.approx(relaxed.latency_s / 2)


def test_a_model_no_pool_serves_is_an_error() -> None:
    with pytest.raises(PlanError, match="no pool serves model 'x'"):
        plan([PlanStep("a", (), "x", 10, 10)], CATALOGUE, 10)


def test_plan_steps_estimates_prompts_from_templates_and_what_they_read() -> None:
    spec = graph(
        [
            {"id": "find", "kind": "retrieval", "retriever": "docs", "query": "q", "top_k": 2},
            {"id": "ask", "kind": "llm", "model": "m", "prompt": "x" * 400 + "{{steps.find}}", "max_tokens": 50},
        ]
    )
    find, ask = plan_steps(spec)
    assert not find.placed and find.fixed_s == pytest.approx(0.2)
    assert ask.deps == ("find",) and ask.output_tokens == 50
    assert ask.prompt_tokens == 100 + 2 * 128
