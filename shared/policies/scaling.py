"""Scaling policies: how many replicas each pool should have. Pure functions.

A policy gets a `PoolSnapshot` (the pool's spec, its replicas, its workers'
reports, the work routed to it second by second) and its own `PolicyState`
from the previous tick, and returns a `ScalingDecision`: the replicas, the
reason (an enum, exported as a metric), a human explanation and the next
state. It reads no clock but `snapshot.now` and performs no I/O, so the
controller and the simulator run it identically.

Built-ins (SCALING_POLICIES):

* `predictive` (default): forecasts each pool's token work over a horizon of
  at least the measured cold start (a least-squares line through the
  per-second work of the last two horizons, smoothed over at least half a
  cold start), divides by the capacity of one replica
  *within the SLO* (learned online from saturated workers, starting from a
  prior), and adds head-room. A recent peak holds replicas but orders none:
  demand that does not last half a cold start is gone before a replica
  ordered for it is up. Prefill and decode pools are sized separately
  from their own work, which sets the P:D ratio. Scale-ups act at once;
  scale-downs wait until demand has stayed low for `down_delay_s`, respect a
  cool-down and step down gradually, so the pool never flaps. An SLO breach
  with queued requests adds a replica whatever the forecast says. Demand whose
  bursts end before a replica ordered for them would be up (its correlation a
  cold start plus the down delay later is low, as on the Azure code trace) is
  *bursty*: the forecast then reads demand smoothed over a cold start, and a
  floor holds the replicas that a fluid queue replaying the last half hour
  says absorb its bursts within the TTFT SLO.
* `reactive`: the queue length now (running + waiting) over a target per
  replica: the common baseline, with no forecast.
* `kpa`: the Knative Pod Autoscaler as AIBrix runs it for LLM pools, a
  baseline: concurrency (running + waiting) averaged over a stable and a
  panic window, each over a target per replica; a burst that doubles the
  panic count over the ready replicas starts panic mode, which scales up on
  the panic window and never down until a stable window passes calm.
* `planner`: NVIDIA Dynamo's SLA planner (throughput mode), a baseline: every
  `interval_s` it splits each past interval's work into requests and prompt
  (ISL) and output (OSL) tokens per request, predicts each for the next
  interval (last value, or a local-linear-trend Kalman filter over the
  interval history), and sizes the pool from a profile of one replica:
  predicted requests x ISL over the interval, over its prefill throughput at
  that ISL, and requests x OSL over its decode throughput at context ISL +
  OSL/2 with the largest batch whose step meets the TBT SLO. The profile is
  the replica's step-time model where the snapshot carries one (the
  simulator), else the pool's declared capacity. A mixed pool's replicas
  share their time between the two, so the fractions add. It holds that
  number until the next interval; Dynamo's correction factors (observed over
  profiled latency) are left out, since the declared capacity is already at
  the SLO and the prefill factor could only lower the count.
* `fixed`: a constant number (sizing for the peak).
"""

from __future__ import annotations

import enum
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.perfmodel import PerfProfile


class ScalingReason(enum.StrEnum):
    STEADY = "steady"
    SCALE_UP_FORECAST = "scale-up-forecast"
    SCALE_UP_BURSTS = "scale-up-bursts"
    SCALE_UP_SLO = "scale-up-slo"
    SCALE_UP_QUEUE = "scale-up-queue"
    SCALE_FROM_ZERO = "scale-from-zero"
    SCALE_DOWN_DEMAND = "scale-down-demand"
    SCALE_DOWN_IDLE = "scale-down-idle"
    HOLD_HYSTERESIS = "hold-hysteresis"
    HOLD_COOLDOWN = "hold-cooldown"
    HOLD_PANIC = "hold-panic"
    AT_MIN = "at-min-replicas"
    AT_MAX = "at-max-replicas"
    FIXED = "fixed"
    MANUAL = "manual-override"
    PAUSED = "paused"
    MODEL_DELETED = "model-deleted"


# Seconds of per-second work the controller and the simulator keep for the policies: the longest
# window any of them reads (the predictive policy's burst window).
WORK_HISTORY_S = 1800.0


