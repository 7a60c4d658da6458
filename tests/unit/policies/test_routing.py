"""Routing policy: the `work` scorer, the presets built on it, and the router's own prefill queue."""

from __future__ import annotations

import pytest

from services.router.inflight import InflightCounts
from shared.policies.routing import PRESETS, Phase, RequestView, Router, WorkerView, WorkScorer

pytestmark = pytest.mark.unit

BLOCK = 16


def request(prompt_tokens: int = 1600, phase: Phase = Phase.GENERATE) -> RequestView:
    return RequestView(phase=phase, prompt_tokens=prompt_tokens, prompt_blocks=prompt_tokens // BLOCK, block_size=BLOCK)


def worker(
    name: str, cached_blocks: int = 0, prefill_tokens: int = 0, kv_tokens: int = 0, kv_usage: float = 0.0
) -> WorkerView:
    return WorkerView(
        worker_id=name,
        role="mixed",
        cached_blocks=cached_blocks,
        prefill_tokens=prefill_tokens,
        kv_tokens=kv_tokens,
        kv_usage=kv_usage,
        capacity=64,
    )


def scores(
    workers: list[WorkerView], req: RequestView | None = None, decode_weight: float = 0.1, eviction_weight: float = 2.0
) -> dict[str, float]:
    params = WorkScorer.Params(decode_weight=decode_weight, eviction_weight=eviction_weight)
    return WorkScorer(params).score(req or request(), workers)


def test_a_cached_prefix_wins_while_the_holders_queue_is_shorter_than_what_it_saves() -> None:
    # The holder has 1200 of the 1600 tokens: it would compute 400, an idle worker 1600.
    holder, idle = worker("holder", cached_blocks=75), worker("idle")
    assert scores([holder, idle]) == {"holder": 1.0, "idle": 0.0}
    # 1000 tokens queued there: 1400 in all, still less than 1600.
    assert scores([worker("holder", 75, prefill_tokens=1000), idle])["holder"] == 1.0
    # 1400 queued: 1800 against 1600, the idle worker wins.
    assert scores([worker("holder", 75, prefill_tokens=1400), idle])["idle"] == 1.0


def test_copying_a_prefix_into_a_full_cache_costs_the_prefixes_the_copy_evicts() -> None:
    # The holder has 1200 of the 1600 tokens and 1400 queued: 1800 in all, against 1600 for an idle worker.
    holder = worker("holder", 75, prefill_tokens=1400, kv_usage=1.0)
    full = worker("idle", kv_usage=1.0)
    # With a full cache the idle worker would write a second copy of those 1200 tokens: 1600 + 2 x 1200.
    assert scores([holder, full])["holder"] == 1.0
    assert scores([holder, full], eviction_weight=0.0)["idle"] == 1.0
    # An empty cache evicts nothing: 1600 against 1800.
    assert scores([holder, worker("idle")])["idle"] == 1.0
    # A prompt no worker holds is computed somewhere whatever the choice: the queues decide.
    assert scores([worker("a", prefill_tokens=100, kv_usage=1.0), worker("b", prefill_tokens=200)])["a"] == 1.0


def test_decode_load_counts_at_its_weight() -> None:
    # 4000 tokens of KV in running requests cost 400 at the default weight: as much as 400 prompt tokens.
    busy, fresh = worker("busy", kv_tokens=4000), worker("fresh", prefill_tokens=300)
    assert scores([busy, fresh]) == {"busy": 0.0, "fresh": 1.0}
    assert scores([busy, worker("fresh", prefill_tokens=500)]) == {"busy": 1.0, "fresh": 0.0}
    assert scores([busy, fresh], decode_weight=0.0) == {"busy": 1.0, "fresh": 0.0}


def test_each_phase_counts_only_the_work_it_does_there() -> None:
    prefilling = worker("prefilling", prefill_tokens=5000)
    decoding = worker("decoding", kv_tokens=20000)
    # A decode phase gets its KV from the prefill worker: queued prefill elsewhere does not matter...
    assert scores([prefilling, decoding], request(phase=Phase.DECODE)) == {"prefilling": 1.0, "decoding": 0.0}
    # ...and a prefill phase does not decode.
    assert scores([prefilling, decoding], request(phase=Phase.PREFILL)) == {"prefilling": 0.0, "decoding": 1.0}


def test_scores_are_spread_between_the_least_and_the_most_work() -> None:
    got = scores([worker("a"), worker("b", prefill_tokens=800), worker("c", prefill_tokens=1600)])
    assert got == {"a": 1.0, "b": 0.5, "c": 0.0}
    assert scores([worker("a"), worker("b")]) == {"a": 1.0, "b": 1.0}


def test_the_default_keeps_a_prefix_until_its_holder_is_far_busier_than_the_rest() -> None:
    router = Router(PRESETS["default"])
    others = [worker(f"w{i}", prefill_tokens=200) for i in range(3)]
    holder = worker("holder", cached_blocks=75, prefill_tokens=600)
    assert router.route(request(), [holder, *others]).worker_id == "holder"
    swamped = worker("holder", cached_blocks=75, prefill_tokens=20000)
    assert router.route(request(), [swamped, *others]).worker_id != "holder"


def test_the_routers_prefill_queue_lasts_until_the_first_token() -> None:
    inflight = InflightCounts()
    with inflight.track("w", prefill_tokens=700) as first, inflight.track("w", prefill_tokens=300):
        assert inflight.prefill_tokens("w") == 1000 and inflight.get("w") == 2
        first.prefilled()
        first.prefilled()  # once only
        assert inflight.prefill_tokens("w") == 300 and inflight.get("w") == 2
    # An attempt that ends before its first token gives its tokens back too.
    assert inflight.prefill_tokens("w") == 0 and inflight.get("w") == 0 and inflight.total == 0


def test_a_forgotten_worker_leaves_no_negative_queue_behind() -> None:
    inflight = InflightCounts()
    with inflight.track("w", prefill_tokens=500):
        inflight.forget("w")
        assert inflight.prefill_tokens("w") == 0
    with inflight.track("w", prefill_tokens=200):
        assert inflight.prefill_tokens("w") == 200 and inflight.get("w") == 1
