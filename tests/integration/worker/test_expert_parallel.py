"""Expert parallelism: one model over 2 ranks (processes, gloo) gives the single-process tokens."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from services.worker.engines.engine import BatchingEngine
from services.worker.engines.experts import ExpertMap
from services.worker.engines.reference.parallel import ExpertParallelExecutor
from services.worker.tiny_model import VARIANTS, build_tiny_model
from shared.errors import InvalidArgument
from shared.processes import free_port
from shared.rpc.shoal.v1 import common_pb2, worker_pb2
from shared.rpc.worker_client import WorkerClient
from tests.support.engines import collect, limits, prompts, reference_engine, request
from tests.support.models import TINY_MODEL_NAME
from tests.support.pki import as_controller
from tests.support.services import ep_worker_processes

pytestmark = pytest.mark.integration

WORLD = 2
PROMPTS = prompts(6, [5, 40, 130])
TOKENS = 24


async def greedy(engine: BatchingEngine) -> list[list[int]]:
    await engine.start()
    try:
        results = await asyncio.gather(*(collect(engine, request(f"r{i}", p, TOKENS)) for i, p in enumerate(PROMPTS)))
    finally:
        await engine.stop()
    return [r.tokens for r in results]


def rank_main(rank: int, port: int, model: str, expert_map: ExpertMap | None, out: Any) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    executor = ExpertParallelExecutor(
        Path(model), TINY_MODEL_NAME, rank, WORLD, expert_map, device="cpu", compute_threads=1
    )
    try:
        if rank == 0:
            out.put(asyncio.run(greedy(BatchingEngine(executor, limits()))))  # stopping it stops the followers
        else:
            executor.load()
            executor.allocate_kv(limits().kv_cache_bytes, limits().block_size)
            executor.follow()
    finally:
        dist.destroy_process_group()


def run_expert_parallel(model: Path, expert_map: ExpertMap | None) -> list[list[int]]:
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    port = free_port()
    ranks = [context.Process(target=rank_main, args=(r, port, str(model), expert_map, out)) for r in range(WORLD)]
    for process in ranks:
        process.start()
    try:
        tokens: list[list[int]] = out.get(timeout=180)
    finally:
        for process in ranks:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    assert all(p.exitcode == 0 for p in ranks), [p.exitcode for p in ranks]
    return tokens


@pytest.fixture(scope="module")
def single_process(tiny_model: Path) -> list[list[int]]:
    return asyncio.run(greedy(reference_engine(tiny_model)))


def test_two_ranks_give_the_single_process_tokens(tiny_model: Path, single_process: list[list[int]]) -> None:
    assert run_expert_parallel(tiny_model, None) == single_process


def test_replicated_hot_experts_share_tokens_and_keep_the_output(
    tiny_model: Path, single_process: list[list[int]]
) -> None:
    layers = ExpertMap.round_robin(4, 8, WORLD).holders
    # Experts 0 and 1 on both ranks in every layer: their tokens split between the copies.
    replicated = ExpertMap(tuple(((0, 1), (0, 1), *experts[2:]) for experts in layers), version=1)
    assert run_expert_parallel(tiny_model, replicated) == single_process


def test_a_top_8_router_over_two_ranks_gives_the_single_process_tokens(tmp_path: Path) -> None:
    """Eight experts per token, four on each rank: the ranks' partial sums must add up in the order one
    process adds them, or greedy tokens drift (with two experts per token the order cannot matter)."""
    model = build_tiny_model(tmp_path / TINY_MODEL_NAME, seed=0, variant=VARIANTS["top8"])
    assert run_expert_parallel(model, None) == asyncio.run(greedy(reference_engine(model)))


def test_a_map_that_loses_an_expert_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="holders"):
        ExpertMap(((((),) * 8),)).validate(WORLD)


async def generate(address: str) -> list[int]:
    client = WorkerClient(address, as_controller())
    sampling = common_pb2.SamplingParams(max_tokens=TOKENS, ignore_eos=True)
    message = worker_pb2.GenerateRequest(
        request_id="ep", model=TINY_MODEL_NAME, prompt_token_ids=PROMPTS[1], sampling=sampling
    )
    try:
        return [t async for r in client.generate(message, timeout_s=120) for t in r.token_ids]
    finally:
        await client.close()


def test_a_two_rank_worker_service_serves_the_same_tokens(
    tiny_model: Path, single_process: list[list[int]], redis_url: str
) -> None:
    with ep_worker_processes(redis_url, tiny_model, WORLD) as (address, ranks):
        assert asyncio.run(generate(address)) == single_process[1]
        assert ranks[1].alive()  # the follower serves nothing itself but stays with its leader
        ranks[0].terminate(grace_s=20)
        assert ranks[1].popen.wait(timeout=30) == 0, "the follower stops by itself, cleanly, with its leader"


def test_one_process_starts_its_own_followers_as_in_a_pod(
    tiny_model: Path, single_process: list[list[int]], redis_url: str
) -> None:
    with ep_worker_processes(redis_url, tiny_model, WORLD, local_followers=True) as (address, processes):
        leader = processes[0]
        assert asyncio.run(generate(address)) == single_process[1]
        children = Path(f"/proc/{leader.pid}/task/{leader.pid}/children").read_text().split()
        assert len(children) == 1  # the follower, started by rank 0 itself
        os.kill(int(children[0]), signal.SIGKILL)
        # Its collectives can never complete again: the instance exits for its supervisor to restart.
        assert leader.popen.wait(timeout=60) == 1
