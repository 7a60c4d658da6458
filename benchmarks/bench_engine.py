"""Reference engine throughput against `transformers`, and the sim engine's calibration.

Throughput: 64 concurrent requests, 128-token prompts, 128 new tokens each
(greedy, no early stop), tiny model, CPU. Output tokens/s and time between
tokens p50/p99 for the reference engine (continuous batching, paged KV),
against, in the same run, `transformers` on the same checkpoint:
* sequential: `generate` one request at a time (timed on 8 requests; its
  tokens/s does not depend on how many are timed);
* batched: one padded `generate` call over all 64.
A shared 2-core VM jitters by 20% from run to run, so the engine and the
batched baseline are measured in alternation, ROUNDS times each on fresh
prompts, and the medians are compared. Each measurement runs in its own
process: two PyTorch thread pools in one process (the engine's and the
caller's) spin against each other on two cores and slow both down.

Calibration (`--calibrate`): times every step of the reference engine under a
mix of prefill and decode work and fits the step-time model of
shared/perfmodel.py (non-negative least squares), printing the fitted
`cpu-reference` profile and the fit's error; those numbers are what the `sim`
engine and the simulator use for this machine.

Run: make bench-engine. Last line:
bench-engine: tokens_per_s=<x> vs_hf_sequential=<ratio> vs_hf_batched=<ratio>
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from services.worker.engines.engine import BatchingEngine, StepResult
from services.worker.engines.reference.executor import ReferenceExecutor
from services.worker.engines.scheduler import Item
from tests.support.engines import limits, request
from tests.support.models import TINY_MODEL_NAME, build

REQUESTS = 64
PROMPT_TOKENS = 128
NEW_TOKENS = 128
SEQUENTIAL_SAMPLE = 8
ROUNDS = 3


def prompts(count: int, length: int, vocab: int = 256, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(16, vocab, size=length)] for _ in range(count)]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


def reference_engine(model: Path) -> BatchingEngine:
    return BatchingEngine(
        ReferenceExecutor(model, TINY_MODEL_NAME, device="cpu"),
        limits(kv_cache_bytes=256 * 2**20, max_batch_tokens=2048, max_running=REQUESTS),
    )


async def reference(engine: BatchingEngine, batch: list[list[int]], tag: str) -> tuple[float, list[float]]:
    """(output tokens/s, gaps between tokens in s) for `batch` run concurrently."""
    gaps: list[float] = []

    async def one(index: int, prompt: list[int]) -> int:
        tokens, last = 0, time.perf_counter()
        async for output in engine.generate(request(f"{tag}-{index}", prompt, NEW_TOKENS)):
            now = time.perf_counter()
            if tokens:
                gaps.append(now - last)
            tokens, last = tokens + len(output.token_ids), now
        return tokens

    started = time.perf_counter()
    counts = await asyncio.gather(*(one(i, p) for i, p in enumerate(batch)))
    elapsed = time.perf_counter() - started
    assert all(c == NEW_TOKENS for c in counts), counts
    return sum(counts) / elapsed, gaps


async def engine_round(model: Path, seed: int) -> dict[str, Any]:
    engine = reference_engine(model)
    await engine.start()
    try:
        await reference(engine, prompts(2, PROMPT_TOKENS, seed=1000 + seed), "warm-up")
        tps, gaps = await reference(engine, prompts(REQUESTS, PROMPT_TOKENS, seed=seed), "round")
    finally:
        await engine.stop()
    return {"tps": tps, "gaps": gaps}


def hf_round(model: Path, seed: int, sequential: bool) -> dict[str, Any]:
    hf = hf_model(model)
    hf_generate(hf, prompts(2, PROMPT_TOKENS, seed=1000 + seed))  # warm-up
    if sequential:
        sample = prompts(SEQUENTIAL_SAMPLE, PROMPT_TOKENS, seed=seed)
        return {"tps": SEQUENTIAL_SAMPLE * NEW_TOKENS / sum(hf_generate(hf, [p]) for p in sample)}
    return {"tps": REQUESTS * NEW_TOKENS / hf_generate(hf, prompts(REQUESTS, PROMPT_TOKENS, seed=seed))}


def measure(model: Path, what: str, seed: int) -> dict[str, Any]:
    """One measurement in a fresh process (see the module doc)."""
    argv = [sys.executable, "-m", "benchmarks.bench_engine", "--model", str(model), "--measure", what]
    out = subprocess.run([*argv, "--seed", str(seed)], check=True, capture_output=True, text=True).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def hf_model(model: Path) -> Any:
    from transformers import MixtralForCausalLM

    hf = MixtralForCausalLM.from_pretrained(model)
    hf.eval()  # type: ignore[no-untyped-call]
    return hf


def hf_generate(hf: Any, batch: list[list[int]]) -> float:
    """Seconds for one padded `generate` over `batch` (all prompts the same length: no padding needed)."""
    import torch

    ids = torch.tensor(batch)
    with torch.inference_mode():
        started = time.perf_counter()
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
        )
        elapsed = time.perf_counter() - started
    assert out.shape[1] == PROMPT_TOKENS + NEW_TOKENS
    return elapsed


# -- calibration ------------------------------------------------------------------


@dataclass
class StepLog:
    rows: list[tuple[float, float, float, float, float]] = field(default_factory=list)


class TimedExecutor(ReferenceExecutor):
    """The reference executor, recording each step's work and wall time."""

    def __init__(self, *args: Any, log: StepLog, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.log = log

    def execute(self, items: list[Item]) -> StepResult:
        prefill = prefill_ctx = decode = decode_ctx = 0
        for item in items:
            if item.length == 1 and item.start >= item.seq.num_prompt:
                decode, decode_ctx = decode + 1, decode_ctx + item.start + 1
            else:
                prefill += item.length
                prefill_ctx += item.length * item.start + item.length * (item.length + 1) // 2
        started = time.perf_counter()
        result = super().execute(items)
        self.log.rows.append((prefill, prefill_ctx, decode, decode_ctx, time.perf_counter() - started))
        return result


async def calibrate(model: Path) -> None:
    log = StepLog()
    engine = BatchingEngine(
        TimedExecutor(model, TINY_MODEL_NAME, device="cpu", log=log),
        limits(kv_cache_bytes=256 * 2**20, max_batch_tokens=512, max_running=64),
    )
    await engine.start()
    try:
        # Decode batches of several sizes and contexts, and prompts of several lengths.
        for concurrency, prompt_len, new in [(1, 16, 64), (8, 64, 48), (32, 32, 32), (64, 128, 24), (16, 400, 16)]:
            batch = prompts(concurrency, prompt_len)
            await asyncio.gather(*(_drain(engine, request(f"c{concurrency}-{i}", p, new)) for i, p in enumerate(batch)))
        for length in (64, 256, 512, 1024):
            await _drain(engine, request(f"p{length}", prompts(1, length)[0], 1))
    finally:
        await engine.stop()
    rows = np.array(log.rows[5:])  # the first steps pay one-off allocation costs
    features = np.column_stack([np.ones(len(rows)), rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3]])
    coef = _nnls(features, rows[:, 4])
    predicted = features @ coef
    error = np.abs(predicted - rows[:, 4]) / rows[:, 4]
    print(f"steps={len(rows)} median relative error={np.median(error):.1%} p90={np.percentile(error, 90):.1%}")
    names = ["overhead_s", "prefill_token_s", "prefill_attn_s", "decode_seq_s", "decode_ctx_s"]
    for name, value in zip(names, coef, strict=True):
        print(f"        {name}={value:.3g},")


