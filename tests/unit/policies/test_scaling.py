"""Scaling policies over hand-built snapshots (pure, no services)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from shared.perfmodel import PROFILES
from shared.policies.scaling import (
    PolicyState,
    PoolSnapshot,
    ScalingReason,
    WorkerReport,
    WorkSample,
    burst_floor,
    kalman_next,
    lag_correlation,
    late_share,
    line_forecast,
    make_policy,
)

pytestmark = pytest.mark.unit


def snapshot(now: float = 100.0, ready: int = 1, decode_tps: float = 0.0, **kw: object) -> PoolSnapshot:
    base = PoolSnapshot(
        now=now,
        role="decode",
        min_replicas=0,
        max_replicas=10,
        ttft_slo_s=2.0,
        tbt_slo_s=0.2,
        prior_prefill_tps=1000.0,
        prior_decode_tps=100.0,
        ready=ready,
        starting=0,
        cold_start_s=5.0,
        work=[
            WorkSample(t, requests=decode_tps / 10, decode_tokens=decode_tps) for t in range(int(now) - 60, int(now))
        ],
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def test_forecast_follows_a_trend_not_a_spike() -> None:
    rising = [float(t) for t in range(30)]
    assert line_forecast(rising, horizon=10) == pytest.approx(39.0)
    assert line_forecast([5.0] * 20, horizon=10) == pytest.approx(5.0)
    assert line_forecast([7.0], horizon=10) == 7.0
    assert line_forecast([], horizon=10) == 0.0
    assert line_forecast([10.0, 0.0], horizon=10) == 0.0  # a falling line stops at zero
    # One huge request in the last second of two minutes of steady work: a cold start (60 s) ahead the line
    # rises by a tenth of it (273), where a level-and-trend forecast (Holt's, damped 0.9) said about 4,300.
    spiky = [100.0] * 119 + [3100.0]
    assert 100.0 < line_forecast(spiky, horizon=60) < 400.0


def test_a_recent_peak_holds_replicas_but_orders_none() -> None:
    params = {"target_utilization": 1.0, "down_delay_s": 0, "down_cooldown_s": 0, "burst_window_s": 0}
    policy = make_policy("predictive", params)
    work = [WorkSample(t, requests=1, decode_tokens=50.0) for t in range(40, 100)]
    work[-3] = WorkSample(97, requests=1, decode_tokens=800.0)  # one big request, 3 s ago
    steady = snapshot(work=work, cold_start_s=10.0)
    held = policy.decide(replace(steady, ready=2), PolicyState())
    ordered = policy.decide(replace(steady, ready=1), PolicyState())
    # Smoothed over 5 s the spike peaks at 200 tok/s, two replicas' worth; the line through the last minute
    # forecasts 86. The peak keeps the second replica of a pool of 2, and orders none for a pool of 1.
    assert "decode 86 tok/s (recent peak 200)" in held.explanation
    assert (held.replicas, held.reason) == (2, ScalingReason.STEADY)
    assert (ordered.replicas, ordered.reason) == (1, ScalingReason.STEADY)


def test_replicas_follow_demand_over_capacity() -> None:
    policy = make_policy("predictive", {"target_utilization": 0.5})
    decision = policy.decide(snapshot(decode_tps=300.0), PolicyState())
    # 300 tok/s / 100 per replica / 0.5 utilization = 6 replicas, at once.
    assert decision.replicas == 6
    assert decision.reason is ScalingReason.SCALE_UP_FORECAST
    assert "decode 300 tok/s" in decision.explanation


def test_prefill_and_decode_pools_are_sized_from_their_own_work() -> None:
    policy = make_policy("predictive", {"target_utilization": 1.0})
    work = [WorkSample(t, requests=1, prefill_tokens=3000.0, decode_tokens=50.0) for t in range(40, 100)]
    prefill = policy.decide(snapshot(role="prefill", work=work), PolicyState())
    decode = policy.decide(snapshot(role="decode", work=work), PolicyState())
    assert (prefill.replicas, decode.replicas) == (3, 1)


def test_scale_down_waits_for_the_delay_and_steps_gradually() -> None:
    policy = make_policy("predictive", {"down_delay_s": 20, "down_cooldown_s": 0, "max_step_down": 1})
    state = PolicyState()
    low = snapshot(decode_tps=0.0, ready=5, min_replicas=1)
    held = policy.decide(low, state)
    assert held.replicas == 5 and held.reason is ScalingReason.HOLD_HYSTERESIS
    later = policy.decide(replace(low, now=low.now + 25), held.state)
    assert later.replicas == 4 and later.reason is ScalingReason.SCALE_DOWN_IDLE


def test_no_flapping_when_demand_hovers_at_a_boundary() -> None:
    policy = make_policy("predictive", {"target_utilization": 1.0, "down_delay_s": 30, "down_cooldown_s": 30})
    state = PolicyState()
    replicas = 2
    changes = 0
    for second in range(200):
        tps = 195.0 if second % 2 else 205.0  # around the 2-replica boundary
        snap = snapshot(now=100.0 + second, ready=replicas, decode_tps=tps)
        decision = policy.decide(snap, state)
        changes += decision.replicas != replicas
        replicas, state = decision.replicas, decision.state
    assert changes <= 1


def test_slo_breach_with_a_queue_adds_a_replica() -> None:
    policy = make_policy("predictive", {})
    hot = WorkerReport(running=8, waiting=5, max_running=8, prefill_tokens_per_s=0, decode_tokens_per_s=50,
                       ttft_p90_s=9.0, tbt_p90_s=0.1)  # fmt: skip
    decision = policy.decide(snapshot(decode_tps=10.0, ready=2, workers=[hot]), PolicyState())
    assert decision.replicas == 3
    assert decision.reason is ScalingReason.SCALE_UP_SLO
    # Saturated and over the SLO: the learned capacity drops below the prior.
    assert decision.state.decode_capacity is not None and decision.state.decode_capacity < 100.0


def test_zero_traffic_scales_to_min_and_traffic_scales_from_zero() -> None:
    policy = make_policy("predictive", {"down_delay_s": 0, "down_cooldown_s": 0, "max_step_down": 5})
    idle = policy.decide(snapshot(decode_tps=0.0, ready=3, min_replicas=0), PolicyState())
    assert idle.replicas == 0
    revived = policy.decide(snapshot(decode_tps=0.0, ready=0, refused=3.0), PolicyState())
    assert revived.replicas == 1 and revived.reason is ScalingReason.SCALE_FROM_ZERO


def test_bounds_and_baselines() -> None:
    capped = make_policy("predictive", {}).decide(snapshot(decode_tps=10_000.0), PolicyState())
    assert capped.replicas == 10 and capped.reason is ScalingReason.SCALE_UP_FORECAST
    assert "held to [0, 10]" in capped.explanation
    at_max = make_policy("predictive", {}).decide(snapshot(decode_tps=10_000.0, ready=10), PolicyState())
    assert at_max.replicas == 10 and at_max.reason is ScalingReason.AT_MAX
    new_pool = make_policy("predictive", {}).decide(snapshot(ready=0, min_replicas=2), PolicyState())
    assert new_pool.replicas == 2 and new_pool.reason is ScalingReason.AT_MIN
    assert make_policy("fixed", {"replicas": 3}).decide(snapshot(), PolicyState()).replicas == 3
    worker = WorkerReport(running=20, waiting=12, max_running=32, prefill_tokens_per_s=0, decode_tokens_per_s=0,
                          ttft_p90_s=0.1, tbt_p90_s=0.01)  # fmt: skip
    reactive = make_policy("reactive", {"target_queue": 8}).decide(snapshot(workers=[worker]), PolicyState())
    assert reactive.replicas == 4


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [("magic", {}, "unknown scaling policy"), ("fixed", {}, "replicas"), ("predictive", {"bogus": 1}, "bogus")],
    ids=["name", "missing", "extra"],
)
def test_bad_policy_specs_are_refused(name: str, params: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_policy(name, params)


def _busy(requests: int) -> list[WorkerReport]:
    return [WorkerReport(running=requests, waiting=0, max_running=64, prefill_tokens_per_s=0, decode_tokens_per_s=0,
                         ttft_p90_s=0.1, tbt_p90_s=0.01)]  # fmt: skip


def test_kpa_follows_the_stable_window_and_panics_on_a_burst() -> None:
    kpa = make_policy("kpa", {"target": 10, "stable_window_s": 60, "panic_window_s": 6})
    state = PolicyState()
    for t in range(0, 60, 2):  # a minute at 20 requests on 2 replicas: steady
        decision = kpa.decide(snapshot(now=float(t), ready=2, workers=_busy(20)), state)
        state = decision.state
    assert decision.replicas == 2 and decision.reason is ScalingReason.STEADY and state.panic_at is None

    # A burst to 80: the 6 s window wants 8 = 4x the ready replicas, past the 2x threshold: panic, capped at 2x.
    burst = kpa.decide(snapshot(now=60.0, ready=2, workers=_busy(80)), state)
    assert burst.state.panic_at == 60.0
    assert burst.replicas == 4 and burst.reason is ScalingReason.SCALE_UP_QUEUE

    # The burst ends at once: in panic mode the pool never shrinks until a stable window passes calm.
    state = burst.state
    for t in range(62, 122, 2):
        decision = kpa.decide(snapshot(now=float(t), ready=4, workers=_busy(4)), state)
        state = decision.state
        assert decision.replicas == 4 and decision.reason is ScalingReason.HOLD_PANIC
    calm = kpa.decide(snapshot(now=122.0, ready=4, workers=_busy(4)), state)
    assert calm.state.panic_at is None
    assert calm.replicas == 2 and calm.reason is ScalingReason.SCALE_DOWN_DEMAND  # at most half the ready ones


def test_kpa_without_a_burst_scales_on_the_stable_average() -> None:
    kpa = make_policy("kpa", {"target": 10, "stable_window_s": 60, "panic_window_s": 6})
    state = PolicyState()
    for t in range(0, 30, 2):
        state = kpa.decide(snapshot(now=float(t), ready=2, workers=_busy(10)), state).state
    # Load rises to 30 (1.5x the ready replicas in the panic window: no panic): the stable average moves slowly.
    rising = kpa.decide(snapshot(now=30.0, ready=2, workers=_busy(30)), state)
    assert rising.state.panic_at is None
    assert rising.replicas == 2  # mean of 15 samples at 10 and one at 30: 11.25 -> 2 replicas


def test_the_fluid_queue_counts_work_started_past_the_wait() -> None:
    # 300 tokens in one second at 100/s: the first 100 wait under a second, the rest longer.
    assert late_share([300.0, 0.0, 0.0], capacity=100.0, wait_s=1.0) == pytest.approx(200 / 300)
    assert late_share([300.0, 0.0, 0.0], capacity=100.0, wait_s=3.0) == 0.0
    assert late_share([0.0, 0.0], capacity=100.0, wait_s=1.0) == 0.0
    # Two replicas of 100/s absorb a 400-token burst within 2 s; one does not.
    assert burst_floor([400.0] + [0.0] * 9, per_replica=100.0, wait_s=2.0, miss=0.0, most=10) == 2
    assert burst_floor([0.0] * 10, per_replica=100.0, wait_s=2.0, miss=0.0, most=10) == 0


def test_persistence_tells_bursts_from_a_level_that_lasts() -> None:
    ramp = [float(t) for t in range(600)]
    assert lag_correlation(ramp, 80) > 0.99
    spikes = [500.0 if t % 97 < 5 else 0.0 for t in range(1800)]  # 5 s bursts, 97 s apart
    assert abs(lag_correlation(spikes, 80)) < 0.2
    assert lag_correlation([3.0] * 100, 10) == 1.0  # constant: nothing to tell, not bursty


def bursts(now: int, every: int = 97, height: float = 4000.0) -> list[WorkSample]:
    """Prefill work in 5-second bursts `every` seconds apart, nothing between: over by the time a replica is up."""
    return [
        WorkSample(float(t), requests=2, prefill_tokens=height if t % every < 5 else 0.0)
        for t in range(max(0, now - 1800), now)
    ]


def test_short_bursts_get_a_standing_floor_and_are_not_chased() -> None:
    policy = make_policy("predictive", {})
    now = 97 * 18 + 5  # right after a burst: its peak alone would ask for 4000 / 1000 / 0.8 = 5 replicas
    snap = snapshot(now=now, role="prefill", work=bursts(now), cold_start_s=60.0, ready=2)
    decision = policy.decide(snap, PolicyState())
    assert decision.state.bursty
    # Three replicas would start 15% of each burst's work more than 2 s (the TTFT SLO) after it came,
    # over the 10% allowed; four keep up. Fewer than the chase asks for, and they stay between bursts.
    assert late_share([w.prefill_tokens for w in bursts(now)], 3000.0, 2.0) == pytest.approx(0.15)
    assert decision.state.floor == 4
    assert (decision.replicas, decision.reason) == (4, ScalingReason.SCALE_UP_BURSTS)
    assert "bursty, 4 replicas absorb" in decision.explanation
    # With the bursts' history forgotten (no burst window) there is no floor, and the burst's peak orders
    # nothing either: it holds the 2 replicas there are.
    unjudged = make_policy("predictive", {"burst_window_s": 0}).decide(snap, PolicyState())
    assert not unjudged.state.bursty and unjudged.replicas == 2


def test_demand_that_lasts_is_followed_as_before() -> None:
    policy = make_policy("predictive", {"target_utilization": 1.0})
    ramp = [WorkSample(float(t), requests=1, prefill_tokens=10.0 * t) for t in range(0, 1200)]
    snap = snapshot(now=1200, role="prefill", work=ramp, cold_start_s=60.0, max_replicas=20)
    decision = policy.decide(snap, PolicyState())
    assert not decision.state.bursty
    # 12,000 tokens/s and rising, at 1000 per replica.
    assert decision.reason is ScalingReason.SCALE_UP_FORECAST and decision.replicas >= 12


def _steady(now: float, rate: float, isl: float, osl: float) -> list[WorkSample]:
    return [
        WorkSample(t, requests=rate, prefill_tokens=rate * isl, decode_tokens=rate * osl)
        for t in range(int(now) - 600, int(now))
    ]


def test_planner_sizes_each_phase_from_its_profile_and_holds_between_adjustments() -> None:
    planner = make_policy("planner", {"interval_s": 60, "predictor": "constant"})
    # 2 req/s x 1000 prompt tokens over 1000 tok/s = 2 replicas' prefill; x 30 output tokens over 100 = 0.6.
    work = _steady(1000.0, rate=2.0, isl=1000.0, osl=30.0)
    mixed = snapshot(now=1000.0, role="mixed", work=work)
    decision = planner.decide(mixed, PolicyState())
    assert decision.replicas == 3  # a mixed replica's time is shared: 2 + 0.6, rounded up
    assert decision.reason is ScalingReason.SCALE_UP_FORECAST
    assert planner.decide(replace(mixed, role="prefill"), PolicyState()).replicas == 2
    assert planner.decide(replace(mixed, role="decode"), PolicyState()).replicas == 1
    # Demand triples, but the next adjustment is a minute after the last one.
    tripled = replace(mixed, now=1030.0, work=_steady(1030.0, rate=6.0, isl=1000.0, osl=30.0))
    assert planner.decide(tripled, decision.state).replicas == 3
    later = planner.decide(replace(tripled, now=1060.0, work=_steady(1060.0, 6.0, 1000.0, 30.0)), decision.state)
    assert later.replicas == 8  # 6 + 1.8


def test_planner_uses_a_replicas_step_time_model_when_it_has_one() -> None:
    profile = PROFILES["h100"]
    planner = make_policy("planner", {"interval_s": 60, "predictor": "constant"})
    base = snapshot(now=1000.0, role="mixed", work=_steady(1000.0, rate=4.0, isl=2000.0, osl=200.0))
    decision = planner.decide(replace(base, profile=profile, max_replicas=100), PolicyState())
    prefill = 4.0 * 2000.0 / (2000.0 / profile.prefill_time(2000))
    decode = 4.0 * 200.0 / profile.decode_throughput(2100.0, base.tbt_slo_s)
    assert decision.replicas == math.ceil(prefill + decode)
    assert decision.replicas != planner.decide(base, PolicyState()).replicas  # not the declared capacity


def test_decode_throughput_takes_the_largest_batch_within_the_tbt() -> None:
    profile = PROFILES["h100"]
    tps = profile.decode_throughput(context=4000.0, tbt_s=0.05)
    within_tbt = next(b for b in range(1, 10_000) if profile.step_time(0, 0, b + 1, (b + 1) * 4000) > 0.05)
    batch = min(within_tbt, profile.kv_capacity_tokens // 4000)  # and the KV of the batch fits
    assert profile.step_time(0, 0, batch, batch * 4000) <= 0.05
    assert tps == pytest.approx(batch / profile.step_time(0, 0, batch, batch * 4000))
    assert profile.sped_up(2.0).decode_throughput(4000.0, 0.05) > tps


def test_kalman_prediction_follows_a_level_and_a_trend() -> None:
    assert kalman_next([5.0] * 12) == pytest.approx(5.0)
    assert kalman_next([float(v) for v in range(1, 21)]) == pytest.approx(21.0, rel=0.05)
    assert kalman_next([]) == 0.0
    assert kalman_next([10.0, 0.0, 0.0, 0.0]) >= 0.0  # never a negative demand
