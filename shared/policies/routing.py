"""Routing policy: which worker serves a request. Pure functions of a snapshot.

A routing *profile* is a pipeline of small plugins, in the manner of
Kubernetes' scheduler framework and llm-d's inference scheduler:

1. **Filters** drop workers that must not serve this request
   (`filter(request, workers) -> workers`).
2. **Scorers** rate each remaining worker in [0, 1]
   (`score(request, workers) -> {worker_id: score}`); a profile weighs them.
3. A **picker** chooses from the weighted totals
   (`pick(request, totals) -> Decision`). "No eligible worker" is a value
   (a Decision with no worker and a reason), not an exception.

Every built-in is listed in FILTERS / SCORERS / PICKERS by its kebab-case
`type`, with a pydantic `Params` model. Profiles come from a versioned YAML
document (`RoutingConfig`); PRESETS name the common ones. The router and the
simulator call the same code. Nothing here performs I/O or reads a clock.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# -- the snapshot -------------------------------------------------------------


class Phase(enum.StrEnum):
    """What the chosen worker will do with the request."""

    GENERATE = "generate"  # prefill and decode on one worker
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(frozen=True)
class WorkerView:
    """One worker as routing sees it, for one request."""

    worker_id: str
    role: str  # prefill | decode | mixed
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0  # fraction of KV blocks in use, [0, 1]
    max_running: int = 0
    # Requests the worker accepts at once (running + queued); 0 = unknown.
    capacity: int = 0
    cached_blocks: int = 0  # leading blocks of this request's prompt the worker holds
    gpu_type: str = ""
    # Prompt tokens the worker has yet to prefill (queued and part-done requests, cache hits left out).
    prefill_tokens: int = 0
    # Tokens whose KV the worker's running requests hold: what each of its decode steps reads.
    kv_tokens: int = 0

    @property
    def queue(self) -> int:
        return self.running + self.waiting


@dataclass(frozen=True)
class RequestView:
    """The request as routing sees it."""

    phase: Phase
    prompt_tokens: int
    prompt_blocks: int  # full blocks of the prompt
    block_size: int
    session_id: str = ""
    # The worker that served this session last, if still known.
    session_worker: str = ""


class Reason(enum.StrEnum):
    """Why a decision came out as it did (exported as a metric label)."""

    SCORED = "scored"
    ROUND_ROBIN = "round-robin"
    RANDOM = "random"
    SESSION = "session"
    NO_WORKER = "no-worker"
    ALL_OVERLOADED = "all-overloaded"


@dataclass(frozen=True)
class Decision:
    worker_id: str | None
    reason: Reason
    scores: Mapping[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.worker_id is not None


# -- extension points ---------------------------------------------------------


class Filter(Protocol):
    """Keeps the workers allowed to serve the request; pure."""

    def filter(self, request: RequestView, workers: Sequence[WorkerView]) -> list[WorkerView]: ...


class Scorer(Protocol):
    """Rates workers in [0, 1] (1 best); pure. Must return a score for every worker given."""

    def score(self, request: RequestView, workers: Sequence[WorkerView]) -> dict[str, float]: ...


class Picker(Protocol):
    """Chooses one worker from weighted totals. May keep state (a round-robin counter)."""

    def pick(self, request: RequestView, workers: Sequence[WorkerView], totals: Mapping[str, float]) -> Decision: ...


# -- filters ------------------------------------------------------------------


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RoleFilter:
    """Type `role`: keep workers whose role serves the phase.

    Prefill goes to prefill workers, or mixed ones when there is none;
    decode and whole requests go to decode or mixed workers, or prefill
    workers when nothing else is left (so a cluster of one role still serves).
    """

    class Params(_Params):
        strict: bool = Field(default=False, description="Never fall back to another role.")

    def __init__(self, params: Params) -> None:
        self.params = params

    def filter(self, request: RequestView, workers: Sequence[WorkerView]) -> list[WorkerView]:
        preferred = ("prefill",) if request.phase is Phase.PREFILL else ("decode", "mixed")
        chosen = [w for w in workers if w.role in preferred]
        if chosen or self.params.strict:
            return chosen
        fallback = ("mixed",) if request.phase is Phase.PREFILL else ("prefill",)
        return [w for w in workers if w.role in fallback]


class OverloadFilter:
    """Type `overload`: drop full workers (all dropped -> 'all-overloaded', a 429).

    A worker is full when its queue reaches its own capacity (what it would
    refuse) or `max_queue`, whichever is lower, or its KV cache is nearly full.
    """

    class Params(_Params):
        max_queue: int = Field(
            default=4096, ge=1, description="Running plus waiting requests at which a worker is full."
        )
        max_kv_usage: float = Field(default=0.98, gt=0, le=1, description="KV usage at which a worker is full.")

    def __init__(self, params: Params) -> None:
        self.params = params

    def filter(self, request: RequestView, workers: Sequence[WorkerView]) -> list[WorkerView]:
        max_queue, max_kv = self.params.max_queue, self.params.max_kv_usage
        return [
            w
            for w in workers
            if w.running + w.waiting < (w.capacity if 0 < w.capacity < max_queue else max_queue) and w.kv_usage < max_kv
        ]


# -- scorers ------------------------------------------------------------------


class QueueScorer:
    """Type `queue`: (max_q - q) / (max_q - min_q) over the candidates; 1 for all when equal."""

    class Params(_Params):
        pass

    def __init__(self, params: Params) -> None:
        self.params = params

    def score(self, request: RequestView, workers: Sequence[WorkerView]) -> dict[str, float]:
        return _least_best(workers, [w.running + w.waiting for w in workers])


class KVUsageScorer:
    """Type `kv-usage`: 1 - fraction of KV blocks in use."""

    class Params(_Params):
        pass

    def __init__(self, params: Params) -> None:
        self.params = params

    def score(self, request: RequestView, workers: Sequence[WorkerView]) -> dict[str, float]:
        return {w.worker_id: max(0.0, 1.0 - w.kv_usage) for w in workers}


class PrefixScorer:
    """Type `prefix`: the fraction of the prompt's blocks the worker holds (from KV events)."""

    class Params(_Params):
        pass

    def __init__(self, params: Params) -> None:
        self.params = params

    def score(self, request: RequestView, workers: Sequence[WorkerView]) -> dict[str, float]:
        blocks = request.prompt_blocks
        if blocks == 0:
            return dict.fromkeys((w.worker_id for w in workers), 0.0)
        return {w.worker_id: min(1.0, w.cached_blocks / blocks) if w.cached_blocks else 0.0 for w in workers}


