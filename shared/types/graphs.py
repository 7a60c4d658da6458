"""Agentic task graphs: the spec users submit, and its validation with located errors.

A graph is a list of steps with an end-to-end deadline (the SLA). A step is
an LLM call (`llm`), a registered tool run by a Celery worker or an HTTP tool
(`tool`), or a registered retriever (`retrieval`). Text fields are templates:
`{{steps.ID}}` is the output of step ID, `{{inputs.NAME}}` an input given at
submission. A step runs once every step it references, and every step in its
`after`, has finished. The graph's result is the output of its `output` step
(default: the last step).

`check_graph` reports every problem at once, each located by its JSON path
(`steps[2].prompt`): duplicate ids, references to unknown steps or inputs,
placeholders that reference nothing, cycles, unknown models, tools or
retrievers.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field, model_validator

_ID = r"^[a-z0-9][a-z0-9_-]{0,62}$"
PLACEHOLDER = re.compile(r"\{\{\s*(.*?)\s*\}\}")
_REFERENCE = re.compile(r"^(steps|inputs)\.([A-Za-z0-9_-]+)$")


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=_ID, description="Unique within the graph.")
    after: list[str] = Field(default_factory=list, max_length=1000, description="Steps that must finish first.")


class LLMStep(_Step):
    kind: Literal["llm"] = "llm"
    model: str = Field(min_length=1, max_length=63)
    prompt: str = Field(min_length=1, max_length=200_000, description="Template over earlier outputs and inputs.")
    max_tokens: int = Field(default=128, ge=1, le=32_768)
    temperature: float = Field(default=0.0, ge=0, le=2)
    prompt_tokens_estimate: int | None = Field(
        default=None, ge=1, description="Prompt size for planning (default: from the template's length)."
    )


class ToolStep(_Step):
    kind: Literal["tool"] = "tool"
    tool: str | None = Field(default=None, max_length=63, description="A registered Python tool.")
    url: str | None = Field(default=None, pattern=r"^https?://", max_length=2048, description="Or an HTTP tool.")
    args: dict[str, str] = Field(default_factory=dict, description="Arguments; values are templates.")
    timeout_s: float = Field(default=30.0, gt=0, le=3600)
    retries: int = Field(default=2, ge=0, le=10, description="Attempts after the first when it fails.")
    expected_s: float = Field(default=1.0, gt=0, le=3600, description="Planning estimate of its duration.")

    @model_validator(mode="after")
    def _one_target(self) -> ToolStep:
        if (self.tool is None) == (self.url is None):
            raise ValueError("give exactly one of tool (a registered tool) or url (an HTTP tool)")
        return self


class RetrievalStep(_Step):
    kind: Literal["retrieval"] = "retrieval"
    retriever: str = Field(min_length=1, max_length=63)
    query: str = Field(min_length=1, max_length=10_000, description="Template.")
    top_k: int = Field(default=3, ge=1, le=100)
    expected_s: float = Field(default=0.2, gt=0, le=600)


Step = Annotated[LLMStep | ToolStep | RetrievalStep, Field(discriminator="kind")]


class SLA(BaseModel):
    model_config = ConfigDict(extra="forbid")

    deadline_s: float = Field(gt=0, le=86_400, description="End-to-end deadline from submission.")


class GraphSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="graph", pattern=_ID)
    steps: list[Step] = Field(min_length=1, max_length=1000)
    sla: SLA
    inputs: dict[str, str] = Field(default_factory=dict, description="Values for {{inputs.NAME}}.")
    output: str | None = Field(default=None, description="The step whose output is the result (default: the last).")

    @property
    def result_step(self) -> str:
        return self.output or self.steps[-1].id


def templates(step: LLMStep | ToolStep | RetrievalStep) -> dict[str, str]:
    """The step's template fields by their location under the step."""
    if isinstance(step, LLMStep):
        return {"prompt": step.prompt}
    if isinstance(step, RetrievalStep):
        return {"query": step.query}
    return {f"args.{key}": value for key, value in step.args.items()}


def references(text: str) -> list[tuple[str, str]]:
    """(kind, name) of each placeholder, ('', raw) for one that names nothing."""
    found = []
    for raw in PLACEHOLDER.findall(text):
        match = _REFERENCE.match(raw)
        found.append((match.group(1), match.group(2)) if match else ("", raw))
    return found


def dependencies(spec: GraphSpec) -> dict[str, list[str]]:
    """Each step's prerequisites: its `after` plus the steps its templates read."""
    out: dict[str, list[str]] = {}
    for step in spec.steps:
        deps = list(step.after)
        for text in templates(step).values():
            deps += [name for kind, name in references(text) if kind == "steps"]
        out[step.id] = list(dict.fromkeys(deps))
    return out


@dataclass(frozen=True)
class GraphProblem:
    location: str  # JSON path, e.g. steps[2].prompt
    message: str

    def __str__(self) -> str:
        return f"{self.location}: {self.message}"


