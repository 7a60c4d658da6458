"""The simulated cluster: engine timing, routing, P/D, scaling, and the segment arithmetic."""

from __future__ import annotations

from typing import Any

import pytest

from shared.kvindex import KVIndex
from shared.perfmodel import PROFILES
from shared.policies.routing import PRESETS
from simulator.cluster import Simulation, simulate
from simulator.config import parse_config
from simulator.report import measure
from simulator.worker import Job, Limits, SimWorker
from simulator.workload import Request, SyntheticSpec, Workload, synthetic

pytestmark = pytest.mark.unit


def pool(name: str = "mixed", **fields: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": name,
        "model": "m",
        "engine": "sim",
        "gpu_type": "cpu",
        "min_replicas": 2,
        "max_replicas": 2,
        "scaling": {"policy": "fixed", "params": {"replicas": 2}},
        "worker_env": {"SIM_PROFILE": "cpu-reference"},
    }
    spec.update(fields)
    return spec


def config(*pools: dict[str, Any], preset: str = "default", **extra: Any) -> Any:
    return parse_config(
        {"models": [{"name": "m"}], "pools": list(pools or [pool()]), "routing": {"preset": preset}, **extra}
    )


def shared_prefix_load(
    seed: int = 1, rate: float = 6.0, duration: float = 20.0, groups: int = 4, prefix: int = 512, skew: float = 0.0
) -> Workload:
    return synthetic(
        SyntheticSpec(
            rate_rps=rate,
            duration_s=duration,
            prompt_mean=300,
            output_mean=40,
            prefix_groups=groups,
            prefix_tokens=prefix,
            prefix_skew=skew,
            block_size=64,
            seed=seed,
        )
    )


