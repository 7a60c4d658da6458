"""The KV event stream losing entries: a router that missed them finds the gap and resyncs.

Workers publish their prefix caches' block events on one Redis stream and a
snapshot every few seconds. Router A follows the stream throughout; router B
stops reading, the entries it would have read are trimmed away, and it reads
on: it must see the sequence gap, reload the snapshots, and from then on route
exactly as A does. Router C starts after the trim (a restarted router) and
builds its index from the snapshots alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from shared.config import EngineKind
from shared.hashing import BlockHasher
from shared.state import schema
from tests.support.models import TINY_MODEL_NAME
from tests.support.services import RunningRouter, running_router, running_worker

pytestmark = pytest.mark.integration

MODEL = TINY_MODEL_NAME
WORKERS = ("w-1", "w-2")


def _prompt(index: int) -> list[int]:
    """Eight blocks of 16 tokens, different for every index from the first token on."""
    return [20 + index] + [20 + (index * 13 + i) % 180 for i in range(127)]


async def _cached_tokens(router: RunningRouter, index: int) -> int:
    """Prompt tokens the worker the router chose already held for this prompt."""
    body = {"model": MODEL, "prompt": _prompt(index), "max_tokens": 1, "temperature": 0}
    async with httpx.AsyncClient(base_url=router.url, timeout=60) as http:
        response = await http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return int(response.json()["usage"]["prompt_tokens_details"]["cached_tokens"])


def _views(router: RunningRouter, prompts: Sequence[int]) -> list[dict[str, int]]:
    """What the router's index says each worker holds of each prompt (what its decisions read)."""
    hasher = BlockHasher(MODEL, router.app.model(MODEL).block_size)
    hashes = [hasher.hashes(_prompt(i)) for i in prompts]
    return [router.app.index.prefix_lengths(h, WORKERS) for h in hashes]


async def _until(condition: object, timeout_s: float = 20.0) -> None:
    for _ in range(int(timeout_s / 0.05)):
        if condition():  # type: ignore[operator]
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the condition never held")


def _holders(router: RunningRouter, prompts: Sequence[int]) -> set[str]:
    """The workers whose caches hold these prompts, by the router's index."""
    return {max(view, key=lambda w: view[w]) for view in _views(router, prompts)}


async def _quiet(redis: Redis, still_s: float = 0.5, timeout_s: float = 20.0) -> None:
    """Wait until no event has been added for `still_s` (publishers batch every 0.1 s)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    length = await redis.xlen(schema.KV_EVENTS)
    while asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(still_s)
        now = await redis.xlen(schema.KV_EVENTS)
        if now == length:
            return
        length = now
    raise AssertionError("the workers kept publishing KV events")


async def _lose_events(redis: Redis, a: RunningRouter, b: RunningRouter, lost: range, after: range) -> None:
    """B stops reading; A sends `lost`; the stream is trimmed to nothing; A sends `after`; B reads on."""
    await b.app._events.stop()
    for index in lost:
        await _cached_tokens(a, index)
    await _until(lambda: all(any(v.values()) for v in _views(a, lost)))
    # A request's blocks may go out in more than one batch: trim only once the workers have published
    # all of them, or a late batch lost after the count would be a second, real, loss for B to find.
    await _quiet(redis)
    assert await redis.xtrim(schema.KV_EVENTS, maxlen=0) > 0
    for index in after:
        await _cached_tokens(a, index)
    await _until(lambda: all(any(v.values()) for v in _views(a, after)))
    b.app._events.start()


async def test_a_router_that_lost_events_resyncs_and_routes_as_one_that_did_not(
    redis_url: str, redis: Redis, tiny_model: Path
) -> None:
    async with (
        running_worker(redis_url, model_path=tiny_model, worker_id=WORKERS[0], engine=EngineKind.SIM),
        running_worker(redis_url, model_path=tiny_model, worker_id=WORKERS[1], engine=EngineKind.SIM),
        running_router(redis_url, tiny_model) as a,
        running_router(redis_url, tiny_model) as b,
    ):
        for router in (a, b):
            await router.app.directory.refresh()
        for index in range(4):
            await _cached_tokens(a, index)
        await _until(lambda: _views(a, range(4)) == _views(b, range(4)))

        # Events lost, then more from some workers: those show B a sequence gap at their next batch; a
        # worker that stayed quiet shows none, and B finds its loss from its snapshot mark instead.
        lost, after = range(4, 10), range(10, 14)
        await _lose_events(redis, a, b, lost, after)
        await _until(lambda: _views(b, range(14)) == _views(a, range(14)))
        noisy = _holders(a, lost) & _holders(a, after)
        assert b.app.follower.gaps == len(noisy)
        assert b.app.follower.losses == len(_holders(a, lost) - noisy)

        # Events lost and every worker quiet after: only the marks can tell.
        lost = range(14, 20)
        await _lose_events(redis, a, b, lost, range(0))
        await _until(lambda: _views(b, range(20)) == _views(a, range(20)))
        assert b.app.follower.gaps == len(noisy)
        assert b.app.follower.losses == len(_holders(a, range(4, 10)) - noisy) + len(_holders(a, lost))
        assert a.app.follower.gaps == a.app.follower.losses == 0  # A read everything the trims removed

        async with running_router(redis_url, tiny_model) as c:  # a router started after the trims
            await c.app.directory.refresh()
            await _until(lambda: _views(c, range(20)) == _views(a, range(20)))
            # Decisions, not just indexes: B and C send prompts they never saw to the worker A sends them to.
            for index in (*range(4, 10), *lost):
                reused = await _cached_tokens(a, index)
                assert reused > 0
                assert await _cached_tokens(b, index) == reused
                assert await _cached_tokens(c, index) == reused