@dataclass(frozen=True)
class WorkSample:
    """Work the pool's workers finished during one second, as routers account it when each request ends:
    throughput, so a saturated pool's demand reads no higher than its capacity until the queue drains."""

    t: float
    requests: float = 0.0
    prefill_tokens: float = 0.0
    decode_tokens: float = 0.0


@dataclass(frozen=True)
class WorkerReport:
    running: int
    waiting: int
    max_running: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    ttft_p90_s: float
    tbt_p90_s: float


@dataclass(frozen=True)
class PoolSnapshot:
    now: float
    role: str  # prefill | decode | mixed
    min_replicas: int
    max_replicas: int
    ttft_slo_s: float
    tbt_slo_s: float
    prior_prefill_tps: float
    prior_decode_tps: float
    ready: int
    starting: int
    cold_start_s: float
    work: Sequence[WorkSample] = ()
    workers: Sequence[WorkerReport] = ()
    # Requests refused for want of any worker (the demand of a pool at zero).
    refused: float = 0.0
    # The step-time model of one replica, where one is known (the simulator's): the planner's profile.
    profile: PerfProfile | None = None

    @property
    def current(self) -> int:
        return self.ready + self.starting


class PoolSpec(Protocol):
    """What a snapshot reads of a pool's declared spec (shared.types.pools.PoolBase has it)."""

    @property
    def min_replicas(self) -> int: ...
    @property
    def max_replicas(self) -> int: ...
    @property
    def role(self) -> enum.Enum: ...
    @property
    def slo(self) -> Any: ...
    @property
    def capacity(self) -> Any: ...


def pool_snapshot(
    pool: PoolSpec,
    now: float,
    ready: int,
    starting: int,
    cold_start_s: float,
    work: Sequence[WorkSample],
    workers: Sequence[WorkerReport],
    refused: float,
    profile: PerfProfile | None = None,
) -> PoolSnapshot:
    """The snapshot of a pool from its spec and what was observed: the reconciler and the simulator both
    build it here. A prefill pool never counts refusals (requests are refused for want of a decode side)."""
    role = str(pool.role.value)
    return PoolSnapshot(
        now=now,
        role=role,
        min_replicas=pool.min_replicas,
        max_replicas=pool.max_replicas,
        ttft_slo_s=pool.slo.ttft_p90_s,
        tbt_slo_s=pool.slo.tbt_p90_s,
        prior_prefill_tps=pool.capacity.prefill_tokens_per_s,
        prior_decode_tps=pool.capacity.decode_tokens_per_s,
        ready=ready,
        starting=starting,
        cold_start_s=cold_start_s,
        work=work,
        workers=workers,
        refused=refused if role != "prefill" else 0.0,
        profile=profile,
    )


@dataclass(frozen=True)
class PolicyState:
    prefill_capacity: float | None = None
    decode_capacity: float | None = None
    last_change: float = -math.inf
    low_since: float | None = None
    # kpa: the concurrency seen at each tick of the stable window, (time, requests).
    concurrency: tuple[tuple[float, float], ...] = ()
    # kpa: when panic mode last saw the burst (None: not panicking) and the most replicas it asked for.
    panic_at: float | None = None
    panic_replicas: int = 0
    # predictive: whether demand is bursty, the replicas that absorb its bursts, and when that was judged.
    bursty: bool = False
    floor: int = 0
    floor_at: float = -math.inf
    # planner: the replicas of its last adjustment, and when that was.
    planned: int = 0
    planned_at: float = -math.inf


@dataclass(frozen=True)
class ScalingDecision:
    replicas: int
    reason: ScalingReason
    explanation: str
    state: PolicyState = field(default_factory=PolicyState)
    forecast_prefill_tps: float = 0.0
    forecast_decode_tps: float = 0.0


class ScalingPolicy(Protocol):
    """Decides a pool's replicas once per reconcile tick (see module doc). Pure."""

    def decide(self, snapshot: PoolSnapshot, state: PolicyState) -> ScalingDecision: ...


def _clamp(replicas: int, snapshot: PoolSnapshot) -> tuple[int, ScalingReason | None]:
    if replicas < snapshot.min_replicas:
        return snapshot.min_replicas, ScalingReason.AT_MIN
    if replicas > snapshot.max_replicas:
        return snapshot.max_replicas, ScalingReason.AT_MAX
    return replicas, None


