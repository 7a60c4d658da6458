"""The Worker gRPC service through a real server, real Redis and real tensors."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.asyncio import Redis

from shared.config import EngineKind, WorkerRole
from shared.errors import FailedPrecondition, InvalidArgument, Unavailable
from shared.hashing import BlockHasher
from shared.rpc.client import open_channel
from shared.rpc.security import Role
from shared.rpc.shoal.v1 import common_pb2, worker_pb2
from shared.rpc.worker_client import WorkerClient
from shared.state.kvevents import KVEventFollower
from shared.state.registry import WorkerRegistry
from shared.state.versioned import DocumentStore
from tests.support.engines import prompts
from tests.support.models import TINY_MODEL_NAME
from tests.support.pki import as_controller
from tests.support.services import running_worker

pytestmark = pytest.mark.integration


def generate_request(
    request_id: str, prompt: list[int], max_tokens: int = 8, **sampling: object
) -> worker_pb2.GenerateRequest:
    return worker_pb2.GenerateRequest(
        request_id=request_id,
        model=TINY_MODEL_NAME,
        prompt_token_ids=prompt,
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True, **sampling),  # type: ignore[arg-type]
    )


async def run(
    client: WorkerClient, request: worker_pb2.GenerateRequest
) -> tuple[list[int], list[worker_pb2.GenerateResponse]]:
    responses = [r async for r in client.generate(request, timeout_s=60)]
    return [t for r in responses for t in r.token_ids], responses


async def test_health_registration_and_generate(redis_url: str, redis: Redis, tiny_model: Path) -> None:
    async with running_worker(redis_url, model_path=tiny_model, role=WorkerRole.DECODE, pool="p1") as app:
        channel = open_channel(app.address, Role.WORKER, as_controller())
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="shoal.v1.Worker"), timeout=5
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        await channel.close()

        [record] = await WorkerRegistry(redis).list_workers()
        assert record.info.address == app.address
        assert record.info.role is WorkerRole.DECODE and record.info.pool == "p1"
        assert record.info.kv_blocks_total > 0

        client = WorkerClient(app.address, as_controller())
        tokens, responses = await run(client, generate_request("r1", prompts(1, [30])[0], max_tokens=10))
        assert len(tokens) == 10
        last = responses[-1]
        assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (30, 10)
        assert all(r.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED for r in responses[:-1])
        load = await client.get_load()
        assert load.requests_finished == 1
        await client.close()
    assert await WorkerRegistry(redis).list_workers() == []  # deregistered on stop


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": "nope"}, "unknown model 'nope'"),
        ({"prompt_token_ids": []}, "prompt_token_ids is empty"),
        ({"prompt_token_ids": [5, 100000]}, "token id 100000"),
        ({"prompt_token_ids": [5] * 5000}, "context holds"),
        ({"sampling": common_pb2.SamplingParams(max_tokens=0)}, "max_tokens must be at least 1"),
        (
            {"sampling": common_pb2.SamplingParams(max_tokens=5, temperature=3.0)},
            "temperature must be within",
        ),
        ({"sampling": common_pb2.SamplingParams(max_tokens=5, top_p=1.5)}, "top_p must be within"),
        ({"sampling": common_pb2.SamplingParams(max_tokens=5, logit_bias={9: 200})}, "logit_bias values"),
        ({"sampling": common_pb2.SamplingParams(max_tokens=5, logit_bias={100000: 1})}, "token id 100000"),
        ({"sampling": common_pb2.SamplingParams(max_tokens=5, frequency_penalty=-3)}, "frequency_penalty must be"),
        ({"sampling": common_pb2.SamplingParams(max_tokens=5, repetition_penalty=2.5)}, "repetition_penalty must"),
        ({"sampling": common_pb2.SamplingParams(max_tokens=5, min_tokens=6)}, r"min_tokens \(6\) exceeds"),
        ({"request_id": ""}, "request_id is required"),
    ],
    ids=[
        "model",
        "empty",
        "vocab",
        "context",
        "max-tokens",
        "temperature",
        "top-p",
        "bias-value",
        "bias-vocab",
        "frequency",
        "repetition",
        "min-tokens",
        "request-id",
    ],
)
async def test_invalid_requests_get_invalid_argument_and_the_worker_keeps_serving(
    redis_url: str, tiny_model: Path, change: dict[str, object], message: str
) -> None:
    async with running_worker(redis_url, engine=EngineKind.SIM, model_path=tiny_model, sim_speedup=100) as app:
        client = WorkerClient(app.address, as_controller())
        bad = generate_request("bad", [5, 6, 7])
        for field, value in change.items():
            if isinstance(value, list):
                del getattr(bad, field)[:]
                getattr(bad, field).extend(value)
            elif isinstance(value, common_pb2.SamplingParams):
                bad.sampling.CopyFrom(value)
            else:
                setattr(bad, field, value)
        with pytest.raises(InvalidArgument, match=message):
            await run(client, bad)
        tokens, _ = await run(client, generate_request("good", [5, 6, 7], max_tokens=3))
        assert len(tokens) == 3
        await client.close()


async def test_cancelled_stream_aborts_the_request(redis_url: str, tiny_model: Path) -> None:
    async with running_worker(redis_url, engine=EngineKind.SIM, model_path=tiny_model, sim_speedup=1) as app:
        client = WorkerClient(app.address, as_controller())
        stream = client.generate(generate_request("long", [5] * 10, max_tokens=3000), timeout_s=60)
        await anext(stream)
        await stream.aclose()  # the client goes away
        for _ in range(100):
            if (await client.get_load()).running_requests == 0:
                break
            await asyncio.sleep(0.05)
        assert (await client.get_load()).running_requests == 0
        assert not await client.abort("long")
        await client.close()


async def test_drain_finishes_requests_in_flight_and_refuses_new_ones(
    redis_url: str, redis: Redis, tiny_model: Path
) -> None:
    async with running_worker(redis_url, engine=EngineKind.SIM, model_path=tiny_model, sim_speedup=5) as app:
        client = WorkerClient(app.address, as_controller())
        runs = [asyncio.create_task(run(client, generate_request(f"d{i}", [9] * 20, max_tokens=30))) for i in range(6)]
        await asyncio.sleep(0.2)
        drained = await client.drain(wait_s=30)
        assert drained.drained and drained.running_requests == 0
        results = await asyncio.gather(*runs)
        assert all(len(tokens) == 30 for tokens, _ in results)
        with pytest.raises(Unavailable, match="draining"):
            await run(client, generate_request("late", [9] * 5))
        await app.heartbeat.beat()  # type: ignore[union-attr]
        [record] = await WorkerRegistry(redis).list_workers()
        assert record.load.draining and not record.schedulable
        await client.close()


class _Index:
    def __init__(self) -> None:
        self.blocks: dict[str, set[bytes]] = {}

    def add(self, publisher: str, hashes: list[bytes]) -> None:
        self.blocks.setdefault(publisher, set()).update(hashes)

    def remove(self, publisher: str, hashes: list[bytes]) -> None:
        self.blocks.setdefault(publisher, set()).difference_update(hashes)

    def replace(self, publisher: str, hashes: list[bytes]) -> None:
        self.blocks[publisher] = set(hashes)

    def drop(self, publisher: str) -> None:
        self.blocks.pop(publisher, None)


async def test_prefix_cache_events_reach_a_follower(redis_url: str, redis: Redis, tiny_model: Path) -> None:
    index = _Index()
    follower = KVEventFollower(redis, index)
    await follower.bootstrap()
    prompt = prompts(1, [64])[0]
    async with running_worker(redis_url, engine=EngineKind.SIM, model_path=tiny_model, sim_speedup=50) as app:
        client = WorkerClient(app.address, as_controller())
        await run(client, generate_request("kv", prompt, max_tokens=2))
        expected = set(BlockHasher(TINY_MODEL_NAME, 16).hashes(prompt))
        for _ in range(40):
            await follower.poll(block_ms=100)
            if expected <= index.blocks.get(app.settings.worker_id, set()):
                break
        assert expected <= index.blocks[app.settings.worker_id]
        await client.close()
    await follower.poll(block_ms=100)
    assert app.settings.worker_id not in index.blocks  # a clean stop retracts the blocks


async def test_prefill_hold_then_decode_from_peer_equals_colocated(redis_url: str, tiny_model: Path) -> None:
    prompt = prompts(1, [75], seed=11)[0]
    async with (
        running_worker(redis_url, model_path=tiny_model, role=WorkerRole.PREFILL, worker_id="pre") as pre,
        running_worker(redis_url, model_path=tiny_model, role=WorkerRole.DECODE, worker_id="dec") as dec,
    ):
        prefill_client, decode_client = (
            WorkerClient(pre.address, as_controller()),
            WorkerClient(dec.address, as_controller()),
        )
        colocated, _ = await run(decode_client, generate_request("colo", prompt, max_tokens=20))
        prefill = await prefill_client.prefill(
            worker_pb2.PrefillRequest(
                request_id="p",
                model=TINY_MODEL_NAME,
                prompt_token_ids=prompt,
                sampling=common_pb2.SamplingParams(max_tokens=20, ignore_eos=True),
                sink=worker_pb2.KVSink(hold=True),
            ),
            timeout_s=60,
        )
        assert len(prefill.block_hashes) == 4
        assert prefill.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED
        decode_request = generate_request("d", prompt, max_tokens=20)
        decode_request.resume_token_ids.append(prefill.first_token_id)
        responses = [
            r
            async for r in decode_client.decode(
                worker_pb2.DecodeRequest(
                    request=decode_request,
                    kv_source=worker_pb2.KVSource(
                        peer=common_pb2.PeerRef(address=pre.address),
                        block_hashes=prefill.block_hashes,
                        timeout_ms=5000,
                    ),
                ),
                timeout_s=60,
            )
        ]
        decoded = [t for r in responses for t in r.token_ids]
        assert [prefill.first_token_id, *decoded] == colocated
        assert responses[-1].usage.cached_prompt_tokens == 64
        await prefill_client.close()
        await decode_client.close()


async def test_decode_from_an_unreachable_source_recomputes(redis_url: str, tiny_model: Path) -> None:
    prompt = prompts(1, [40], seed=12)[0]
    async with running_worker(redis_url, engine=EngineKind.SIM, model_path=tiny_model, sim_speedup=50) as app:
        client = WorkerClient(app.address, as_controller())
        request = worker_pb2.DecodeRequest(
            request=generate_request("x", prompt, max_tokens=4),
            kv_source=worker_pb2.KVSource(
                kvstore=common_pb2.KVStoreRef(address="127.0.0.1:1"),
                block_hashes=BlockHasher(TINY_MODEL_NAME, 16).hashes(prompt),
                timeout_ms=500,
            ),
        )
        responses = [r async for r in client.decode(request, timeout_s=30)]
        assert responses[-1].usage.completion_tokens == 4
        assert responses[-1].usage.cached_prompt_tokens == 0
        await client.close()


async def test_internal_token_is_required_when_set(redis_url: str, tiny_model: Path) -> None:
    async with running_worker(
        redis_url, engine=EngineKind.SIM, model_path=tiny_model, internal_token="s3cret-token"
    ) as app:
        anonymous = WorkerClient(app.address, as_controller())
        with pytest.raises(Exception, match="authorization") as caught:
            await anonymous.get_load()
        assert "Unauthenticated" in type(caught.value).__name__
        trusted = WorkerClient(app.address, as_controller("s3cret-token"))
        assert (await trusted.get_load()).kv_blocks_total > 0
        await anonymous.close()
        await trusted.close()


async def test_prefill_to_kvstore_then_decode_from_it_equals_colocated(redis_url: str, tiny_model: Path) -> None:
    from tests.support.services import running_kvstore

    prompt = prompts(1, [50], seed=13)[0]
    async with (
        running_kvstore(redis_url) as store,
        running_worker(redis_url, model_path=tiny_model, role=WorkerRole.PREFILL, worker_id="p2") as pre,
        running_worker(redis_url, model_path=tiny_model, role=WorkerRole.DECODE, worker_id="d2") as dec,
    ):
        prefill_client, decode_client = (
            WorkerClient(pre.address, as_controller()),
            WorkerClient(dec.address, as_controller()),
        )
        colocated, _ = await run(decode_client, generate_request("colo", prompt, max_tokens=12))
        prefill = await prefill_client.prefill(
            worker_pb2.PrefillRequest(
                request_id="p",
                model=TINY_MODEL_NAME,
                prompt_token_ids=prompt,
                sampling=common_pb2.SamplingParams(max_tokens=12, ignore_eos=True),
                sink=worker_pb2.KVSink(kvstore=common_pb2.KVStoreRef(address=store.address)),
            ),
            timeout_s=60,
        )
        assert len(prefill.block_hashes) == 3
        assert len(store.store.memory) == 3
        decode_request = generate_request("d", prompt, max_tokens=12)
        decode_request.resume_token_ids.append(prefill.first_token_id)
        source = worker_pb2.KVSource(
            kvstore=common_pb2.KVStoreRef(address=store.address), block_hashes=prefill.block_hashes, timeout_ms=5000
        )
        responses = [
            r
            async for r in decode_client.decode(worker_pb2.DecodeRequest(request=decode_request, kv_source=source), 60)
        ]
        assert [prefill.first_token_id, *[t for r in responses for t in r.token_ids]] == colocated
        assert responses[-1].usage.cached_prompt_tokens == 48
        await prefill_client.close()
        await decode_client.close()


async def test_a_single_process_worker_refuses_expert_migration_clearly(redis_url: str, tiny_model: Path) -> None:
    async with running_worker(redis_url, engine=EngineKind.SIM, model_path=tiny_model, sim_speedup=100) as app:
        client = WorkerClient(app.address, as_controller())
        try:
            stats = await client.expert_stats()
            assert not stats.expert_map.num_ranks  # no map: one process holds every expert
            target = common_pb2.ExpertMap(version=1, num_ranks=2, slots_per_rank=4)
            with pytest.raises(FailedPrecondition, match="holds every expert"):
                await client.stage_experts(worker_pb2.StageExpertsRequest(migration_id="m", target=target))
            with pytest.raises(FailedPrecondition, match="holds every expert"):
                await client.release_experts("m", discard_staged=True)
        finally:
            await client.close()


async def test_first_tokens_and_gaps_are_judged_against_the_pools_slo(
    redis_url: str, redis: Redis, tiny_model: Path
) -> None:
    """The SLO counters the burn-rate alerts read: the pool's document sets the targets the worker uses."""
    docs = DocumentStore(redis)
    # No token is that fast, every token is that slow: first tokens all miss, token gaps all meet.
    await docs.put("pool:slo-pool", {"slo": {"ttft_p90_s": 0.000001, "tbt_p90_s": 60}})
    async with running_worker(redis_url, model_path=tiny_model, pool="slo-pool") as app:
        client = WorkerClient(app.address, as_controller())
        for n in range(3):
            await run(client, generate_request(f"slo-{n}", prompts(1, [12], seed=n)[0], max_tokens=5))
        await client.close()
        registry = app.metrics.registry
        events = {
            (slo, result): registry.get_sample_value("shoal_worker_slo_events_total", {"slo": slo, "result": result})
            for slo in ("ttft", "tbt")
            for result in ("met", "missed")
        }
    assert events == {("ttft", "met"): 0, ("ttft", "missed"): 3, ("tbt", "met"): 12, ("tbt", "missed"): 0}
