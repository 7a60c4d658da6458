"""Router benchmarks: (a) the router's own cost, driven by wrk; (b) prefix-aware routing on multi-turn chat.

(a) One router process in front of two `sim` workers that answer at once (a
huge speed-up). Load comes from wrk (a compiled load generator, so the
client is not what is measured), keep-alive connections each sending
requests back to back, 10 s per row:
  - non-streamed 4-token chat completions at 8, 32, 200, 256 and 1,000
    connections: requests/s, latency p50/p99, errors of every kind;
  - baseline, same run, same wrk, same request: the workers called directly
    on their own OpenAI API (SHOAL_WORKER_HTTP_PORT), one wrk per worker with
    half the connections each (how the router spreads them). Added latency =
    through the router - direct, p50, at 8 connections;
  - streamed 32-token completions at 32 and 256 connections: SSE events that
    carried text per second, and the tokens they delivered per second.
These rows run with plaintext internal channels (SHOAL_RPC_PLAINTEXT), how
the peers they are compared with are measured. Then a second stack, the same
in all else, with mutual TLS between router and workers (the default): the
32- and 256-connection chat rows and the streamed rows again. The summary
uses the plaintext 32- and 256-connection rows for rps (the lower), the
8-connection rows for added latency, the streamed row with the most events;
tls_rps_cost and tls_events_cost are what mutual TLS takes off those.

(b) Document Q&A on two reference workers (real tensors): 16 conversations,
each opening with its own ~1,200-token document and asking 3 questions about
it, every turn resending the whole history, all conversations at once.
Prefix-aware routing vs round-robin, same run: prefix-cache hit rate (cached
prompt tokens / prompt tokens, from usage) and TTFT p50/p99. The oracle hit
rate is what perfect routing with unbounded caches would reach: for each
request, the longest block prefix of its prompt any earlier request had.

Run: make bench-router (installs wrk when missing). Last line:
bench-router: rps=<x> added_p50_ms=<x> stream_events_per_s=<x> errors=<n> errors_1000=<n> hit_vs_oracle=<x>
ttft_p50_rr_over_prefix=<x> tls_rps_cost=<x> tls_events_cost=<x>
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import orjson

from cli.localstack import Endpoints, local_stack
from shared.hashing import BlockHasher

MODEL = "shoal-tiny-moe"
WRK_SCRIPT = Path(__file__).with_name("wrk") / "openai.lua"
SECONDS = 10
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Summarize: the cache is warm."}], "max_tokens": 4}
STREAM = {
    "model": MODEL,
    "prompt": "Tell me about the cache.",
    "max_tokens": 32,
    "stream": True,
    "stream_options": {"include_usage": True},
}


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")


# -- (a) the router's cost, with wrk -----------------------------------------------


@dataclass
class Load:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    requests: int
    events_per_s: float = 0.0
    tokens_per_s: float = 0.0

    @classmethod
    def combined(cls, parts: list[Load]) -> Load:
        """Several wrk runs side by side (one per worker): rates add up, percentiles are averaged."""
        return cls(
            sum(p.rps for p in parts),
            sum(p.p50_ms for p in parts) / len(parts),
            sum(p.p99_ms for p in parts) / len(parts),
            sum(p.errors for p in parts),
            sum(p.requests for p in parts),
        )


def wrk(url: str, key: str, body: dict[str, object], connections: int, seconds: int = SECONDS) -> Load:
    threads = min(2, connections)
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "30s", "-s", str(WRK_SCRIPT), url]
    env = {**os.environ, "SHOAL_WRK_BODY": json.dumps({**body, "ignore_eos": True}), "SHOAL_WRK_KEY": key}
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout
    line = next(line for line in out.splitlines() if line.startswith("WRK "))
    stats = json.loads(line[4:])
    span = stats["duration_us"] / 1e6
    errors = stats["socket_errors"] + stats["status_errors"] + stats["error_events"]
    return Load(
        stats["requests"] / span,
        stats["p50_us"] / 1000,
        stats["p99_us"] / 1000,
        errors,
        stats["requests"],
        stats["events"] / span,
        stats["tokens"] / span,
    )


def direct(addresses: list[str], key: str, body: dict[str, object], connections: int) -> Load:
    """The same load on the workers' own API: one wrk per worker, the connections split evenly."""
    share = max(1, connections // len(addresses))
    with ThreadPoolExecutor(len(addresses)) as pool:
        runs = [pool.submit(wrk, f"http://{a}/v1/chat/completions", key, body, share) for a in addresses]
        return Load.combined([run.result() for run in runs])


@dataclass
class Overhead:
    routed: dict[int, Load]
    direct: dict[int, Load]
    streams: dict[int, Load]


def overhead(
    model: Path, tls: bool, routed: tuple[int, ...], direct_to: tuple[int, ...], streamed: tuple[int, ...]
) -> Overhead:
    env = {
        "SHOAL_WORKER_SIM_SPEEDUP": "1000000",
        "SHOAL_WORKER_HTTP_PORT": "0",
        "SHOAL_LOG_LEVEL": "WARNING",
        "SHOAL_WORKER_MAX_WAITING": "4096",
        "SHOAL_RPC_PLAINTEXT": "false" if tls else "true",
    }
    with local_stack(model, [("mixed", "sim"), ("mixed", "sim")], env) as (endpoints, _):
        assert (endpoints.pki is not None) == tls
        addresses = list(endpoints.worker_http.values())
        chat_url = f"{endpoints.router}/v1/chat/completions"
        key, token = endpoints.api_key, endpoints.internal_token  # both sides authenticate every request
        wrk(chat_url, key, CHAT, 32, seconds=3)  # warm-up: sessions open, caches filled
        rows = {c: wrk(chat_url, key, CHAT, c) for c in routed}
        direct_rows = {c: direct(addresses, token, CHAT, c) for c in direct_to}
        streams = {c: wrk(f"{endpoints.router}/v1/completions", key, STREAM, c) for c in streamed}
    return Overhead(rows, direct_rows, streams)


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


async def _conversation(
    endpoints: Endpoints, index: int, turns: int, ttfts: list[float], usage: list[tuple[int, int]]
) -> None:
    import httpx

    messages: list[dict[str, str]] = [{"role": "system", "content": SYSTEM}]
    async with httpx.AsyncClient(base_url=endpoints.router, headers=endpoints.api_headers, timeout=300) as http:
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
    with local_stack(model, [("mixed", "reference"), ("mixed", "reference")], env) as (endpoints, _):
        ttfts: list[float] = []
        usage: list[tuple[int, int]] = []

        async def run_all() -> None:
            await asyncio.gather(*(_conversation(endpoints, i, turns, ttfts, usage) for i in range(conversations)))

        asyncio.run(run_all())
    prompt = sum(p for p, _ in usage)
    cached = sum(c for _, c in usage)
    return ChatResult(cached / prompt, _pct(ttfts, 0.5), _pct(ttfts, 0.99), len(ttfts))


def oracle_hit_rate(model: Path, conversations: int = 16, turns: int = 3) -> float:
    """Hit rate with perfect routing and unbounded caches, on the same prompts (replies from a dry run)."""
    from shared.openai.prompts import PromptBuilder

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
    load = overhead(model, False, (8, 32, 200, 256, 1000), (8, 32), (32, 256))
    secured = overhead(model, True, (32, 256), (), (32, 256))
    print(f"{'(a) 4-token chat, wrk':<30}{'conns':>6}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    chat_rows = [("direct to the workers", load.direct), ("through the router", load.routed)]
    for name, rows in [*chat_rows, ("through the router, mTLS", secured.routed)]:
        for connections, row in rows.items():
            print(f"{name:<30}{connections:>6}{row.rps:>9.0f}{row.p50_ms:>9.2f}{row.p99_ms:>9.2f}{row.errors:>8}")
    print(f"\n{'(a) 32-token streams, wrk':<30}{'conns':>6}{'req/s':>9}{'events/s':>10}{'tokens/s':>10}{'errors':>8}")
    for name, rows in (("through the router", load.streams), ("through the router, mTLS", secured.streams)):
        for connections, row in rows.items():
            print(
                f"{name:<30}{connections:>6}{row.rps:>9.0f}{row.events_per_s:>10.0f}"
                f"{row.tokens_per_s:>10.0f}{row.errors:>8}"
            )
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
    rps = min(load.routed[32].rps, load.routed[256].rps)
    tls_rps = min(secured.routed[32].rps, secured.routed[256].rps)
    added = load.routed[8].p50_ms - load.direct[8].p50_ms
    events = max(row.events_per_s for row in load.streams.values())
    tls_events = max(row.events_per_s for row in secured.streams.values())
    print(
        f"bench-router: rps={rps:.0f} added_p50_ms={added:.2f} stream_events_per_s={events:.0f} "
        f"errors={load.routed[200].errors} errors_1000={load.routed[1000].errors} "
        f"hit_vs_oracle={prefix.hit_rate / oracle:.2f} "
        f"ttft_p50_rr_over_prefix={round_robin.ttft_p50_ms / prefix.ttft_p50_ms:.2f} "
        f"tls_rps_cost={1 - tls_rps / rps:.2f} tls_events_cost={1 - tls_events / events:.2f}"
    )


if __name__ == "__main__":
    main()
