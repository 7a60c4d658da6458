"""kvstore throughput against redis-server and a memory copy, every path, 256 KiB and 2 MiB blocks.

Each client is a process; the kvstore and redis-server are processes of
their own. A client Puts its share of the blocks one at a time, then Gets
them back one at a time (the same sequential single-block operations for
every system), 1 and 4 clients, 256 MiB of 256 KiB blocks and 512 MiB of
2 MiB blocks. Systems, all measured in the same run:

  kvstore remote   the data channel (another process, no shared memory: how a
                   worker on another host, or the chart's separate pod, moves KV),
                   plaintext: how redis and the floor below are measured
  kvstore mTLS     the same over mutual TLS, the default setting (a second store
                   process, started with certificates)
  kvstore gRPC     the same store over gRPC only (what the data channel replaced)
  kvstore local    the same-host shared-memory path (reads are a memory copy)
  redis            redis-server over TCP, SET and GET with redis-py
  tcp floor        the least any TCP store can cost here: a process per
                   connection with blocking sockets keeps blocks in a dict and
                   answers a 37-byte request with the payload (no index, no
                   checksum, no event loop): the ceiling for the remote rows
  mooncake TE      Mooncake's TransferEngine (mooncake-transfer-engine-non-cuda
                   from PyPI, its TCP transport, P2P handshake, default settings):
                   the transfer part of a Mooncake store Put and Get, a one-sided
                   write or read between a client's registered buffer and a
                   buffer another process registered, at the block's offset (no
                   index, no checksum): the engine the field uses, as a peer
  memcpy           an in-process copy of the same bytes (the ceiling for the
                   shared-memory path)

Then the prefill-to-decode hand-off as the workers do it: one process puts
a request's blocks in one call (32 blocks of 2 MiB), another gets them in one
call, over the data channel; MB/s = bytes / (put time + get time), plaintext
and over mutual TLS.

Run: make bench-kvstore. Last line (the worst ratio over clients and block sizes; the ratios against
redis use the plaintext rows, like for like; tls_*_cost is the MB/s mutual TLS takes off the data channel):
bench-kvstore: remote_get_vs_redis=<x> remote_put_vs_redis=<x> local_get_vs_memcpy=<x> handoff_mb_per_s=<x>
  tls_get_cost=<x> tls_put_cost=<x> handoff_tls_cost=<x>
"""

from __future__ import annotations

import asyncio
import ctypes
import multiprocessing
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.synchronize import Barrier
from typing import Any

import uvloop

from shared.processes import free_port, keep_big_buffers_in_the_heap, redis_server_argv, wait_for_port
from shared.rpc.security import Role, RpcSecurity
from shared.types.kv import KVBlock
from tests.support.blocks import blocks
from tests.support.pki import as_worker, tls_dir

KIB = 1024
MIB = 1024 * KIB
SIZES = {256 * KIB: 1024, 2 * MIB: 256}  # block size -> blocks per run
HANDOFF_BLOCKS = 32
HANDOFF_ROUNDS = 8


@dataclass
class Result:
    system: str
    block: int
    clients: int
    put_mb_s: float
    get_mb_s: float
    put_p50_ms: float
    get_p50_ms: float


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


Timings = tuple[float, float, float, float, list[float], list[float]]


_FLOOR_REQUEST = struct.Struct("<c32sI")  # op (b"p" or b"g"), block name, payload length


def _floor_connection(conn: socket.socket) -> None:
    """Serve one floor client: puts kept in a dict, gets answered with the payload as it is."""
    stored: dict[bytes, bytearray] = {}
    header = bytearray(_FLOOR_REQUEST.size)
    while _recv_exactly(conn, memoryview(header)):
        op, name, length = _FLOOR_REQUEST.unpack(header)
        if op == b"p":
            payload = bytearray(length)
            _recv_exactly(conn, memoryview(payload))
            stored[name] = payload
            conn.sendall(b"k")
        else:
            payload = stored[name]
            conn.sendall(struct.pack("<I", len(payload)))
            conn.sendall(payload)