def _reason(
    wanted: int, current: int, bound: ScalingReason | None, up: ScalingReason, held: ScalingReason
) -> ScalingReason:
    """Why a policy that acts at once (no hysteresis) asks for `wanted`: the bound that held it, else its direction."""
    if bound is not None:
        return bound
    if wanted > current:
        return up
    return ScalingReason.SCALE_DOWN_DEMAND if wanted < current else held


def line_forecast(series: Sequence[float], horizon: float) -> float:
    """The least-squares line through a per-second series, `horizon` seconds past its last value (>= 0).

    A line through as much history as the horizon is long, not a fast-moving level and trend: looking
    a cold start ahead, one huge request is a spike in the last seconds, not a trend to extrapolate,
    while a ramp that lasts minutes is.
    """
    n = len(series)
    if n == 0:
        return 0.0
    mean = sum(series) / n
    if n == 1:
        return max(0.0, mean)
    middle = (n - 1) / 2
    # sum((i - middle)^2) over i < n, in closed form.
    spread = n * (n * n - 1) / 12
    slope = sum((i - middle) * value for i, value in enumerate(series)) / spread
    return max(0.0, mean + slope * (n - 1 - middle + horizon))


def per_second(work: Sequence[WorkSample], kind: str, start: float, now: float, smooth_s: float = 1.0) -> list[float]:
    """Token work of each whole second in [start, now), zeros where nothing was recorded, as a trailing
    mean over `smooth_s` seconds. The last second is left out: its work may not all be reported yet."""
    first, last = math.floor(start) + 1, math.floor(now) - 1
    if last < first:
        return []
    dense = [0.0] * (last - first + 1)
    for sample in work:
        index = int(sample.t) - first
        if 0 <= index < len(dense):
            dense[index] += sample.prefill_tokens if kind == "prefill" else sample.decode_tokens
    return trailing_mean(dense, smooth_s)


def trailing_mean(series: list[float], smooth_s: float) -> list[float]:
    """Each value averaged with those before it, over `smooth_s` values (fewer at the start)."""
    width = max(1, int(smooth_s))
    if width == 1:
        return series
    sums = [0.0, *itertools.accumulate(series)]
    return [(sums[i + 1] - sums[max(0, i + 1 - width)]) / min(width, i + 1) for i in range(len(series))]


def late_share(series: Sequence[float], capacity: float, wait_s: float) -> float:
    """Share of the work in a per-second series that a first-come-first-served server of `capacity` per
    second (a fluid queue) would start later than `wait_s` after it arrived."""
    total = sum(series)
    if total <= 0:
        return 0.0
    backlog = late = 0.0
    allowed = capacity * wait_s
    for arrived in series:
        backlog += arrived
        late += min(arrived, max(0.0, backlog - allowed))
        backlog = max(0.0, backlog - capacity)
    return late / total


def lag_correlation(series: Sequence[float], lag: int) -> float:
    """Pearson correlation of a series with itself `lag` steps later (1.0 when either side is constant)."""
    if len(series) <= lag + 1:
        return 1.0
    a, b = series[:-lag], series[lag:]
    n = len(a)
    mean_a, mean_b = sum(a) / n, sum(b) / n
    cov = sum((x - mean_a) * (y - mean_b) for x, y in zip(a, b, strict=True))
    var_a = sum((x - mean_a) ** 2 for x in a)
    var_b = sum((y - mean_b) ** 2 for y in b)
    if var_a <= 0 or var_b <= 0:
        return 1.0
    return cov / math.sqrt(var_a * var_b)


def burst_floor(series: Sequence[float], per_replica: float, wait_s: float, miss: float, most: int) -> int:
    """The fewest replicas (up to `most`) that start all but `miss` of the series' work within `wait_s`."""
    low, high = 0, most
    while low < high:
        middle = (low + high) // 2
        if late_share(series, middle * per_replica, wait_s) <= miss:
            high = middle
        else:
            low = middle + 1
    return low


class PredictiveParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    window_s: float = Field(default=60.0, gt=0, description="Seconds of work history the forecast reads at least.")
    trend_horizons: float = Field(
        default=2.0,
        gt=0,
        description="The forecast's line goes through this many horizons of work history (at least window_s).",
    )
    peak_window_s: float = Field(
        default=10.0, gt=0, description="Never scale down below the peak of this recent window (a peak orders none)."
    )
    target_utilization: float = Field(default=0.8, gt=0, le=1, description="Share of SLO capacity to plan for.")
    min_horizon_s: float = Field(default=5.0, ge=0, description="Forecast at least this far ahead.")
    down_delay_s: float = Field(default=20.0, ge=0, description="Demand must stay low this long to scale down.")
    down_cooldown_s: float = Field(default=20.0, ge=0, description="Seconds after any change before scaling down.")
    max_step_down: int = Field(default=1, ge=1, description="Replicas removed per decision at most.")
    learn_rate: float = Field(default=0.2, ge=0, le=1, description="Weight of a new capacity sample.")
    smooth_s: float = Field(
        default=1.0,
        ge=1,
        le=600,
        description="Average the per-second work over this many seconds first (heavy-tailed prompts: 5-30).",
    )
    smooth_cold_starts: float = Field(
        default=0.5,
        ge=0,
        le=2,
        description="Average over at least this many cold starts (1 when demand is bursty): a replica ordered for "
        "demand that lasts less is paid for from its order and up after the demand has gone.",
    )
    burst_window_s: float = Field(
        default=WORK_HISTORY_S,
        ge=0,
        le=WORK_HISTORY_S,
        description="Seconds of work history that say whether bursts outlast a new replica, and that the burst "
        "floor is sized on (0: never treat demand as bursty).",
    )
    burst_miss: float = Field(
        default=0.1, gt=0, lt=1, description="Share of the window's work the burst floor may start past the TTFT SLO."
    )
    burst_every_s: float = Field(default=30.0, gt=0, description="Seconds between two sizings of the burst floor.")
    burst_persistence: float = Field(
        default=0.5,
        ge=-1,
        le=1,
        description="Demand is bursty when its correlation with itself a cold start plus down_delay_s later is "
        "below this: a replica ordered for a burst would come up after it and be paid for idle.",
    )