def check_graph(
    spec: GraphSpec,
    models: Collection[str],
    tools: Collection[str],
    retrievers: Collection[str],
) -> list[GraphProblem]:
    """Every problem of a parsed graph (see the module doc); empty when it can run."""
    problems: list[GraphProblem] = []
    where: dict[str, int] = {}
    for index, step in enumerate(spec.steps):
        if step.id in where:
            problems.append(
                GraphProblem(f"steps[{index}].id", f"duplicate id {step.id!r} (also steps[{where[step.id]}])")
            )
        else:
            where[step.id] = index
    for index, step in enumerate(spec.steps):
        here = f"steps[{index}]"
        for n, name in enumerate(step.after):
            if name not in where:
                problems.append(GraphProblem(f"{here}.after[{n}]", f"unknown step {name!r}"))
        for field_name, text in templates(step).items():
            problems += _check_template(f"{here}.{field_name}", text, step.id, where, spec.inputs)
        problems += _check_target(here, step, models, tools, retrievers)
    if spec.output is not None and spec.output not in where:
        problems.append(GraphProblem("output", f"unknown step {spec.output!r}"))
    # A step reading itself is reported above; unknown steps too.
    cycle = find_cycle({k: [d for d in v if d in where and d != k] for k, v in dependencies(spec).items()})
    if cycle:
        problems.append(GraphProblem(f"steps[{where[cycle[0]]}]", f"cycle: {' -> '.join(cycle)}"))
    return problems


def _check_template(
    location: str, text: str, own: str, steps: Mapping[str, int], inputs: Mapping[str, str]
) -> list[GraphProblem]:
    problems = []
    for kind, name in references(text):
        if kind == "":
            problems.append(
                GraphProblem(
                    location, f"{{{{{name}}}}} references nothing: use {{{{steps.ID}}}} or {{{{inputs.NAME}}}}"
                )
            )
        elif kind == "steps" and name == own:
            problems.append(GraphProblem(location, f"step {own!r} reads its own output"))
        elif kind == "steps" and name not in steps:
            problems.append(GraphProblem(location, f"references unknown step {name!r}"))
        elif kind == "inputs" and name not in inputs:
            problems.append(GraphProblem(location, f"references input {name!r}, which was not given"))
    return problems


def _check_target(
    here: str,
    step: LLMStep | ToolStep | RetrievalStep,
    models: Collection[str],
    tools: Collection[str],
    retrievers: Collection[str],
) -> list[GraphProblem]:
    def unknown(location: str, what: str, name: str, known: Collection[str]) -> GraphProblem:
        return GraphProblem(location, f"unknown {what} {name!r}; known: {', '.join(sorted(known)) or 'none'}")

    if isinstance(step, LLMStep) and step.model not in models:
        return [unknown(f"{here}.model", "model", step.model, models)]
    if isinstance(step, ToolStep) and step.tool is not None and step.tool not in tools:
        return [unknown(f"{here}.tool", "tool", step.tool, tools)]
    if isinstance(step, RetrievalStep) and step.retriever not in retrievers:
        return [unknown(f"{here}.retriever", "retriever", step.retriever, retrievers)]
    return []


def find_cycle(edges: Mapping[str, list[str]]) -> list[str]:
    """A cycle in step -> prerequisite edges as [a, b, ..., a], or [] when there is none."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    for root in edges:
        if state.get(root):
            continue
        stack: list[tuple[str, int]] = [(root, 0)]
        path = [root]
        state[root] = 1
        while stack:
            node, i = stack[-1]
            deps = edges.get(node, [])
            if i < len(deps):
                stack[-1] = (node, i + 1)
                nxt = deps[i]
                if state.get(nxt) == 1:
                    return [*path[path.index(nxt) :], nxt]
                if not state.get(nxt):
                    state[nxt] = 1
                    stack.append((nxt, 0))
                    path.append(nxt)
            else:
                state[node] = 2
                stack.pop()
                path.pop()
    return []


class RunState(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED)


class StepRecord(BaseModel):
    kind: str
    state: RunState = RunState.PENDING
    pool: str = ""  # the planned pool of an LLM step
    estimated_s: float = 0.0
    estimated_cost: float = 0.0
    attempts: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    output: str | None = None
    error: str | None = None
    cached_tokens: int = 0  # LLM steps: prompt tokens the worker found cached


class GraphRecord(BaseModel):
    """A submitted graph as the API reports it: per-step progress, timings, plan and result."""

    id: str
    name: str
    state: RunState = RunState.PENDING
    session_id: str
    created_at: float
    deadline_at: float
    finished_at: float | None = None
    spec: GraphSpec
    steps: dict[str, StepRecord]
    plan_cost: float = 0.0
    plan_latency_s: float = 0.0
    plan_solver: str = ""
    plan_notes: list[str] = Field(default_factory=list)
    replans: int = 0
    result: str | None = None
    error: str | None = None
    trace_id: str = ""
    cancel_requested: bool = False

    @computed_field  # type: ignore[prop-decorator]
    @property
    def prerequisites(self) -> dict[str, list[str]]:
        """The graph's edges: each step's `after` plus the steps its templates read."""
        return dependencies(self.spec)