def _floor_server(port: int) -> None:
    keep_big_buffers_in_the_heap()  # as the kvstore does: a put's buffer is not a fresh mapping
    listener = socket.create_server(("127.0.0.1", port))
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if os.fork() == 0:
            listener.close()
            _floor_connection(conn)
            os._exit(0)
        conn.close()


def _recv_exactly(conn: socket.socket, view: memoryview) -> bool:
    got = 0
    while got < len(view):
        n = conn.recv_into(view[got:])
        if n == 0:
            return False
        got += n
    return True


class _FloorClient:
    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self.conn = socket.create_connection((host, int(port)))
        self.conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.length = bytearray(4)

    def put(self, block: KVBlock) -> None:
        self.conn.sendall(_FLOOR_REQUEST.pack(b"p", block.hash, len(block.payload)))
        self.conn.sendall(block.payload)
        _recv_exactly(self.conn, memoryview(self.length)[:1])

    def get_into(self, block: KVBlock, buffer: bytearray) -> None:
        self.conn.sendall(_FLOOR_REQUEST.pack(b"g", block.hash, 0))
        _recv_exactly(self.conn, memoryview(self.length))
        _recv_exactly(self.conn, memoryview(buffer)[: struct.unpack("<I", self.length)[0]])


# The TransferEngine server's buffer: room for every block of the largest run (clients write at disjoint offsets).
_TE_BYTES = max(size * count for size, count in SIZES.items())


def _te_engine() -> Any:
    """A TransferEngine on loopback: TCP transport, peers found by handshake (no metadata server)."""
    from mooncake.engine import TransferEngine

    engine = TransferEngine()
    if engine.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") != 0:
        raise RuntimeError("TransferEngine did not initialize")
    return engine


def _te_server(ready: multiprocessing.Queue[tuple[int, int]]) -> None:
    """Register one buffer with a TransferEngine and serve it (the engine's threads do the work)."""
    engine = _te_engine()
    buffer = ctypes.create_string_buffer(_TE_BYTES)
    if engine.register_memory(ctypes.addressof(buffer), _TE_BYTES) != 0:
        raise RuntimeError("TransferEngine did not register the buffer")
    ready.put((engine.get_rpc_port(), ctypes.addressof(buffer)))
    while True:
        time.sleep(3600)


class _TEClient:
    """A client's blocks staged in one registered buffer (untimed), written to and read from the server's buffer
    at offsets of their own: target is "host:port/base address", first the client's first block's index."""

    def __init__(self, target: str, mine: list[KVBlock], first: int) -> None:
        self.engine = _te_engine()
        self.peer, _, base = target.partition("/")
        self.size = len(mine[0].payload)
        self.remote = int(base) + first * self.size
        self.staged = ctypes.create_string_buffer(b"".join(b.payload for b in mine), len(mine) * self.size)
        self.local = ctypes.addressof(self.staged)
        if self.engine.register_memory(self.local, len(mine) * self.size) != 0:
            raise RuntimeError("TransferEngine did not register the client's buffer")
        self.index = {b.hash: i for i, b in enumerate(mine)}

    def _transfer(self, operation: Callable[[str, int, int, int], int], block: KVBlock) -> None:
        i = self.index[block.hash]
        if operation(self.peer, self.local + i * self.size, self.remote + i * self.size, self.size) != 0:
            raise RuntimeError("TransferEngine transfer failed")

    def put(self, block: KVBlock) -> None:
        self._transfer(self.engine.transfer_sync_write, block)

    def get(self, block: KVBlock) -> None:
        self._transfer(self.engine.transfer_sync_read, block)