class PredictivePolicy:
    Params = PredictiveParams

    def __init__(self, params: PredictiveParams) -> None:
        self.p = params

    def _learn(self, snapshot: PoolSnapshot, state: PolicyState) -> PolicyState:
        """Update per-replica capacity from workers that are saturated (their rate is capacity)."""
        prefill = state.prefill_capacity or snapshot.prior_prefill_tps
        decode = state.decode_capacity or snapshot.prior_decode_tps
        rate = self.p.learn_rate
        for report in snapshot.workers:
            saturated = report.waiting > 0 or (report.max_running and report.running >= report.max_running)
            if not saturated:
                continue
            ttft_ok = report.ttft_p90_s <= snapshot.ttft_slo_s
            tbt_ok = report.tbt_p90_s <= snapshot.tbt_slo_s
            slots_full = bool(report.max_running) and report.running >= report.max_running
            # Which phase a breach blames: slow tokens, or a queue behind full decode slots,
            # is decode's; a queue with free slots waits on prefill (a long prompt ahead).
            blamed = {"prefill": not ttft_ok and not slots_full, "decode": not tbt_ok or (not ttft_ok and slots_full)}
            for kind, observed in (("prefill", report.prefill_tokens_per_s), ("decode", report.decode_tokens_per_s)):
                if observed <= 0:
                    continue
                estimate = prefill if kind == "prefill" else decode
                # Within the SLO the observed rate is a floor of capacity; past it, a ceiling
                # of the blamed phase's. The other phase's rate then says nothing.
                if ttft_ok and tbt_ok:
                    target = max(estimate, observed)
                elif blamed[kind]:
                    target = min(estimate, 0.9 * observed)
                else:
                    continue
                estimate += rate * (target - estimate)
                if kind == "prefill":
                    prefill = estimate
                else:
                    decode = estimate
        return replace(state, prefill_capacity=prefill, decode_capacity=decode)

    def decide(self, snapshot: PoolSnapshot, state: PolicyState) -> ScalingDecision:
        p = self.p
        state = self._learn(snapshot, state)
        if p.burst_window_s:
            state = self._judge_bursts(snapshot, state)
        assert state.prefill_capacity is not None and state.decode_capacity is not None
        horizon = max(p.min_horizon_s, snapshot.cold_start_s)
        trend_s = max(p.window_s, p.trend_horizons * horizon)
        span = max(trend_s, p.peak_window_s)
        recent = [w for w in snapshot.work if w.t > snapshot.now - span]
        peak_from = snapshot.now - p.peak_window_s
        # Only demand that lasts a cold start (bursty) or a share of one is worth a replica; the floor takes bursts.
        smooth_s = max(p.smooth_s, snapshot.cold_start_s * (1.0 if state.bursty else p.smooth_cold_starts))
        trends: dict[str, float] = {}
        peaks: dict[str, float] = {}
        for kind in ("prefill", "decode"):
            series = per_second(recent, kind, snapshot.now - span, snapshot.now, smooth_s)
            trends[kind] = line_forecast(series[-max(1, int(trend_s)) :], horizon)
            peaks[kind] = max(trends[kind], max(series[-max(1, int(p.peak_window_s)) :], default=0.0))
        # The trend orders replicas; the recent peak only keeps those there are.
        held = min(snapshot.current, self._replicas(snapshot, state, peaks))
        wanted = max(self._replicas(snapshot, state, trends), held)
        reason = ScalingReason.SCALE_UP_FORECAST
        if state.bursty and state.floor > wanted:
            wanted, reason = state.floor, ScalingReason.SCALE_UP_BURSTS
        requests = sum(w.requests for w in recent if w.t > peak_from) + snapshot.refused
        breach = any(
            r.waiting > 0 and (r.ttft_p90_s > snapshot.ttft_slo_s or r.tbt_p90_s > snapshot.tbt_slo_s)
            for r in snapshot.workers
        )
        current = snapshot.current
        # Replicas still starting are the remedy already on its way: adding one per tick
        # until they are up would ratchet to max_replicas during every long cold start.
        if breach and wanted <= current and snapshot.starting == 0:
            wanted, reason = current + 1, ScalingReason.SCALE_UP_SLO
        if current == 0 and requests > 0 and wanted == 0:
            wanted, reason = 1, ScalingReason.SCALE_FROM_ZERO
        explanation = (
            f"forecast prefill {trends['prefill']:.0f} tok/s (recent peak {peaks['prefill']:.0f}) / "
            f"{state.prefill_capacity:.0f} per replica, decode {trends['decode']:.0f} tok/s (recent peak "
            f"{peaks['decode']:.0f}) / {state.decode_capacity:.0f} per replica, "
            f"horizon {horizon:.0f}s, at {p.target_utilization:.0%} utilization"
            + (
                f"; bursty, {state.floor} replicas absorb the last {p.burst_window_s:.0f}s of bursts"
                if state.bursty
                else ""
            )
            + f" -> {wanted}"
        )
        decision = self._apply(snapshot, state, wanted, reason, explanation, requests == 0)
        return replace(decision, forecast_prefill_tps=trends["prefill"], forecast_decode_tps=trends["decode"])

    def _replicas(self, snapshot: PoolSnapshot, state: PolicyState, work: Mapping[str, float]) -> int:
        """Replicas for `work` tokens per second at the target utilization of their SLO capacity."""
        assert state.prefill_capacity is not None and state.decode_capacity is not None
        need = 0.0
        if snapshot.role != "decode":
            need = max(need, work["prefill"] / state.prefill_capacity)
        if snapshot.role != "prefill":
            need = max(need, work["decode"] / state.decode_capacity)
        return math.ceil(need / self.p.target_utilization - 1e-9)

    def _judge_bursts(self, snapshot: PoolSnapshot, state: PolicyState) -> PolicyState:
        """Every burst_every_s: is demand bursty (see PredictiveParams.burst_persistence), and how many
        replicas would have started all but burst_miss of the window's work within the TTFT SLO (a
        fluid queue replaying it). A decode backlog delays first tokens as a prefill one does."""
        p = self.p
        if snapshot.now - state.floor_at < p.burst_every_s:
            return state
        assert state.prefill_capacity is not None and state.decode_capacity is not None
        start = snapshot.now - p.burst_window_s
        lag = max(1, round(snapshot.cold_start_s + p.down_delay_s))
        kinds = {"prefill": state.prefill_capacity, "decode": state.decode_capacity}
        if snapshot.role != "mixed":
            kinds = {snapshot.role: kinds[snapshot.role]}
        bursty, floor = False, 0
        for kind, per_replica in kinds.items():
            series = per_second(snapshot.work, kind, start, snapshot.now)
            bursty = bursty or lag_correlation(trailing_mean(series, p.smooth_s), lag) < p.burst_persistence
            floor = max(
                floor, burst_floor(series, per_replica, snapshot.ttft_slo_s, p.burst_miss, snapshot.max_replicas)
            )
        return replace(state, bursty=bursty, floor=floor, floor_at=snapshot.now)

    def _apply(
        self,
        snapshot: PoolSnapshot,
        state: PolicyState,
        wanted: int,
        up_reason: ScalingReason,
        explanation: str,
        idle: bool,
    ) -> ScalingDecision:
        p = self.p
        now, current = snapshot.now, snapshot.current
        wanted, bound = _clamp(wanted, snapshot)
        if bound is not None:
            explanation += f" (held to [{snapshot.min_replicas}, {snapshot.max_replicas}])"
        if wanted > current:
            # Raised only by the floor (a new pool, or one below its minimum): say so, not "forecast".
            reason = ScalingReason.AT_MIN if bound is ScalingReason.AT_MIN else up_reason
            return ScalingDecision(wanted, reason, explanation, replace(state, last_change=now, low_since=None))
        if wanted == current:
            return ScalingDecision(current, bound or ScalingReason.STEADY, explanation, replace(state, low_since=None))
        low_since = state.low_since if state.low_since is not None else now
        state = replace(state, low_since=low_since)
        if now - low_since < p.down_delay_s:
            return ScalingDecision(
                current, ScalingReason.HOLD_HYSTERESIS, f"{explanation}; low for {now - low_since:.0f}s", state
            )
        if now - state.last_change < p.down_cooldown_s:
            return ScalingDecision(current, ScalingReason.HOLD_COOLDOWN, f"{explanation}; cooling down", state)
        target = max(wanted, current - p.max_step_down)
        reason = ScalingReason.SCALE_DOWN_IDLE if idle else ScalingReason.SCALE_DOWN_DEMAND
        return ScalingDecision(target, reason, explanation, replace(state, last_change=now, low_since=None))


class ReactiveParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    target_queue: float = Field(default=16.0, gt=0, description="Running + waiting requests per replica to aim for.")
    down_cooldown_s: float = Field(default=20.0, ge=0, description="Seconds after any change before scaling down.")


class ReactivePolicy:
    Params = ReactiveParams

    def __init__(self, params: ReactiveParams) -> None:
        self.p = params

    def decide(self, snapshot: PoolSnapshot, state: PolicyState) -> ScalingDecision:
        queue = sum(r.running + r.waiting for r in snapshot.workers) + snapshot.refused
        wanted = math.ceil(queue / self.p.target_queue - 1e-9)
        explanation = f"queue {queue:.0f} / {self.p.target_queue:g} per replica -> {wanted}"
        wanted, bound = _clamp(wanted, snapshot)
        now, current = snapshot.now, snapshot.current
        if wanted > current:
            return ScalingDecision(
                wanted, bound or ScalingReason.SCALE_UP_QUEUE, explanation, replace(state, last_change=now)
            )
        if wanted < current and now - state.last_change >= self.p.down_cooldown_s:
            return ScalingDecision(
                wanted, bound or ScalingReason.SCALE_DOWN_DEMAND, explanation, replace(state, last_change=now)
            )
        reason = ScalingReason.HOLD_COOLDOWN if wanted < current else bound or ScalingReason.STEADY
        return ScalingDecision(current, reason, explanation, state)


