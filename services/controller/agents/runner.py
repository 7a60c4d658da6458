"""Running agent graphs: plan, start steps as their inputs are ready, re-plan when late, cancel.

A graph runs as one asyncio task in the controller, inside one trace span
(every step a child span; LLM calls carry the trace to the router). Its
state is a `GraphRecord` in Redis, written at every step change, so the API
reports per-step progress and timings.

* LLM steps go to the router's OpenAI API with the graph's session id
  (`x-session-id`), so consecutive steps land on the worker holding their
  prefix (the router's session scorer), and their planned pool
  (`x-shoal-pool`), which the router prefers while it has a serving worker.
  In a graph with tool steps they also ask the router (`x-shoal-pin-s`) to
  copy the prompt's prefix to the kvstore pinned for the session until the
  deadline, so it outlives the worker evicting it during a tool call.
* Registered tools run on the Celery worker (`shoal.agent_tool`); HTTP tools
  are POSTed their arguments as JSON. A failed or timed-out attempt is
  retried up to the step's `retries`, then fails the graph.
* Retrievers run here, in a thread.

Plans leave head-room before the deadline. Whenever steps finish, the steps
not started yet are re-planned against the time left and the queueing each
pool's workers report then (shared/policies/agents.py), and the plan's
pools are recorded. Cancelling stops the running steps (HTTP calls are
abandoned, Celery tasks revoked) and the graph ends `cancelled`. A graph
left running by a controller that stopped is marked failed at the next start.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence

import httpx
from opentelemetry import propagate, trace
from redis.asyncio import Redis

from services.controller.agents.egress import Address, EgressPolicy, pinned
from services.controller.agents.tools import RETRIEVERS
from shared.errors import FailedPrecondition, NotFound, PermissionDenied
from shared.policies.agents import HEADROOM, Hardware, Plan, plan, plan_steps, replan
from shared.state import schema
from shared.state.records import RecordIndex, RecordKeys
from shared.telemetry.logging import get_logger
from shared.types.graphs import (
    PLACEHOLDER,
    GraphRecord,
    GraphSpec,
    LLMStep,
    RetrievalStep,
    RunState,
    StepRecord,
    ToolStep,
    dependencies,
)

log = get_logger("shoal.controller.agents")
tracer = trace.get_tracer("shoal.controller.agents")

POLL_S = 0.2
OUTPUT_CHARS = 20_000  # kept per step in the record
PIN_MAX_S = 3600


class GraphStore:
    """Graph records (shared/state/records.py): expiring once finished, listed newest first."""

    def __init__(self, redis: Redis) -> None:
        self.records = RecordIndex(redis, RecordKeys(schema.graph, schema.GRAPH_INDEX, schema.OPEN_GRAPHS))

    async def save(self, record: GraphRecord) -> None:
        await self.records.put(record.id, record.model_dump_json(), record.created_at, record.state.final)

    async def get(self, graph_id: str) -> GraphRecord:
        raw = await self.records.get(graph_id)
        if raw is None:
            raise NotFound(f"no graph {graph_id!r}", param="graph_id")
        return GraphRecord.model_validate_json(raw)

    async def recent(self, limit: int = 100) -> list[GraphRecord]:
        return [GraphRecord.model_validate_json(raw) for raw in await self.records.recent(limit)]

    async def running(self) -> list[GraphRecord]:
        """Graphs not finished."""
        return [GraphRecord.model_validate_json(raw) for raw in await self.records.open(_finished)]


def _finished(raw: bytes) -> bool:
    return GraphRecord.model_validate_json(raw).state.final


ToolRunner = Callable[[str, dict[str, str], float], Awaitable[str]]


class StepFailed(Exception):
    pass


def render(text: str, outputs: dict[str, str], inputs: dict[str, str]) -> str:
    def value(match: re.Match[str]) -> str:
        kind, _, name = match.group(1).partition(".")
        return outputs.get(name, "") if kind == "steps" else inputs.get(name, "")

    return PLACEHOLDER.sub(value, text)


class GraphRunner:
    def __init__(
        self,
        store: GraphStore,
        router_url: str | None,
        run_tool: ToolRunner,
        catalogue: Callable[[], Awaitable[list[Hardware]]],
        router_key: str | None = None,
        egress: EgressPolicy | None = None,
    ) -> None:
        """`run_tool(name, args, timeout_s)` returns a registered tool's text (on the Celery worker);
        `catalogue()` the hardware catalogue, for re-planning."""
        self.store = store
        self.router_url = router_url
        self.run_tool = run_tool
        self.catalogue = catalogue
        self.router_key = router_key
        self.egress = egress or EgressPolicy([])
        self.tasks: dict[str, asyncio.Task[None]] = {}
        # Cancelled by a user through this controller (the Redis flag may be overwritten by a step's save).
        self.cancelled: set[str] = set()

    async def submit(self, spec: GraphSpec, catalogue: Sequence[Hardware]) -> GraphRecord:
        now = time.time()
        # Up to a second or two for a thousand steps: off the event loop.
        first = await asyncio.to_thread(plan, plan_steps(spec), catalogue, spec.sla.deadline_s, headroom=HEADROOM)
        record = GraphRecord(
            id=f"graph-{uuid.uuid4().hex[:12]}",
            name=spec.name,
            session_id=f"graph-{uuid.uuid4().hex}",
            created_at=now,
            deadline_at=now + spec.sla.deadline_s,
            spec=spec,
            steps={s.id: StepRecord(kind=s.kind) for s in spec.steps},
        )
        self._apply_plan(record, first)
        record.plan_cost, record.plan_latency_s, record.plan_solver = first.cost, first.latency_s, first.solver
        record.plan_notes = first.notes
        await self.store.save(record)
        self.tasks[record.id] = asyncio.create_task(self._run(record.id), name=record.id)
        return record

    async def cancel(self, graph_id: str) -> GraphRecord:
        record = await self.store.get(graph_id)
        if record.state.final:
            raise FailedPrecondition(f"graph {graph_id} already {record.state.value}", graph_id=graph_id)
        record.cancel_requested = True
        await self.store.save(record)
        self.cancelled.add(graph_id)
        task = self.tasks.get(graph_id)
        if task is not None:
            task.cancel()
        return record

    async def fail_orphans(self) -> None:
        """Graphs a previous controller left running cannot resume their in-flight calls: fail them."""
        for record in await self.store.running():
            if record.id not in self.tasks:
                record.state, record.error, record.finished_at = (
                    RunState.FAILED,
                    "the controller restarted",
                    time.time(),
                )
                await self.store.save(record)

    async def stop(self) -> None:
        for task in self.tasks.values():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)

    # -- one graph --------------------------------------------------------------------

    def _apply_plan(self, record: GraphRecord, result: Plan) -> None:
        for step_id, choice in result.choices.items():
            step = record.steps[step_id]
            if step.state is RunState.PENDING:
                step.pool, step.estimated_s, step.estimated_cost = choice.pool, choice.latency_s, choice.cost

    async def _run(self, graph_id: str) -> None:
        record = await self.store.get(graph_id)
        with tracer.start_as_current_span("graph", attributes={"shoal.graph": graph_id}) as span:
            record.trace_id = format(span.get_span_context().trace_id, "032x")
            record.state = RunState.RUNNING
            await self.store.save(record)
            try:
                await self._execute(record)
            except asyncio.CancelledError:
                # Cancelled by a user (the flag is in Redis), or by this controller stopping.
                if graph_id in self.cancelled or (await self.store.get(graph_id)).cancel_requested:
                    record.state, record.error, record.cancel_requested = RunState.CANCELLED, "cancelled", True
                else:
                    record.state, record.error = RunState.FAILED, "the controller stopped"
                for step in record.steps.values():
                    if not step.state.final:
                        step.state = RunState.CANCELLED
            except StepFailed as exc:
                record.state, record.error = RunState.FAILED, str(exc)
            else:
                record.state = RunState.SUCCEEDED
                record.result = record.steps[record.spec.result_step].output
            finally:
                record.finished_at = time.time()
                await self.store.save(record)
                self.tasks.pop(graph_id, None)
                self.cancelled.discard(graph_id)
                log.info("graph finished", graph=graph_id, state=record.state.value)

    async def _execute(self, record: GraphRecord) -> None:
        spec = record.spec
        deps = dependencies(spec)
        by_id = {s.id: s for s in spec.steps}
        outputs: dict[str, str] = {}
        running: dict[asyncio.Task[str], str] = {}
        try:
            while True:
                for step_id, step in record.steps.items():
                    if step.state is RunState.PENDING and all(d in outputs for d in deps[step_id]):
                        step.state, step.started_at = RunState.RUNNING, time.time()
                        task = asyncio.create_task(self._step(record, by_id[step_id], outputs))
                        running[task] = step_id
                await self.store.save(record)
                if not running:
                    return
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    step_id = running.pop(task)
                    step = record.steps[step_id]
                    step.finished_at = time.time()
                    if task.exception() is not None:
                        step.state, step.error = RunState.FAILED, str(task.exception())
                        raise StepFailed(f"step {step_id!r} failed after {step.attempts} attempt(s): {step.error}")
                    outputs[step_id] = task.result()
                    step.state, step.output = RunState.SUCCEEDED, outputs[step_id][:OUTPUT_CHARS]
                await self._replan(record, running)
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def _replan(self, record: GraphRecord, running: dict[asyncio.Task[str], str]) -> None:
        """Steps finished: plan what has not started against the time left and the pools' queues now."""
        if all(s.state is not RunState.PENDING for s in record.steps.values()):
            return
        now = time.time()
        done = {s for s, r in record.steps.items() if r.state is RunState.SUCCEEDED}
        left = {
            step_id: max(0.0, record.steps[step_id].estimated_s - (now - (record.steps[step_id].started_at or now)))
            for step_id in running.values()
        }
        result = await asyncio.to_thread(
            replan,
            plan_steps(record.spec),
            await self.catalogue(),
            record.spec.sla.deadline_s,
            now - record.created_at,
            done,
            left,
            HEADROOM,
        )
        self._apply_plan(record, result)
        record.replans += 1

    async def _step(
        self, record: GraphRecord, step: LLMStep | ToolStep | RetrievalStep, outputs: dict[str, str]
    ) -> str:
        state = record.steps[step.id]
        inputs = record.spec.inputs
        with tracer.start_as_current_span(f"step {step.id}", attributes={"shoal.step.kind": step.kind}):
            if isinstance(step, LLMStep):
                state.attempts = 1
                return await self._llm(record, step, render(step.prompt, outputs, inputs))
            if isinstance(step, RetrievalStep):
                state.attempts = 1
                retriever = RETRIEVERS[step.retriever]
                passages = await asyncio.to_thread(retriever, render(step.query, outputs, inputs), step.top_k)
                return "\n\n".join(passages)
            args = {key: render(value, outputs, inputs) for key, value in step.args.items()}
            address = None
            if step.url is not None:
                try:
                    address = await self.egress.vet(step.url)
                except PermissionDenied as exc:
                    raise StepFailed(exc.message) from None
            error = ""
            for attempt in range(1, step.retries + 2):
                state.attempts = attempt
                await self.store.save(record)
                try:
                    async with asyncio.timeout(step.timeout_s):
                        if step.url is not None and address is not None:
                            return await self._http_tool(step.url, address, args, step.timeout_s)
                        assert step.tool is not None
                        return await self.run_tool(step.tool, args, step.timeout_s)
                except Exception as exc:
                    error = "timed out" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
                    log.warning("tool attempt failed", graph=record.id, step=step.id, attempt=attempt, error=error)
            raise StepFailed(error)

    async def _llm(self, record: GraphRecord, step: LLMStep, prompt: str) -> str:
        if not self.router_url:
            raise StepFailed("the controller has no router to call (SHOAL_CONTROLLER_ROUTER_URL)")
        headers = {"x-session-id": record.session_id}
        if self.router_key:
            headers["authorization"] = f"Bearer {self.router_key}"
        if record.steps[step.id].pool:
            headers["x-shoal-pool"] = record.steps[step.id].pool
        if any(isinstance(s, ToolStep) for s in record.spec.steps):
            # Tool calls pause the agent: keep its prefix pinned in the kvstore until the deadline.
            headers["x-shoal-pin-s"] = str(int(min(PIN_MAX_S, max(1.0, record.deadline_at - time.time()))))
        propagate.inject(headers)
        body = {"model": step.model, "prompt": prompt, "max_tokens": step.max_tokens, "temperature": step.temperature}
        timeout = max(1.0, record.deadline_at - time.time()) + 30.0
        async with httpx.AsyncClient(base_url=self.router_url, timeout=timeout) as http:
            response = await http.post("/v1/completions", json=body, headers=headers)
        if response.status_code != 200:
            raise StepFailed(f"router answered {response.status_code}: {response.text[:300]}")
        answer = response.json()
        details = answer.get("usage", {}).get("prompt_tokens_details") or {}
        record.steps[step.id].cached_tokens = int(details.get("cached_tokens") or 0)
        return str(answer["choices"][0]["text"])

    @staticmethod
    async def _http_tool(url: str, address: Address, args: dict[str, str], timeout_s: float) -> str:
        """Post to the address the egress policy checked; no redirects (httpx's default, said here): one
        would lead past the policy."""
        target, headers, extensions = pinned(url, address)
        async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=False) as http:
            response = await http.post(target, json=args, headers=headers, extensions=extensions)
        if response.status_code >= 400:
            raise StepFailed(f"{url} answered {response.status_code}")
        return response.text