def _sync_client(system: str, target: str, mine: list[KVBlock], first: int, barrier: Barrier) -> Timings:
    import redis

    client = redis.Redis.from_url(target) if system == "redis" else None
    floor = _FloorClient(target) if system == "tcp floor" else None
    te = _TEClient(target, mine, first) if system == "mooncake TE" else None
    copies: dict[bytes, bytearray] = {}
    buffer = bytearray(len(mine[0].payload))
    put_times: list[float] = []
    get_times: list[float] = []
    barrier.wait()
    start = time.perf_counter()
    for b in mine:
        t0 = time.perf_counter()
        if client is not None:
            client.set(b.hash, b.payload)
        elif floor is not None:
            floor.put(b)
        elif te is not None:
            te.put(b)
        else:
            copies[b.hash] = bytearray(b.payload)
        put_times.append(time.perf_counter() - t0)
    put_end = time.perf_counter()
    barrier.wait()
    get_start = time.perf_counter()
    for b in mine:
        t0 = time.perf_counter()
        if client is not None:
            got = client.get(b.hash)
            assert isinstance(got, bytes) and len(got) == len(b.payload)
        elif floor is not None:
            floor.get_into(b, buffer)
        elif te is not None:
            te.get(b)
        else:
            buffer[:] = copies[b.hash]
        get_times.append(time.perf_counter() - t0)
    return start, put_end, get_start, time.perf_counter(), put_times, get_times


def _security(system: str) -> RpcSecurity:
    return as_worker() if system.endswith("mTLS") else RpcSecurity(Role.WORKER, None)


async def _kvstore_client(system: str, target: str, mine: list[KVBlock], barrier: Barrier) -> Timings:
    from shared.rpc.kvstore_client import KVStoreClient

    client = KVStoreClient(
        target, _security(system), local=system == "kvstore local", data_channel=system != "kvstore gRPC"
    )
    await client.get([mine[0].hash])  # settle the path before timing
    assert client.uses_local_path == (system == "kvstore local")
    assert client.uses_data_channel == (system != "kvstore gRPC")
    loop = asyncio.get_running_loop()
    put_times: list[float] = []
    get_times: list[float] = []
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
        assert got and len(got[0].payload) == len(b.payload)
    end = time.perf_counter()
    await client.delete([b.hash for b in mine])  # every run starts from the same empty store (untimed)
    await client.close()
    return start, put_end, get_start, end, put_times, get_times


def _client(
    system: str, target: str, size: int, index: int, count: int, barrier: Barrier, out: multiprocessing.Queue[Timings]
) -> None:
    keep_big_buffers_in_the_heap()  # as every service process does (shared/processes.run_service)
    mine = blocks(count, size=size, start=index * count + size)  # distinct names per size and client
    if system in ("redis", "tcp floor", "mooncake TE", "memcpy"):
        out.put(_sync_client(system, target, mine, index * count, barrier))
    else:
        out.put(uvloop.run(_kvstore_client(system, target, mine, barrier)))


def measure(system: str, target: str, size: int, count: int, clients: int) -> Result:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(clients)
    queue: multiprocessing.Queue[Timings] = context.Queue()
    per_client = count // clients
    processes = [
        context.Process(target=_client, args=(system, target, size, i, per_client, barrier, queue))
        for i in range(clients)
    ]
    for process in processes:
        process.start()
    reports = [queue.get(timeout=600) for _ in processes]
    for process in processes:
        process.join(60)
    megabytes = per_client * clients * size / MIB
    put_span = max(r[1] for r in reports) - min(r[0] for r in reports)
    get_span = max(r[3] for r in reports) - min(r[2] for r in reports)
    return Result(
        system,
        size,
        clients,
        megabytes / put_span,
        megabytes / get_span,
        _percentile([t for r in reports for t in r[4]], 0.5),
        _percentile([t for r in reports for t in r[5]], 0.5),
    )


