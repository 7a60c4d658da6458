"""Builders for engines and requests, so tests read as what they check."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.worker.engines.base import EngineRequest, Finish, KVBlock, Sampling
from services.worker.engines.engine import BatchingEngine, EngineLimits
from services.worker.engines.reference.executor import ReferenceExecutor
from services.worker.engines.sim.executor import FailureInjection, SimExecutor
from shared.perfmodel import get_profile
from tests.support.models import TINY_MODEL_NAME


def limits(
    kv_cache_bytes: int = 64 * 2**20, max_batch_tokens: int = 512, max_running: int = 64, block_size: int = 16
) -> EngineLimits:
    return EngineLimits(block_size, kv_cache_bytes, max_running, max_batch_tokens, max_waiting=256)


def reference_engine(model: Path, decode_rows_bytes: int | None = None, **kwargs: int) -> BatchingEngine:
    executor = ReferenceExecutor(model, TINY_MODEL_NAME, device="cpu", decode_rows_bytes=decode_rows_bytes)
    return BatchingEngine(executor, limits(**kwargs))


def sim_engine(speedup: float = 50.0, failures: FailureInjection | None = None, **kwargs: int) -> BatchingEngine:
    executor = SimExecutor(get_profile("cpu-reference"), TINY_MODEL_NAME, speedup=speedup, failures=failures)
    return BatchingEngine(executor, limits(**kwargs))


def request(
    request_id: str,
    prompt: list[int],
    max_tokens: int = 16,
    *,
    resume: list[int] | None = None,
    imported: list[KVBlock] | None = None,
    export: bool = False,
    **sampling: Any,
) -> EngineRequest:
    """An engine request; `sampling` sets fields of Sampling. End-of-sequence is ignored unless
    `ignore_eos=False` is given."""
    chosen = Sampling(max_tokens=max_tokens, **{"ignore_eos": True, **sampling})
    return EngineRequest(request_id, prompt, chosen, resume or [], imported or [], export)


@dataclass
class Result:
    tokens: list[int]
    text: str
    finish: Finish | None
    completion_tokens: int
    cached_tokens: int
    exported: list[KVBlock]


async def collect(engine: BatchingEngine, req: EngineRequest) -> Result:
    """Run one request to its end (compiling its JSON schema first, as the worker's server does)."""
    if req.sampling.json_schema and req.grammar is None:
        req.grammar = await engine.compile_grammar(req.sampling.json_schema)
    tokens: list[int] = []
    text = ""
    finish = None
    completion = cached = 0
    exported: list[KVBlock] = []
    async for output in engine.generate(req):
        tokens += output.token_ids
        text += output.text
        if output.finish is not None:
            finish = output.finish
            completion, cached = output.completion_tokens, output.cached_tokens
            exported = output.exported or []
    return Result(tokens, text, finish, completion, cached, exported)


async def collect_all(engine: BatchingEngine, reqs: list[EngineRequest]) -> list[Result]:
    return list(await asyncio.gather(*(collect(engine, r) for r in reqs)))


def prompts(count: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    """Deterministic prompts of byte tokens (ids 16..271) with the given lengths, cycled."""
    import random

    rng = random.Random(seed)
    return [[rng.randrange(16, 272) for _ in range(lengths[i % len(lengths)])] for i in range(count)]