class KPAParams(BaseModel):
    """AIBrix's KPA defaults (Knative's own windows are 60 s and 6 s)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: float = Field(default=16.0, gt=0, description="Running + waiting requests per replica to aim for.")
    stable_window_s: float = Field(default=180.0, gt=0, description="Window of the stable average.")
    panic_window_s: float = Field(default=60.0, gt=0, description="Window of the panic average.")
    panic_threshold: float = Field(
        default=2.0, gt=1, description="Panic when the panic window wants this many times the ready replicas."
    )
    max_scale_up_rate: float = Field(default=2.0, gt=1, description="At most this many times the ready replicas.")
    max_scale_down_rate: float = Field(default=2.0, gt=1, description="At least ready / this many replicas.")


class KPAPolicy:
    Params = KPAParams

    def __init__(self, params: KPAParams) -> None:
        self.p = params

    def decide(self, snapshot: PoolSnapshot, state: PolicyState) -> ScalingDecision:
        p, now = self.p, snapshot.now
        observed = sum(r.running + r.waiting for r in snapshot.workers) + snapshot.refused
        window = (*(s for s in state.concurrency if s[0] > now - p.stable_window_s), (now, observed))
        stable = sum(v for _, v in window) / len(window)
        recent = [v for t, v in window if t > now - p.panic_window_s]
        panic = sum(recent) / len(recent)
        ready = max(1, snapshot.ready)
        lowest, highest = math.floor(ready / p.max_scale_down_rate), max(1, math.ceil(p.max_scale_up_rate * ready))
        want_stable, want_panic = (min(max(math.ceil(v / p.target - 1e-9), lowest), highest) for v in (stable, panic))
        over = want_panic / ready >= p.panic_threshold
        panic_at, panic_replicas = state.panic_at, state.panic_replicas
        if over:
            panic_at = now  # a burst seen again extends panic mode
        elif panic_at is not None and now - panic_at > p.stable_window_s:
            panic_at, panic_replicas = None, 0  # the burst has reached the stable window: calm again
        wanted = want_stable
        if panic_at is not None:
            panic_replicas = max(panic_replicas, want_stable, want_panic)  # never down while panicking
            wanted = panic_replicas
        explanation = (
            f"concurrency {stable:.1f} over {p.stable_window_s:g}s, {panic:.1f} over {p.panic_window_s:g}s "
            f"/ {p.target:g} per replica -> {want_stable} stable, {want_panic} panic"
            + (" (panicking)" if panic_at is not None else "")
        )
        wanted, bound = _clamp(wanted, snapshot)
        current = snapshot.current
        held = ScalingReason.HOLD_PANIC if panic_at is not None else ScalingReason.STEADY
        reason = _reason(wanted, current, bound, ScalingReason.SCALE_UP_QUEUE, held)
        nxt = replace(state, concurrency=window, panic_at=panic_at, panic_replicas=panic_replicas)
        return ScalingDecision(wanted, reason, explanation, nxt)


def kalman_next(series: Sequence[float]) -> float:
    """One step ahead of a local-linear-trend Kalman filter (level and slope, each a random walk) run over
    `series`. Noise is scaled to the series: observation noise is the variance of its steps, the level's
    a tenth of that and the slope's a hundredth, so a lasting change is followed within a few steps."""
    if not series:
        return 0.0
    steps = [b - a for a, b in itertools.pairwise(series)]
    mean = sum(steps) / len(steps) if steps else 0.0
    noise = sum((d - mean) ** 2 for d in steps) / len(steps) if steps else 0.0
    noise = noise or max(1e-9, series[0] ** 2)
    q_level, q_slope = 0.1 * noise, 0.01 * noise
    level, slope = series[0], 0.0
    p00, p01, p11 = noise, 0.0, noise
    for value in series[1:]:
        # Predict: x = F x, P = F P F' + Q with F = [[1, 1], [0, 1]].
        level += slope
        p00, p01, p11 = p00 + 2 * p01 + p11 + q_level, p01 + p11, p11 + q_slope
        # Update with the observation of the level.
        gain0, gain1 = p00 / (p00 + noise), p01 / (p00 + noise)
        residual = value - level
        level, slope = level + gain0 * residual, slope + gain1 * residual
        p00, p01, p11 = (1 - gain0) * p00, (1 - gain0) * p01, p11 - gain1 * p01
    return max(0.0, level + slope)


def _last(series: Sequence[float]) -> float:
    return series[-1] if series else 0.0


class PlannerParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    interval_s: float = Field(default=60.0, gt=0, le=WORK_HISTORY_S / 4, description="Seconds between two adjustments.")
    predictor: Literal["constant", "kalman"] = Field(
        default="kalman", description="How the next interval's requests, ISL and OSL are predicted."
    )