async def _drain(engine: BatchingEngine, req: Any) -> None:
    async for _ in engine.generate(req):
        pass


def _nnls(a: np.ndarray, b: np.ndarray, iterations: int = 20000) -> np.ndarray:
    """Non-negative least squares by projected gradient on column-scaled features (no scipy needed)."""
    scale = np.maximum(np.abs(a).max(axis=0), 1e-12)
    scaled = a / scale
    x = np.zeros(a.shape[1])
    step = 1.0 / np.linalg.norm(scaled, 2) ** 2
    for _ in range(iterations):
        x = np.maximum(0.0, x - step * scaled.T @ (scaled @ x - b))
    return np.asarray(x / scale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="checkpoint folder (default: build the tiny model)")
    parser.add_argument("--calibrate", action="store_true", help="fit the cpu-reference performance profile")
    parser.add_argument("--measure", choices=["engine", "hf-batched", "hf-sequential"], help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    model = args.model or build(Path(tempfile.mkdtemp(prefix="shoal-bench-")) / TINY_MODEL_NAME)
    if args.calibrate:
        asyncio.run(calibrate(model))
        return
    if args.measure:
        if args.measure == "engine":
            result = asyncio.run(engine_round(model, args.seed))
        else:
            result = hf_round(model, args.seed, sequential=args.measure == "hf-sequential")
        print(json.dumps(result))
        return
    engine_rounds, batched_rounds, gaps = [], [], []
    for round_ in range(1, ROUNDS + 1):
        engine = measure(model, "engine", round_)
        engine_rounds.append(engine["tps"])
        gaps += engine["gaps"]
        batched_rounds.append(measure(model, "hf-batched", round_)["tps"])
    sequential_tps = measure(model, "hf-sequential", 0)["tps"]
    tps, batched_tps = float(np.median(engine_rounds)), float(np.median(batched_rounds))
    print(f"{REQUESTS} requests x {PROMPT_TOKENS}-token prompts x {NEW_TOKENS} new tokens, tiny model, CPU")
    print(f"{'engine':<32}{'tokens/s (median)':>18}{'rounds':>20}{'tbt p50 ms':>12}{'tbt p99 ms':>12}")
    rounds = " ".join(f"{r:.0f}" for r in engine_rounds)
    print(f"{'shoal reference (continuous)':<32}{tps:>18.0f}{rounds:>20}{pct(gaps, 50):>12.1f}{pct(gaps, 99):>12.1f}")
    print(f"{'transformers, one at a time':<32}{sequential_tps:>18.0f}{'':>20}")
    rounds = " ".join(f"{r:.0f}" for r in batched_rounds)
    print(f"{'transformers, padded batch':<32}{batched_tps:>18.0f}{rounds:>20}")
    print(
        f"bench-engine: tokens_per_s={tps:.0f} vs_hf_sequential={tps / sequential_tps:.2f} "
        f"vs_hf_batched={tps / batched_tps:.2f}"
    )


if __name__ == "__main__":
    main()
