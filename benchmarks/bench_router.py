"""Router benchmarks: (a) routing overhead, (b) prefix-aware routing on multi-turn chat.

(a) The router in front of two `sim` workers that answer at once (a huge
speed-up; 4 streamed tokens). 200 and 1,000 concurrent streams, each stream
a client that sends requests back to back. Baseline, same run: the same
clients calling the workers directly over gRPC. Added latency = router
latency - direct latency, p50 and p99; requests/s through the router; errors.

(b) Document Q&A on two reference workers (real tensors): 16 conversations,
each opening with its own ~1,200-token document and asking 3 questions about
it, every turn resending the whole history, all conversations at once.
Prefix-aware routing vs round-robin, same run: prefix-cache hit rate (cached
prompt tokens / prompt tokens, from usage) and TTFT p50/p99. The oracle hit
rate is what perfect routing with unbounded caches would reach: for each
request, the longest block prefix of its prompt any earlier request had.

Run: make bench-router. Last line:
bench-router: added_p50_ms=<x> added_p99_ms=<x> rps=<x> errors=<n> errors_1000=<n> hit_vs_oracle=<ratio>
ttft_p50_rr_over_prefix=<ratio>
"""

from __future__ import annotations

import asyncio
import multiprocessing
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from shared.hashing import BlockHasher
from tests.e2e.conftest import local_stack

MODEL = "shoal-tiny-moe"
PROMPT = "Summarize: the cache is warm."


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")


# -- (a) overhead ---------------------------------------------------------------


def _http_clients(url: str, streams: int, per_stream: int, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    import aiohttp

    async def main() -> None:
        latencies: list[float] = []
        errors = 0
        body = orjson.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "stream": True, "ignore_eos": True})
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as http:

            async def stream() -> None:
                nonlocal errors
                for _ in range(per_stream):
                    started = time.perf_counter()
                    try:
                        async with http.post(
                            f"{url}/v1/completions", data=body, headers={"content-type": "application/json"}
                        ) as response:
                            payload = await response.read()
                            if response.status != 200 or b"[DONE]" not in payload or b'"error"' in payload:
                                errors += 1
                                continue
                    except (aiohttp.ClientError, TimeoutError):
                        errors += 1
                        continue
                    latencies.append(time.perf_counter() - started)

            started = time.perf_counter()
            await asyncio.gather(*(stream() for _ in range(streams)))
            out.put((latencies, errors, time.perf_counter() - started))

    asyncio.run(main())


def _grpc_clients(addresses: list[str], streams: int, per_stream: int, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    from shared.errors import ShoalError
    from shared.rpc.shoal.v1 import common_pb2, worker_pb2
    from shared.rpc.worker_client import WorkerClient

    async def main() -> None:
        clients = [WorkerClient(a) for a in addresses]
        latencies: list[float] = []
        errors = 0
        prompt = list(PROMPT.encode())
        counter = iter(range(10**9))

        async def stream(index: int) -> None:
            nonlocal errors
            client = clients[index % len(clients)]
            for _ in range(per_stream):
                request = worker_pb2.GenerateRequest(
                    request_id=f"direct-{index}-{next(counter)}",
                    model=MODEL,
                    prompt_token_ids=[16 + b for b in prompt],
                    sampling=common_pb2.SamplingParams(max_tokens=4, ignore_eos=True),
                )
                started = time.perf_counter()
                try:
                    async for _ in client.generate(request, 120):
                        pass
                except ShoalError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(stream(i) for i in range(streams)))
        out.put((latencies, errors, time.perf_counter() - started))
        for client in clients:
            await client.close()

    asyncio.run(main())


@dataclass
class Load:
    p50_ms: float
    p99_ms: float
    rps: float
    errors: int
    requests: int