class WorkScorer:
    """Type `work`: the work a request would queue behind and cost there, as Dynamo's KV router scores it.

    A worker's cost is the prompt tokens it has yet to prefill, plus this request's prompt
    tokens it does not hold, plus `decode_weight` x the KV tokens its running requests hold,
    plus `eviction_weight` x its KV usage x the tokens of the prefix another candidate holds
    and it does not. Prefill is what a new request waits behind, and a cached prefix counts as
    the prefill it saves, in the same tokens as the queue: a worker holding the prefix wins
    while its queue is shorter than what the prefix saves. Computing that prefix again where
    the cache is full also writes a second copy of it over blocks other requests would have
    found; an empty cache loses nothing, and neither does a prompt no worker holds. A
    prefill-only phase leaves decode load out; a decode phase (its KV comes from the prefill
    worker) leaves prefill out.
    """

    class Params(_Params):
        eviction_weight: float = Field(
            default=2.0,
            ge=0,
            description="Cost of a token of prefix another worker holds, computed again on a worker whose KV cache "
            "is full, in queued prompt tokens, scaled by its KV usage: the copy evicts prefixes others would reuse. "
            "At 0 a hot prefix spreads to every short queue, which loses under overload (docs/routing.md).",
        )
        decode_weight: float = Field(
            default=0.1,
            ge=0,
            description="Cost of a token of KV held by running requests, in prompt tokens to prefill: each "
            "decode step reads all of it, but a step of a whole batch costs about what a few prompt tokens do.",
        )

    def __init__(self, params: Params) -> None:
        self.params = params

    def cost(self, request: RequestView, worker: WorkerView, held_elsewhere: int = 0) -> float:
        """`held_elsewhere`: the most blocks of this prompt any candidate holds."""
        prefill = 0.0
        if request.phase is not Phase.DECODE:
            prefill = worker.prefill_tokens + max(0, request.prompt_tokens - worker.cached_blocks * request.block_size)
            copied = max(0, held_elsewhere - worker.cached_blocks) * request.block_size
            prefill += self.params.eviction_weight * worker.kv_usage * copied
        decode = 0.0 if request.phase is Phase.PREFILL else self.params.decode_weight * worker.kv_tokens
        return prefill + decode

    def score(self, request: RequestView, workers: Sequence[WorkerView]) -> dict[str, float]:
        held = max((w.cached_blocks for w in workers), default=0)
        return _least_best(workers, [self.cost(request, w, held) for w in workers])