class PlannerPolicy:
    Params = PlannerParams

    def __init__(self, params: PlannerParams) -> None:
        self.p = params

    def decide(self, snapshot: PoolSnapshot, state: PolicyState) -> ScalingDecision:
        p, now = self.p, snapshot.now
        if now - state.planned_at < p.interval_s:
            replicas, bound = _clamp(state.planned, snapshot)
            return ScalingDecision(replicas, bound or ScalingReason.STEADY, "planner: between adjustments", state)
        requests, isl, osl = self._intervals(snapshot)
        predict = kalman_next if p.predictor == "kalman" else _last
        rate = predict(requests) / p.interval_s
        next_isl, next_osl = predict(isl), predict(osl)
        prefill_tps, decode_tps = snapshot.prior_prefill_tps, snapshot.prior_decode_tps
        if snapshot.profile is not None and next_isl >= 1:
            prefill_tps = next_isl / snapshot.profile.prefill_time(round(next_isl))
            decode_tps = snapshot.profile.decode_throughput(next_isl + next_osl / 2, snapshot.tbt_slo_s)
        prefill_need, decode_need = rate * next_isl / prefill_tps, rate * next_osl / decode_tps
        need = {"prefill": prefill_need, "decode": decode_need}.get(snapshot.role, prefill_need + decode_need)
        wanted = math.ceil(need - 1e-9)
        if snapshot.current == 0 and snapshot.refused > 0:
            wanted = max(wanted, 1)
        explanation = (
            f"planner: {rate:.2f} req/s x ISL {next_isl:.0f} / {prefill_tps:.0f} tok/s = {prefill_need:.2f} prefill, "
            f"x OSL {next_osl:.0f} / {decode_tps:.0f} tok/s = {decode_need:.2f} decode -> {wanted}"
        )
        replicas, bound = _clamp(wanted, snapshot)
        reason = _reason(replicas, snapshot.current, bound, ScalingReason.SCALE_UP_FORECAST, ScalingReason.STEADY)
        return ScalingDecision(replicas, reason, explanation, replace(state, planned=replicas, planned_at=now))

    def _intervals(self, snapshot: PoolSnapshot) -> tuple[list[float], list[float], list[float]]:
        """Requests, and prompt and output tokens per request, of each whole interval in the work history,
        oldest first (an interval without requests repeats the sequence lengths before it)."""
        width = self.p.interval_s
        count = int(WORK_HISTORY_S // width)
        start = snapshot.now - count * width
        totals = [[0.0, 0.0, 0.0] for _ in range(count)]
        for sample in snapshot.work:
            index = math.floor((sample.t - start) / width)
            if 0 <= index < count:
                totals[index][0] += sample.requests
                totals[index][1] += sample.prefill_tokens
                totals[index][2] += sample.decode_tokens
        first = next((i for i, t in enumerate(totals) if t[0] > 0), count)
        requests: list[float] = []
        isl: list[float] = []
        osl: list[float] = []
        for n, prefill, decode in totals[first:]:
            requests.append(n)
            isl.append(prefill / n if n else isl[-1])
            osl.append(decode / n if n else osl[-1])
        return requests, isl, osl


class FixedParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    replicas: int = Field(ge=0, le=10_000, description="The constant number of replicas.")


class FixedPolicy:
    Params = FixedParams

    def __init__(self, params: FixedParams) -> None:
        self.p = params

    def decide(self, snapshot: PoolSnapshot, state: PolicyState) -> ScalingDecision:
        replicas, bound = _clamp(self.p.replicas, snapshot)
        return ScalingDecision(replicas, bound or ScalingReason.FIXED, f"fixed at {self.p.replicas}", state)


SCALING_POLICIES: Mapping[str, Any] = {
    "predictive": PredictivePolicy,
    "reactive": ReactivePolicy,
    "kpa": KPAPolicy,
    "planner": PlannerPolicy,
    "fixed": FixedPolicy,
}


def make_policy(name: str, params: Mapping[str, Any]) -> ScalingPolicy:
    """Build a policy by name, refusing unknown names and bad parameters with ValueError."""
    cls = SCALING_POLICIES.get(name)
    if cls is None:
        raise ValueError(f"unknown scaling policy {name!r}; known: {', '.join(sorted(SCALING_POLICIES))}")
    try:
        return cls(cls.Params(**params))  # type: ignore[no-any-return]
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ValueError(f"scaling policy {name!r}: {where}: {first['msg']}") from None
