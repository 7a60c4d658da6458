"""The sim engine: same contract as the reference engine, modelled time, injected failures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.worker.engines.base import Finish
from services.worker.engines.engine import BatchingEngine
from services.worker.engines.sim.executor import FailureInjection, SimExecutor
from services.worker.engines.tokenizer import HFTokenizer
from shared.errors import InvalidArgument, Unavailable
from shared.expertload import ExpertLoadModel
from shared.perfmodel import get_profile
from tests.support.engines import collect, collect_all, limits, prompts, request, sim_engine
from tests.support.models import TINY_MODEL_NAME

pytestmark = pytest.mark.unit


async def test_streams_deterministic_tokens_and_reuses_prefixes() -> None:
    engine = sim_engine()
    await engine.start()
    try:
        prompt = prompts(1, [50])[0]
        first = await collect(engine, request("a", prompt, max_tokens=12))
        second = await collect(engine, request("b", prompt, max_tokens=12))
        assert first.finish is Finish.LENGTH and len(first.tokens) == 12
        assert second.tokens == first.tokens  # greedy: same prompt, same output
        assert second.cached_tokens == 48
        assert first.text  # printable bytes
        load = engine.load()
        assert load.requests_finished == 2 and load.kv_blocks_total > 0
    finally:
        await engine.stop()


async def test_export_import_round_trip_between_sim_engines() -> None:
    a, b = sim_engine(), sim_engine()
    await a.start()
    await b.start()
    try:
        prompt = prompts(1, [40])[0]
        pre = await collect(a, request("p", prompt, max_tokens=1, export=True))
        assert len(pre.exported) == 2
        dec = await collect(b, request("d", prompt, max_tokens=5, resume=pre.tokens, imported=pre.exported))
        assert dec.cached_tokens == 32
    finally:
        await a.stop()
        await b.stop()


async def test_fail_rate_fails_some_requests_with_unavailable() -> None:
    engine = sim_engine(failures=FailureInjection(fail_rate=0.5, seed=1))
    await engine.start()
    try:
        outcomes = []
        for i, prompt in enumerate(prompts(20, [8])):
            try:
                outcomes.append((await collect(engine, request(f"r{i}", prompt, max_tokens=3))).finish)
            except Unavailable as exc:
                assert "injected failure" in str(exc)
                outcomes.append(None)
        assert 3 <= outcomes.count(None) <= 17
        assert Finish.LENGTH in outcomes
        assert engine.load().running_requests == 0
    finally:
        await engine.stop()


async def test_expert_loads_are_skewed_and_drift() -> None:
    model = ExpertLoadModel(num_layers=2, num_experts=8, top_k=2, skew=1.2, drift_every_s=1.0, seed=3)
    before = model.step_counts(10_000, now=0.0)
    assert before.sum(axis=1).tolist() == [20_000, 20_000]
    assert before.max(axis=1).min() > 2 * before.min(axis=1).max()  # hot experts exist
    weights_then = model.weights()
    model.step_counts(1, now=10.0)
    assert not (model.weights() == weights_then).all()


async def test_engine_reports_expert_load_window() -> None:
    engine = sim_engine()
    await engine.start()
    try:
        await collect_all(engine, [request(f"e{i}", p, max_tokens=4) for i, p in enumerate(prompts(4, [20]))])
        load = engine.expert_load(0)
        assert len(load.counts) == 4 and len(load.counts[0]) == 8
        assert sum(load.counts[0]) > 0
    finally:
        await engine.stop()


async def test_a_json_schema_constrains_the_stand_in_tokens(tiny_model: Path) -> None:
    """With the checkpoint's tokenizer, the sim picks among the tokens the grammar allows, so a
    structured-output request through a sim worker gets JSON that matches; without one it is refused."""
    import jsonschema

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    executor = SimExecutor(get_profile("cpu-reference"), TINY_MODEL_NAME, speedup=50, tokenizer=HFTokenizer(tiny_model))
    engine = BatchingEngine(executor, limits())
    bare = sim_engine()
    await engine.start()
    await bare.start()
    try:
        for i, prompt in enumerate(prompts(4, [8, 30], seed=9)):
            result = await collect(engine, request(f"j{i}", prompt, max_tokens=40, json_schema=json.dumps(schema)))
            assert result.finish is Finish.STOP
            jsonschema.validate(json.loads(result.text), schema)
        with pytest.raises(InvalidArgument, match="no vocabulary"):
            await collect(bare, request("bare", prompts(1, [8])[0], json_schema=json.dumps(schema)))
    finally:
        await engine.stop()
        await bare.stop()