def _least_best(workers: Sequence[WorkerView], costs: Sequence[float]) -> dict[str, float]:
    """(worst - cost) / (worst - best) per worker: 1 for the least cost, 0 for the most; 1 for all when equal."""
    best, worst = min(costs, default=0.0), max(costs, default=0.0)
    if worst == best:
        return dict.fromkeys((w.worker_id for w in workers), 1.0)
    return {w.worker_id: (worst - c) / (worst - best) for w, c in zip(workers, costs, strict=True)}


class SessionScorer:
    """Type `session`: 1 for the worker that served the request's session last, else 0.

    With the overload filter before it, affinity yields when that worker is
    full, as agents need: their turns stay together unless it would hurt.
    """

    class Params(_Params):
        pass

    def __init__(self, params: Params) -> None:
        self.params = params

    def score(self, request: RequestView, workers: Sequence[WorkerView]) -> dict[str, float]:
        scores = dict.fromkeys((w.worker_id for w in workers), 0.0)
        target = request.session_worker
        if target in scores:
            scores[target] = 1.0
        return scores


# -- pickers ------------------------------------------------------------------


class MaxScorePicker:
    """Type `max-score`: the highest total; ties broken at random (seeded)."""

    class Params(_Params):
        seed: int = Field(default=0, description="Seed of the tie-breaking generator.")

    def __init__(self, params: Params) -> None:
        self._rng = random.Random(params.seed)

    def pick(self, request: RequestView, workers: Sequence[WorkerView], totals: Mapping[str, float]) -> Decision:
        if not totals:
            return Decision(None, Reason.NO_WORKER)
        best = max(totals.values())
        top = sorted(w for w, s in totals.items() if s >= best - 1e-9)
        return Decision(self._rng.choice(top), Reason.SCORED, dict(totals))


class RoundRobinPicker:
    """Type `round-robin`: each eligible worker in turn, scores ignored."""

    class Params(_Params):
        pass

    def __init__(self, params: Params) -> None:
        self._next = 0

    def pick(self, request: RequestView, workers: Sequence[WorkerView], totals: Mapping[str, float]) -> Decision:
        ids = sorted(totals)
        if not ids:
            return Decision(None, Reason.NO_WORKER)
        choice = ids[self._next % len(ids)]
        self._next += 1
        return Decision(choice, Reason.ROUND_ROBIN)


class RandomPicker:
    """Type `random`: uniformly at random among eligible workers."""

    class Params(_Params):
        seed: int = 0

    def __init__(self, params: Params) -> None:
        self._rng = random.Random(params.seed)

    def pick(self, request: RequestView, workers: Sequence[WorkerView], totals: Mapping[str, float]) -> Decision:
        ids = sorted(totals)
        if not ids:
            return Decision(None, Reason.NO_WORKER)
        return Decision(self._rng.choice(ids), Reason.RANDOM)


# -- registries ---------------------------------------------------------------

FILTERS: dict[str, Any] = {"role": RoleFilter, "overload": OverloadFilter}
SCORERS: dict[str, Any] = {
    "queue": QueueScorer,
    "kv-usage": KVUsageScorer,
    "prefix": PrefixScorer,
    "work": WorkScorer,
    "session": SessionScorer,
}
PICKERS: dict[str, Any] = {"max-score": MaxScorePicker, "round-robin": RoundRobinPicker, "random": RandomPicker}


class PluginSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str
    params: dict[str, Any] = Field(default_factory=dict)


class WeightedSpec(PluginSpec):
    weight: float = Field(default=1.0, ge=0)


class ProfileSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    filters: list[PluginSpec] = Field(default_factory=lambda: [PluginSpec(type="role"), PluginSpec(type="overload")])
    scorers: list[WeightedSpec] = Field(default_factory=list)
    picker: PluginSpec = Field(default_factory=lambda: PluginSpec(type="max-score"))


