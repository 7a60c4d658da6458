"""kvstore throughput: 1,000 Puts then 1,000 Gets of 256 KiB blocks, 1 and 4 clients.

Compared in the same run with a real redis-server holding the same blocks
(SET/GET with redis-py) and with a plain in-process memory copy of the same
bytes (the ceiling). The kvstore runs as its own process; each client is a
process too. Two kvstore paths are measured: the default client (which uses
the shared-memory path, since the store is on this host) and gRPC only.

Run: make bench-kvstore   (or python -m benchmarks.bench_kvstore)
Last line: bench-kvstore: get_vs_redis=<ratio> put_vs_redis=<ratio> get_vs_memcpy=<ratio>
(throughput ratios with 4 clients; >1 means the kvstore is faster).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.synchronize import Barrier

from shared.processes import free_port, redis_server_argv, wait_for_port
from tests.support.blocks import blocks

BLOCK = 256 * 1024
OPS = 1000


@dataclass
class Result:
    system: str
    clients: int
    put_mb_s: float
    get_mb_s: float
    put_p50_ms: float
    put_p99_ms: float
    get_p50_ms: float
    get_p99_ms: float


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def _client(system: str, target: str, index: int, count: int, barrier: Barrier, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    mine = blocks(count, size=BLOCK, start=index * count)
    put_times: list[float] = []
    get_times: list[float] = []

    if system in ("redis", "memcpy"):
        import redis

        client = redis.Redis.from_url(target) if system == "redis" else None
        copies: dict[bytes, bytearray] = {}
        buffer = bytearray(BLOCK)
        barrier.wait()
        start = time.perf_counter()
        for b in mine:
            t0 = time.perf_counter()
            if client is not None:
                client.set(b.hash, b.payload)
            else:
                copies[b.hash] = bytearray(b.payload)
            put_times.append(time.perf_counter() - t0)
        put_end = time.perf_counter()
        barrier.wait()
        get_start = time.perf_counter()
        for b in mine:
            t0 = time.perf_counter()
            if client is not None:
                client.get(b.hash)
            else:
                buffer[:] = copies[b.hash]
            get_times.append(time.perf_counter() - t0)
        end = time.perf_counter()
    else:
        from shared.rpc.kvstore_client import KVStoreClient

        async def run() -> tuple[float, float, float, float]:
            client = KVStoreClient(target, local=system == "kvstore")
            await client.stats()
            await client.get([mine[0].hash])  # settle the transport choice before timing
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, barrier.wait)
            start = time.perf_counter()
            for b in mine:
                t0 = time.perf_counter()
                await client.put([b])
                put_times.append(time.perf_counter() - t0)
            put_end = time.perf_counter()
            await loop.run_in_executor(None, barrier.wait)
            get_start = time.perf_counter()
            for b in mine:
                t0 = time.perf_counter()
                got = await client.get([b.hash])
                get_times.append(time.perf_counter() - t0)
                assert got and len(got[0].payload) == BLOCK
            end = time.perf_counter()
            await client.close()
            return start, put_end, get_start, end

        start, put_end, get_start, end = asyncio.run(run())
    out.put((start, put_end, get_start, end, put_times, get_times))


def measure(system: str, target: str, clients: int) -> Result:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(clients)
    queue = context.Queue()
    per_client = OPS // clients
    processes = [
        context.Process(target=_client, args=(system, target, i, per_client, barrier, queue)) for i in range(clients)
    ]
    for process in processes:
        process.start()
    reports = [queue.get(timeout=600) for _ in processes]
    for process in processes:
        process.join(60)
    megabytes = per_client * clients * BLOCK / 2**20
    put_span = max(r[1] for r in reports) - min(r[0] for r in reports)
    get_span = max(r[3] for r in reports) - min(r[2] for r in reports)
    puts = [t for r in reports for t in r[4]]
    gets = [t for r in reports for t in r[5]]
    return Result(
        system,
        clients,
        megabytes / put_span,
        megabytes / get_span,
        _percentile(puts, 0.5),
        _percentile(puts, 0.99),
        _percentile(gets, 0.5),
        _percentile(gets, 0.99),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="bench-kvstore-")
    redis_port, kv_port = free_port(), free_port()
    redis_proc = subprocess.Popen(redis_server_argv(redis_port, workdir), stdout=subprocess.DEVNULL)
    env = {
        **os.environ,
        "SHOAL_KVSTORE_GRPC_PORT": str(kv_port),
        "SHOAL_KVSTORE_MEMORY_BYTES": str(2**30),
        "SHOAL_KVSTORE_MAX_BLOCK_BYTES": str(2**20),
        "SHOAL_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "SHOAL_LOG_LEVEL": "WARNING",
    }
    kv_proc = subprocess.Popen([sys.executable, "-m", "services.kvstore"], env=env)
    results: list[Result] = []
    try:
        wait_for_port("127.0.0.1", redis_port, 10)
        wait_for_port("127.0.0.1", kv_port, 60)
        targets = {
            "kvstore": f"127.0.0.1:{kv_port}",
            "kvstore-grpc": f"127.0.0.1:{kv_port}",
            "redis": f"redis://127.0.0.1:{redis_port}/0",
            "memcpy": "",
        }
        for clients in args.clients:
            for system, target in targets.items():
                if system == "redis":
                    subprocess.run(["redis-cli", "-p", str(redis_port), "flushall"], check=True, capture_output=True)
                results.append(measure(system, target, clients))
    finally:
        kv_proc.terminate()
        redis_proc.terminate()
        kv_proc.wait(10)
        redis_proc.wait(10)

    columns = ("put MB/s", "get MB/s", "put p50", "put p99", "get p50", "get p99")
    print(f"{'system':<14}{'clients':>8}" + "".join(f"{c:>10}" for c in columns))
    for r in results:
        print(
            f"{r.system:<14}{r.clients:>8}{r.put_mb_s:>10.0f}{r.get_mb_s:>10.0f}"
            f"{r.put_p50_ms:>8.2f}ms{r.put_p99_ms:>8.2f}ms{r.get_p50_ms:>8.2f}ms{r.get_p99_ms:>8.2f}ms"
        )
    top = max(args.clients)
    by = {r.system: r for r in results if r.clients == top}
    kv, rd, mc = by["kvstore"], by["redis"], by["memcpy"]
    print(
        f"bench-kvstore: get_vs_redis={kv.get_mb_s / rd.get_mb_s:.2f} put_vs_redis={kv.put_mb_s / rd.put_mb_s:.2f} "
        f"get_vs_memcpy={kv.get_mb_s / mc.get_mb_s:.2f}"
    )


if __name__ == "__main__":
    main()