def test_one_request_alone_takes_what_the_performance_model_says() -> None:
    profile = PROFILES["cpu-reference"]
    workload = Workload("one", [Request(0.0, 100, 10)], block_size=16)
    result = simulate(
        config(pool(min_replicas=1, max_replicas=1, scaling={"policy": "fixed", "params": {"replicas": 1}})), workload
    )
    job = result.jobs[0]
    prefill = profile.step_time(100, 100 * 101 // 2, 0, 0)
    decode = sum(profile.step_time(0, 0, 1, 101 + i) for i in range(9))
    assert job.ttft == pytest.approx(prefill)
    assert job.finished_at == pytest.approx(prefill + decode)


def test_long_prompts_are_chunked_under_the_step_budget() -> None:
    profile = PROFILES["cpu-reference"]
    env = {"SIM_PROFILE": "cpu-reference", "MAX_BATCH_TOKENS": "256"}
    one = pool(min_replicas=1, max_replicas=1, scaling={"policy": "fixed", "params": {"replicas": 1}}, worker_env=env)
    result = simulate(config(one), Workload("one", [Request(0.0, 600, 1)], block_size=16))
    # 256 + 256 + 88 tokens, each chunk attending to what came before it.
    chunks = [(256, 0), (256, 256), (88, 512)]
    expected = sum(profile.step_time(n, n * start + n * (n + 1) // 2, 0, 0) for n, start in chunks)
    assert result.jobs[0].ttft == pytest.approx(expected)


def test_segments_match_stepping_one_engine_step_at_a_time() -> None:
    workload = shared_prefix_load()
    fast = Simulation(config(), workload).run()
    slow = Simulation(config(), workload, max_steps_per_segment=1).run()
    for a, b in zip(fast.jobs, slow.jobs, strict=True):
        assert (a.worker, a.cached_tokens) == (b.worker, b.cached_tokens)
        assert a.first_token_at == pytest.approx(b.first_token_at, rel=1e-9, abs=1e-9)
        assert a.finished_at == pytest.approx(b.finished_at, rel=1e-9, abs=1e-9)


def test_every_request_finishes_under_overload() -> None:
    # run() itself refuses to end with a request unfinished or KV still reserved.
    workload = shared_prefix_load(rate=20)
    result = Simulation(config(), workload).run()
    assert all(j.finished_at is not None and not j.refused for j in result.jobs)
    assert all(j.finished_at >= j.first_token_at >= j.arrived for j in result.jobs)  # type: ignore[operator]
    metrics = measure(result)
    assert metrics.served == len(workload.requests) and metrics.refused == 0
    assert metrics.ttft_s[2] > 1.0  # overloaded: requests queued


def test_prefix_aware_routing_finds_more_cached_prefixes_than_round_robin() -> None:
    # 64 prefixes of 32 blocks: more than one worker's cache (1024 blocks), a quarter of them fits.
    workload = shared_prefix_load(rate=4, duration=60, groups=64, prefix=2048)
    four = pool(min_replicas=4, max_replicas=4, scaling={"policy": "fixed", "params": {"replicas": 4}})
    prefix = measure(simulate(config(four, preset="prefix-aware"), workload))
    rr = measure(simulate(config(four, preset="round-robin"), workload))
    assert prefix.prefix_hit_rate is not None and rr.prefix_hit_rate is not None
    assert prefix.prefix_hit_rate > rr.prefix_hit_rate + 0.05
    assert prefix.ttft_s[0] < rr.ttft_s[0]


@pytest.mark.parametrize("rate", [4.0, 6.0])
def test_the_default_routing_wins_on_latency_where_a_few_prefixes_are_hot(rate: float) -> None:
    # Zipf-popular prefixes, sessions per prefix: hit fraction or session alone piles the hot ones on one worker.
    workload = shared_prefix_load(rate=rate, duration=120, groups=64, prefix=2048, skew=1.0)
    four = pool(min_replicas=4, max_replicas=4, scaling={"policy": "fixed", "params": {"replicas": 4}})
    runs = {
        preset: measure(simulate(config(four, preset=preset), workload))
        for preset in ("default", "hit-fraction", "least-load", "round-robin")
    }
    default = runs.pop("default")
    for other in runs.values():
        assert default.ttft_s[1] < other.ttft_s[1]
        assert default.slo_attainment >= other.slo_attainment
    assert default.prefix_hit_rate is not None
    assert default.prefix_hit_rate > max(
        runs["least-load"].prefix_hit_rate or 0, runs["round-robin"].prefix_hit_rate or 0
    )


def test_under_overload_the_default_keeps_copies_of_hot_prefixes_from_crowding_the_caches() -> None:
    # 1,000 Zipf-popular prefixes of 4,096 tokens at 30 req/s on 4 H100s: every worker queues and every
    # cache is full. Spreading a hot prefix to the shortest queue evicts others' prefixes to hold a copy.
    workload = synthetic(
        SyntheticSpec(
            rate_rps=30,
            duration_s=600,
            prompt_mean=1024,
            output_mean=256,
            prefix_groups=1000,
            prefix_tokens=4096,
            prefix_skew=1.0,
            seed=4,
        )
    )
    four = pool(
        gpu_type="h100",
        min_replicas=4,
        max_replicas=4,
        scaling={"policy": "fixed", "params": {"replicas": 4}},
        slo={"ttft_p90_s": 2.0, "tbt_p90_s": 0.1},
        worker_env={},
    )
    spreading = PRESETS["default"].model_dump()  # the default, pricing no eviction
    for scorer in spreading["scorers"]:
        if scorer["type"] == "work":
            scorer["params"] = {"eviction_weight": 0.0}
    default = measure(simulate(config(four), workload))
    hits = measure(simulate(config(four, preset="hit-fraction"), workload))
    spread = measure(simulate(config(four, routing={"profile": spreading}), workload))
    for other in (hits, spread):
        assert default.slo_attainment > other.slo_attainment
        assert default.ttft_s[1] < other.ttft_s[1]


def test_a_worker_counts_the_prompt_tokens_it_has_yet_to_prefill() -> None:
    limits = Limits(max_running=8, max_batch_tokens=512, max_waiting=8, engine_block_size=16)
    profile = PROFILES["cpu-reference"]
    worker = SimWorker("w", "mixed", "mixed", profile, limits, 1.0, cache_blocks=64, hash_block=64, index=KVIndex())
    worker.cache.update(dict.fromkeys([b"a" * 16, b"b" * 16]))  # two 64-token blocks held
    requests = [
        Request(0.0, 3000, 10),
        Request(0.0, 1000, 10, hashes=(b"a" * 16, b"b" * 16, b"c" * 16)),
        Request(0.0, 500, 10),
    ]
    for index, request in enumerate(requests):
        job = Job(index, request, 0.0)
        job.context, job.to_generate = request.prompt_tokens, request.output_tokens
        worker.submit(job, 0.0)
    # The first is being prefilled (admitted when the worker planned); the others wait for the step to end.
    assert len(worker.prefilling) == 1 and len(worker.waiting) == 2
    assert worker.view("cpu").prefill_tokens == 3000 + (1000 - 2 * 64) + 500


def test_long_prompts_go_through_the_prefill_pool_and_short_ones_do_not() -> None:
    one = {"min_replicas": 1, "max_replicas": 1, "scaling": {"policy": "fixed", "params": {"replicas": 1}}}
    cfg = config(
        pool("prefill", role="prefill", **one), pool("decode", role="decode", **one), pd_min_uncached_tokens=256
    )
    workload = Workload("pd", [Request(0.0, 1000, 20), Request(5.0, 100, 20)], block_size=16)
    result = simulate(cfg, workload)
    long, short = result.jobs
    assert result.worker_pools[long.prefill_worker] == "prefill"
    assert result.worker_pools[long.worker] == "decode"
    assert short.prefill_worker == "" and result.worker_pools[short.worker] == "decode"
    assert result.kv_transfer_s == pytest.approx(PROFILES["cpu-reference"].kv_transfer_time(1000))
    # The decode side imported the prompt's full blocks: it computed at most a block and the first token.
    assert long.finished_at is not None and long.first_token_at is not None
    assert long.finished_at > long.first_token_at + result.kv_transfer_s


def test_a_request_larger_than_any_worker_is_refused_not_lost() -> None:
    capacity = PROFILES["cpu-reference"].kv_capacity_tokens
    workload = Workload("big", [Request(0.0, capacity, 10), Request(0.1, 50, 5)], block_size=16)
    result = simulate(config(), workload)
    big, small = result.jobs
    assert big.refused and not small.refused and small.finished_at is not None
    assert measure(result).refused == 1


def test_the_autoscaler_follows_a_load_step_and_costs_less_than_the_peak() -> None:
    quiet = synthetic(SyntheticSpec(rate_rps=1, duration_s=40, prompt_mean=200, output_mean=30, seed=2))
    burst = synthetic(SyntheticSpec(rate_rps=30, duration_s=30, prompt_mean=200, output_mean=30, seed=3))
    requests = quiet.requests + [Request(r.at + 40, r.prompt_tokens, r.output_tokens) for r in burst.requests]
    requests += [Request(r.at + 70, r.prompt_tokens, r.output_tokens) for r in quiet.requests]
    workload = Workload("step", sorted(requests, key=lambda r: r.at), block_size=16)
    env = {"SIM_PROFILE": "cpu-reference", "SIM_STARTUP_DELAY_S": "3"}
    params = {"down_delay_s": 10, "down_cooldown_s": 5, "min_horizon_s": 3}
    scaled = pool(min_replicas=1, max_replicas=6, worker_env=env, scaling={"policy": "predictive", "params": params})
    peak = pool(min_replicas=6, max_replicas=6, worker_env=env, scaling={"policy": "fixed", "params": {"replicas": 6}})
    auto = simulate(config(scaled), workload)
    fixed = simulate(config(peak), workload)
    ups = [e for e in auto.scaling_events if e.after > e.before and e.t > 40]
    downs = [e for e in auto.scaling_events if e.after < e.before]
    assert ups and ups[0].t < 50 and ups[0].reason.startswith("scale-up")
    assert downs and downs[-1].t > 70
    assert max(r.replicas["mixed"] for r in auto.timeline) > 1
    assert measure(auto).cost < measure(fixed).cost
    assert all(j.finished_at is not None for j in auto.jobs)


def test_expert_rebalancing_lowers_imbalance_and_time_between_tokens() -> None:
    workload = synthetic(SyntheticSpec(rate_rps=5, duration_s=200, prompt_mean=200, output_mean=60, seed=4))
    one = pool(min_replicas=1, max_replicas=1, scaling={"policy": "fixed", "params": {"replicas": 1}})
    shape = {"layers": 4, "experts": 16, "ranks": 4, "slots_per_rank": 5, "rebalance_every_s": 20, "drift_every_s": 5}
    runs = {
        policy: measure(simulate(config(one, experts={"mixed": {**shape, "policy": policy}}), workload))
        for policy in ("none", "eplb", "migration-aware")
    }
    assert runs["none"].expert_moves == 0 and runs["none"].expert_balance is not None
    for policy in ("eplb", "migration-aware"):
        assert runs[policy].expert_balance < runs["none"].expert_balance - 0.1  # type: ignore[operator]
        assert runs[policy].tbt_s[0] < runs["none"].tbt_s[0]
    assert 0 < runs["migration-aware"].expert_moves < runs["eplb"].expert_moves
    assert measure(simulate(config(one), workload)).expert_balance is None


def test_expert_shapes_that_cannot_hold_their_experts_are_refused() -> None:
    with pytest.raises(ValueError, match="cannot hold 64 experts"):
        config(experts={"mixed": {"experts": 64, "ranks": 4, "slots_per_rank": 9}})
    with pytest.raises(ValueError, match="experts: no pool named moe"):
        config(experts={"moe": {}})


def test_a_warm_up_span_is_run_but_not_measured() -> None:
    """Requests arriving in the warm-up are served but not judged, and worker time before it is not charged:
    the same run measured from 10 s counts exactly the later requests and two replicas' later seconds."""
    workload = shared_prefix_load(rate=4, duration=30)
    whole = simulate(config(), workload)
    measured = simulate(config(), workload, warmup_s=10.0)
    later = [j for j in whole.jobs if j.arrived >= 10.0]
    assert 0 < len(later) < len(whole.jobs)
    assert [(j.worker, j.finished_at) for j in measured.jobs] == [(j.worker, j.finished_at) for j in whole.jobs]
    full, tail = measure(whole), measure(measured)
    assert tail.requests == tail.served == len(later) and full.requests == len(whole.jobs)
    # Two fixed replicas the whole run: charged from 10 s on, 20 s less each.
    assert tail.worker_seconds == pytest.approx(full.worker_seconds - 2 * 10.0)
    assert tail.replicas_mean == pytest.approx(2.0)