class RoutingConfig(BaseModel):
    """The routing document: `version: v1` and either a preset name or a profile (docs/routing.md)."""

    model_config = ConfigDict(extra="forbid")

    version: Literal["v1"] = "v1"
    preset: str | None = None
    profile: ProfileSpec | None = None

    def resolve(self) -> ProfileSpec:
        if self.profile is not None:
            return self.profile
        name = self.preset or "default"
        if name not in PRESETS:
            raise ValueError(f"unknown routing preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return PRESETS[name]


def _scorers(*pairs: tuple[str, float]) -> ProfileSpec:
    return ProfileSpec(scorers=[WeightedSpec(type=t, weight=w) for t, w in pairs])


PRESETS: dict[str, ProfileSpec] = {
    "round-robin": ProfileSpec(picker=PluginSpec(type="round-robin")),
    "least-load": _scorers(("queue", 2.0), ("kv-usage", 1.0)),
    # The cache where it is, weighed against the work each worker has queued (docs/routing.md, "Scoring").
    "prefix-aware": _scorers(("work", 4.0), ("prefix", 3.0), ("kv-usage", 1.0)),
    # The scoring before `work` existed: hit fraction plus request counts (kept to compare against).
    "hit-fraction": _scorers(("prefix", 3.0), ("queue", 2.0), ("kv-usage", 2.0)),
    "session-affinity": _scorers(("session", 4.0), ("queue", 2.0), ("kv-usage", 1.0)),
    # The default: prefix-aware, and the session where it was.
    "default": _scorers(("work", 4.0), ("prefix", 3.0), ("session", 1.0), ("kv-usage", 1.0)),
}


def _build(registry: Mapping[str, Any], spec: PluginSpec, kind: str) -> Any:
    cls = registry.get(spec.type)
    if cls is None:
        raise ValueError(f"unknown {kind} type {spec.type!r}; known: {', '.join(sorted(registry))}")
    try:
        return cls(cls.Params(**spec.params))
    except ValidationError as exc:
        raise ValueError(f"bad params for {kind} {spec.type!r}: {exc.errors()[0]['msg']}") from None


class Router:
    """A built profile: run filters, scorers and the picker over a snapshot."""

    def __init__(self, profile: ProfileSpec) -> None:
        self.filters: list[Filter] = [_build(FILTERS, f, "filter") for f in profile.filters]
        self.scorers: list[tuple[Scorer, float]] = [(_build(SCORERS, s, "scorer"), s.weight) for s in profile.scorers]
        self.picker: Picker = _build(PICKERS, profile.picker, "picker")
        self.uses_session = any(s.type == "session" for s in profile.scorers)

    @classmethod
    def preset(cls, name: str) -> Router:
        if name not in PRESETS:
            raise ValueError(f"unknown routing preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return cls(PRESETS[name])

    def route(self, request: RequestView, workers: Sequence[WorkerView]) -> Decision:
        candidates = list(workers)
        for flt in self.filters:
            kept = flt.filter(request, candidates)
            if not kept:
                reason = Reason.ALL_OVERLOADED if isinstance(flt, OverloadFilter) and candidates else Reason.NO_WORKER
                return Decision(None, reason)
            candidates = kept
        totals = dict.fromkeys((w.worker_id for w in candidates), 0.0)
        for scorer, weight in self.scorers:
            for worker_id, value in scorer.score(request, candidates).items():
                if value:
                    totals[worker_id] += weight * value
        decision = self.picker.pick(request, candidates, totals)
        if (
            decision.ok
            and request.session_worker
            and decision.worker_id == request.session_worker
            and decision.reason is Reason.SCORED
        ):
            return Decision(decision.worker_id, Reason.SESSION, decision.scores)
        return decision


# -- prefill/decode disaggregation ---------------------------------------------


@dataclass(frozen=True)
class PDPolicy:
    """Whether a request goes through the prefill pool.

    Only prompts whose *uncached* part is long pay for the hand-off: the
    uncached tokens are the prompt minus the longest prefix any decode-side
    worker already holds. Short or mostly cached prompts run on the decode
    pool directly (llm-d's and Dynamo's rule).
    """

    min_uncached_tokens: int

    def disaggregate(
        self, request: RequestView, decode_side: Sequence[WorkerView], prefill_side: Sequence[WorkerView]
    ) -> bool:
        if not prefill_side or not decode_side:
            return False
        cached = max((w.cached_blocks for w in decode_side), default=0) * request.block_size
        return request.prompt_tokens - cached >= self.min_uncached_tokens


def load_config(document: Mapping[str, Any] | None) -> RoutingConfig:
    """Validate a routing document, raising ValueError that names the bad field."""
    try:
        config = RoutingConfig.model_validate(document or {})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"routing config: {where}: {first['msg']}") from None
    Router(config.resolve())  # builds every plugin: refuses unknown types and bad params now
    return config