def _drive(target: Any, args: tuple[Any, ...], streams: int, per_stream: int, processes: int = 2) -> Load:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [
        context.Process(target=target, args=(*args, streams // processes, per_stream, queue)) for _ in range(processes)
    ]
    for process in workers:
        process.start()
    results = [queue.get(timeout=600) for _ in workers]
    for process in workers:
        process.join(30)
    latencies = [latency for r in results for latency in r[0]]
    errors = sum(r[1] for r in results)
    span = max(r[2] for r in results)
    return Load(_pct(latencies, 0.5), _pct(latencies, 0.99), len(latencies) / span, errors, len(latencies) + errors)


def overhead(model: Path) -> dict[int, tuple[Load, Load]]:
    results: dict[int, tuple[Load, Load]] = {}
    env = {"SHOAL_WORKER_SIM_SPEEDUP": "1000000", "SHOAL_LOG_LEVEL": "WARNING", "SHOAL_WORKER_MAX_WAITING": "4096"}
    with local_stack(model, [("mixed", "sim"), ("mixed", "sim")], **env) as (endpoints, _):
        addresses = list(endpoints.workers.values())
        for streams, per_stream in ((200, 10), (1000, 3)):
            direct = _drive(_grpc_clients, (addresses,), streams, per_stream)
            routed = _drive(_http_clients, (endpoints.router,), streams, per_stream)
            results[streams] = (direct, routed)
    return results


# -- (b) prefix-aware vs round-robin -----------------------------------------------


@dataclass
class ChatResult:
    hit_rate: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    requests: int


SYSTEM = "Answer questions about the document in one short line."
WORDS = (
    "cache", "block", "prefix", "worker", "router", "token", "expert", "decode", "prefill", "latency", "queue",
    "budget",
)  # fmt: skip


def document(index: int, words: int = 160) -> str:
    """A conversation's own document: deterministic, unlike every other's from its first word."""
    import random

    rng = random.Random(index)
    return f"Document {index}: " + " ".join(rng.choice(WORDS) for _ in range(words))


def question(index: int, turn: int) -> str:
    first = f"{document(index)}\n\n" if turn == 0 else ""
    return f"{first}Question {turn}: which word comes up most often in part {turn}?"


async def _conversation(url: str, index: int, turns: int, ttfts: list[float], usage: list[tuple[int, int]]) -> None:
    import httpx

    messages: list[dict[str, str]] = [{"role": "system", "content": SYSTEM}]
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        for turn in range(turns):
            messages.append({"role": "user", "content": question(index, turn)})
            body = {
                "model": MODEL,
                "messages": messages,
                "max_tokens": 8,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            started = time.perf_counter()
            first: float | None = None
            text = ""
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = orjson.loads(line[6:])
                    if chunk.get("usage"):
                        details = chunk["usage"]["prompt_tokens_details"]
                        usage.append((chunk["usage"]["prompt_tokens"], details["cached_tokens"]))
                    for choice in chunk.get("choices", []):
                        content = choice["delta"].get("content")
                        if content and first is None:
                            first = time.perf_counter() - started
                        text += content or ""
            ttfts.append(first if first is not None else time.perf_counter() - started)
            messages.append({"role": "assistant", "content": text})


def chat(model: Path, preset: str, conversations: int = 16, turns: int = 3) -> ChatResult:
    env = {
        "SHOAL_ROUTER_ROUTING_PRESET": preset,
        "SHOAL_LOG_LEVEL": "WARNING",
        "SHOAL_ROUTER_PD_MIN_UNCACHED_TOKENS": "100000",
    }
    with local_stack(model, [("mixed", "reference"), ("mixed", "reference")], **env) as (endpoints, _):
        ttfts: list[float] = []
        usage: list[tuple[int, int]] = []

        async def run_all() -> None:
            await asyncio.gather(
                *(_conversation(endpoints.router, i, turns, ttfts, usage) for i in range(conversations))
            )

        asyncio.run(run_all())
    prompt = sum(p for p, _ in usage)
    cached = sum(c for _, c in usage)
    return ChatResult(cached / prompt, _pct(ttfts, 0.5), _pct(ttfts, 0.99), len(ttfts))


def oracle_hit_rate(model: Path, conversations: int = 16, turns: int = 3) -> float:
    """Hit rate with perfect routing and unbounded caches, on the same prompts (replies from a dry run)."""
    from services.router.prompts import PromptBuilder

    builder = PromptBuilder(model)
    hasher = BlockHasher(MODEL, 16)
    seen: set[bytes] = set()
    prompt_total = cached_total = 0
    histories = [[{"role": "system", "content": SYSTEM}] for _ in range(conversations)]
    for turn in range(turns):  # conversations advance in lock step, as the load does on average
        for index, history in enumerate(histories):
            history.append({"role": "user", "content": question(index, turn)})
            tokens = builder.chat(history)
            hashes = hasher.hashes(tokens)
            matched = 0
            for block in hashes[: (len(tokens) - 1) // 16]:
                if block not in seen:
                    break
                matched += 1
            seen.update(hashes)
            prompt_total += len(tokens)
            cached_total += matched * 16
            history.append({"role": "assistant", "content": "x" * 8})  # 8 tokens, like the replies
    return cached_total / prompt_total


def main() -> None:
    model = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(".cache/models/shoal-tiny-moe")
    loads = overhead(model)
    print(f"{'(a) overhead':<22}{'streams':>8}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>9}{'errors':>8}")
    for streams, (direct, routed) in loads.items():
        for name, load in (("direct to workers", direct), ("through router", routed)):
            print(f"{name:<22}{streams:>8}{load.p50_ms:>9.1f}{load.p99_ms:>9.1f}{load.rps:>9.0f}{load.errors:>8}")
    prefix = chat(model, "prefix-aware")
    round_robin = chat(model, "round-robin")
    oracle = oracle_hit_rate(model)
    print(f"\n{'(b) multi-turn chat':<22}{'hit rate':>9}{'TTFT p50':>10}{'TTFT p99':>10}{'requests':>9}")
    for name, result in (("prefix-aware", prefix), ("round-robin", round_robin)):
        print(
            f"{name:<22}{result.hit_rate:>9.2f}{result.ttft_p50_ms:>8.0f}ms{result.ttft_p99_ms:>8.0f}ms"
            f"{result.requests:>9}"
        )
    print(f"{'oracle (upper bound)':<22}{oracle:>9.2f}")
    direct200, routed200 = loads[200]
    _, routed1000 = loads[1000]
    print(
        f"bench-router: added_p50_ms={routed200.p50_ms - direct200.p50_ms:.1f} "
        f"added_p99_ms={routed200.p99_ms - direct200.p99_ms:.1f} rps={routed200.rps:.0f} "
        f"errors={routed200.errors} errors_1000={routed1000.errors} hit_vs_oracle={prefix.hit_rate / oracle:.2f} "
        f"ttft_p50_rr_over_prefix={round_robin.ttft_p50_ms / prefix.ttft_p50_ms:.2f}"
    )


if __name__ == "__main__":
    main()