def _handoff_side(target: str, system: str, role: str, rounds: int, out: multiprocessing.Queue[list[float]]) -> None:
    """The prefill worker's put (role "put") or the decode worker's get (role "get"), timed per round."""
    from shared.rpc.kvstore_client import KVStoreClient

    keep_big_buffers_in_the_heap()

    async def run() -> list[float]:
        client = KVStoreClient(target, _security(system), local=False)
        times = []
        for round_ in range(rounds):
            batch = blocks(HANDOFF_BLOCKS, size=2 * MIB, start=10**6 + round_ * HANDOFF_BLOCKS)
            t0 = time.perf_counter()
            if role == "put":
                assert await client.store_blocks(batch, timeout_s=60)
            else:
                got = await client.fetch_prefix([b.hash for b in batch], timeout_s=60)
                assert len(got) == HANDOFF_BLOCKS
            times.append(time.perf_counter() - t0)
        await client.close()
        return times

    out.put(uvloop.run(run()))


def handoff(target: str, system: str) -> float:
    """MB/s of a P/D hand-off through the store: put by one process, then got by another."""
    context = multiprocessing.get_context("spawn")
    queue: multiprocessing.Queue[list[float]] = context.Queue()
    timings = {}
    for role in ("put", "get"):
        process = context.Process(target=_handoff_side, args=(target, system, role, HANDOFF_ROUNDS, queue))
        process.start()
        timings[role] = queue.get(timeout=600)
        process.join(60)
    moved = HANDOFF_BLOCKS * 2 * HANDOFF_ROUNDS  # MiB
    return float(moved / (sum(timings["put"]) + sum(timings["get"])))


def main() -> None:
    workdir = tempfile.mkdtemp(prefix="bench-kvstore-")
    redis_port, kv_port, tls_port, floor_port = free_port(), free_port(), free_port(), free_port()
    redis_proc = subprocess.Popen(redis_server_argv(redis_port, workdir), stdout=subprocess.DEVNULL)
    floor_proc = multiprocessing.get_context("fork").Process(target=_floor_server, args=(floor_port,), daemon=True)
    floor_proc.start()
    # The engine logs through glog; its failures reach us as return codes, so only fatal lines are kept.
    os.environ.setdefault("GLOG_minloglevel", "3")
    te_ready: multiprocessing.Queue[tuple[int, int]] = multiprocessing.get_context("spawn").Queue()
    te_proc = multiprocessing.get_context("spawn").Process(target=_te_server, args=(te_ready,), daemon=True)
    te_proc.start()
    env = {
        **os.environ,
        "SHOAL_KVSTORE_GRPC_PORT": str(kv_port),
        "SHOAL_KVSTORE_MEMORY_BYTES": str(6 * 2**30),
        "SHOAL_KVSTORE_MAX_BLOCK_BYTES": str(4 * MIB),
        "SHOAL_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "SHOAL_LOG_LEVEL": "WARNING",
        "SHOAL_RPC_PLAINTEXT": "true",
    }
    kv_proc = subprocess.Popen([sys.executable, "-m", "services.kvstore"], env=env)
    tls_env = {**env, "SHOAL_RPC_PLAINTEXT": "false", "SHOAL_TLS_DIR": str(tls_dir(Role.KVSTORE))}
    tls_env.update(SHOAL_KVSTORE_GRPC_PORT=str(tls_port), SHOAL_KVSTORE_STORE_ID="bench-tls")
    tls_proc = subprocess.Popen([sys.executable, "-m", "services.kvstore"], env=tls_env)
    results: list[Result] = []
    try:
        wait_for_port("127.0.0.1", redis_port, 10)
        wait_for_port("127.0.0.1", floor_port, 10)
        wait_for_port("127.0.0.1", kv_port, 60)
        wait_for_port("127.0.0.1", tls_port, 60)
        te_port, te_base = te_ready.get(timeout=60)
        targets = {
            "kvstore remote": f"127.0.0.1:{kv_port}",
            "kvstore mTLS": f"127.0.0.1:{tls_port}",
            "kvstore gRPC": f"127.0.0.1:{kv_port}",
            "kvstore local": f"127.0.0.1:{kv_port}",
            "redis": f"redis://127.0.0.1:{redis_port}/0",
            "tcp floor": f"127.0.0.1:{floor_port}",
            "mooncake TE": f"127.0.0.1:{te_port}/{te_base}",
            "memcpy": "",
        }
        for size, count in SIZES.items():
            for clients in (1, 4):
                for system, target in targets.items():
                    subprocess.run(["redis-cli", "-p", str(redis_port), "flushall"], check=True, capture_output=True)
                    results.append(measure(system, target, size, count, clients))
        handoff_mb_s = handoff(targets["kvstore remote"], "kvstore remote")
        handoff_tls_mb_s = handoff(targets["kvstore mTLS"], "kvstore mTLS")
    finally:
        kv_proc.terminate()
        tls_proc.terminate()
        tls_proc.wait(10)
        redis_proc.terminate()
        floor_proc.kill()
        te_proc.kill()
        kv_proc.wait(10)
        redis_proc.wait(10)

    print(f"{'system':<16}{'block':>8}{'clients':>8}{'put MB/s':>10}{'get MB/s':>10}{'put p50':>10}{'get p50':>10}")
    for r in results:
        print(
            f"{r.system:<16}{r.block // KIB:>6}Ki{r.clients:>8}{r.put_mb_s:>10.0f}{r.get_mb_s:>10.0f}"
            f"{r.put_p50_ms:>8.2f}ms{r.get_p50_ms:>8.2f}ms"
        )
    print(
        f"P/D hand-off over the data channel ({HANDOFF_BLOCKS} x 2 MiB per request): {handoff_mb_s:.0f} MB/s "
        f"plaintext, {handoff_tls_mb_s:.0f} MB/s mutual TLS"
    )
    by = {(r.system, r.block, r.clients): r for r in results}
    cases = [(size, clients) for size in SIZES for clients in (1, 4)]
    get_ratio = min(by["kvstore remote", *c].get_mb_s / by["redis", *c].get_mb_s for c in cases)
    put_ratio = min(by["kvstore remote", *c].put_mb_s / by["redis", *c].put_mb_s for c in cases)
    floor_get = [by["tcp floor", *c].get_mb_s / by["redis", *c].get_mb_s for c in cases]
    floor_put = [by["tcp floor", *c].put_mb_s / by["redis", *c].put_mb_s for c in cases]
    te_get = [by["mooncake TE", *c].get_mb_s / by["redis", *c].get_mb_s for c in cases]
    te_put = [by["mooncake TE", *c].put_mb_s / by["redis", *c].put_mb_s for c in cases]
    print(
        f"tcp floor vs redis (the most any store over one TCP connection per client reaches here): "
        f"get {min(floor_get):.2f}-{max(floor_get):.2f}x, put {min(floor_put):.2f}-{max(floor_put):.2f}x\n"
        f"mooncake TE vs redis (transfers only): get {min(te_get):.2f}-{max(te_get):.2f}x, "
        f"put {min(te_put):.2f}-{max(te_put):.2f}x"
    )
    local_ratio = min(by["kvstore local", *c].get_mb_s / by["memcpy", *c].get_mb_s for c in cases)
    tls_get = max(1 - by["kvstore mTLS", *c].get_mb_s / by["kvstore remote", *c].get_mb_s for c in cases)
    tls_put = max(1 - by["kvstore mTLS", *c].put_mb_s / by["kvstore remote", *c].put_mb_s for c in cases)
    tls_handoff = 1 - handoff_tls_mb_s / handoff_mb_s
    print(
        f"bench-kvstore: remote_get_vs_redis={get_ratio:.2f} remote_put_vs_redis={put_ratio:.2f} "
        f"local_get_vs_memcpy={local_ratio:.2f} handoff_mb_per_s={handoff_mb_s:.0f} "
        f"tls_get_cost={tls_get:.2f} tls_put_cost={tls_put:.2f} handoff_tls_cost={tls_handoff:.2f}"
    )


if __name__ == "__main__":
    main()
