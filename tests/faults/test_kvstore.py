"""Faults at the kvstore: killed mid-transfer, restarted over a large disk tier, a full disk.

The kvstore is a cache: whatever happens to it, requests complete with the
output they would have had, blocks it serves are intact, and it never answers
with an internal error.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cli.localstack import Endpoints, grpc_ready, local_stack
from cli.supervisor import Supervisor
from shared.processes import ManagedProcess, free_port, spawn
from shared.rpc.kvstore_client import KVStoreClient
from shared.rpc.security import Role, RpcSecurity
from shared.rpc.shoal.v1 import common_pb2, kvstore_pb2, worker_pb2
from shared.rpc.worker_client import WorkerClient
from tests.support.blocks import blocks
from tests.support.models import TINY_MODEL_NAME
from tests.support.pki import as_worker, tls_dir
from tests.support.redis import service_url
from tests.support.services import running_kvstore

MODEL = TINY_MODEL_NAME
CLIENTS = 4
PER_CLIENT = 4
AFTER_RESTART = 20
MAX_TOKENS = 8


def _metric(text: str, name: str) -> float:
    line = next((line for line in text.splitlines() if line.startswith(name + " ")), None)
    return float(line.split()[-1]) if line else 0.0


def _prompt(index: int) -> list[int]:
    """A prompt long enough for the router to hand it from the prefill pool to the decode pool."""
    return [16 + (index * 31 + i * 7) % 200 for i in range(320)]


async def _complete(http: httpx.AsyncClient, index: int) -> str:
    body = {"model": MODEL, "prompt": _prompt(index), "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    response = await http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["text"])


async def _uninterrupted(address: str, security: RpcSecurity, indices: range) -> dict[int, str]:
    """Each prompt's text computed whole on one worker, without the router, the kvstore or a hand-off
    (the decode pool's cache stays cold, so the run under test hands every prompt off)."""
    worker = WorkerClient(address, security)

    async def one(index: int) -> tuple[int, str]:
        request = worker_pb2.GenerateRequest(
            request_id=f"uninterrupted-{index}",
            model=MODEL,
            prompt_token_ids=_prompt(index),
            sampling=common_pb2.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True),
        )
        return index, "".join([r.text async for r in worker.generate(request, timeout_s=120)])

    try:
        return dict(await asyncio.gather(*(one(i) for i in indices)))
    finally:
        await worker.close()


async def _load(endpoints: Endpoints, during: asyncio.Event) -> dict[int, str]:
    """CLIENTS clients, each sending PER_CLIENT greedy requests one after another; `during` is set once
    a third of them have answered (the moment the fault is injected)."""
    outputs: dict[int, str] = {}
    total = CLIENTS * PER_CLIENT

    async def client(c: int) -> None:
        async with httpx.AsyncClient(base_url=endpoints.router, headers=endpoints.api_headers, timeout=120) as http:
            for r in range(PER_CLIENT):
                index = c * PER_CLIENT + r
                outputs[index] = await _complete(http, index)
                if len(outputs) >= total // 3:
                    during.set()

    await asyncio.gather(*(client(c) for c in range(CLIENTS)))
    return outputs


@pytest.fixture
def pd_stack(tiny_model: Path) -> Iterator[tuple[Endpoints, Supervisor]]:
    with local_stack(tiny_model, [("prefill", "reference"), ("decode", "reference")]) as running:
        yield running


@pytest.mark.e2e
@pytest.mark.slow
async def test_a_kvstore_killed_mid_transfer_loses_no_request(pd_stack: tuple[Endpoints, Supervisor]) -> None:
    endpoints, supervisor = pd_stack
    total = CLIENTS * PER_CLIENT
    prefill = next(a for w, a in endpoints.workers.items() if w.startswith("prefill-"))
    expected = await _uninterrupted(prefill, endpoints.security(Role.CONTROLLER), range(total + AFTER_RESTART))

    fault = asyncio.Event()
    killed: list[int] = []

    async def kill_under_load() -> None:
        await fault.wait()
        killed.append(supervisor.pid("kvstore"))
        os.killpg(killed[0], signal.SIGKILL)  # while hand-offs write and read it

    killer = asyncio.create_task(kill_under_load())
    outputs = await _load(endpoints, fault)
    await killer
    # Greedy decoding: each prompt gives the text of an uninterrupted run, whether its KV came through the
    # store, was recomputed because the store died under it, or was computed with no store at all.
    assert outputs == {i: expected[i] for i in range(total)}
    async with httpx.AsyncClient(base_url=endpoints.router, headers=endpoints.api_headers, timeout=120) as http:
        metrics = (await http.get("/metrics")).text
        # Every request answered before the kill was handed off; after it, a prefill whose store died may fail
        # and fall back to recomputing on the decode side (the outputs above are the same either way).
        assert _metric(metrics, 'shoal_router_pd_total{outcome="disaggregated"}') >= total // 3
        assert _metric(metrics, 'shoal_router_retries_total{kind="resume"}') == 0  # no stream was cut
        assert _metric(metrics, 'shoal_router_retries_total{kind="retry"}') == 0

        # Restarted (empty, on its port), it takes the hand-offs again once the clients have reconnected
        # (their gRPC channels back off up to 2 s; their fast paths are looked up again within 1 s).
        await asyncio.to_thread(supervisor.restart, "kvstore")
        # The killed store's arena (memory in /dev/shm) was reclaimed by its successor.
        assert not [name for name in os.listdir("/dev/shm") if name.endswith(f"-{killed[0]}.arena")]
        store = KVStoreClient(endpoints.kvstore, endpoints.security(Role.WORKER))
        try:
            for index in range(total, total + AFTER_RESTART):
                assert await _complete(http, index) == expected[index]
                stats = await store.stats()
                if stats.tiers[0].blocks > 0 and stats.hits > 0:
                    break
                if not stats.tiers[0].blocks:
                    await asyncio.sleep(0.5)
        finally:
            await store.close()
    # Written by a prefill, read by a decode (same-host reads are counted in batches of TOUCH_BATCH).
    assert stats.tiers[0].blocks > 0 and stats.hits > 0


def _kvstore_process(redis_url: str, port: int, disk: Path, memory_bytes: int) -> ManagedProcess:
    env = {
        "SHOAL_REDIS_URL": service_url(redis_url, Role.KVSTORE),
        "SHOAL_LOG_LEVEL": "WARNING",
        "SHOAL_KVSTORE_GRPC_PORT": str(port),
        "SHOAL_KVSTORE_MEMORY_BYTES": str(memory_bytes),
        "SHOAL_KVSTORE_MAX_BLOCK_BYTES": str(64 * 1024),
        "SHOAL_KVSTORE_DISK_PATH": str(disk),
        "SHOAL_KVSTORE_DISK_BYTES": str(256 * 2**20),
        "SHOAL_TLS_DIR": str(tls_dir(Role.KVSTORE)),
    }
    process = spawn("kvstore", [sys.executable, "-m", "services.kvstore"], env)
    for _ in range(600):
        if grpc_ready(f"127.0.0.1:{port}", "shoal.v1.KVStore", as_worker(), Role.KVSTORE):
            return process
        assert process.alive(), "the kvstore exited while starting"
        time.sleep(0.1)
    raise AssertionError("the kvstore did not start")


async def _disk_stats(client: KVStoreClient) -> kvstore_pb2.TierStats:
    """The disk tier's stats, once the blocks found after a restart are indexed."""
    for _ in range(600):
        disk = next(t for t in (await client.stats()).tiers if t.tier == kvstore_pb2.TIER_DISK)
        if not disk.loading:
            return disk
        await asyncio.sleep(0.05)
    raise AssertionError("the disk tier never finished loading")


@pytest.mark.integration
@pytest.mark.slow
async def test_a_restart_over_thousands_of_disk_blocks_serves_them_intact(redis_url: str, tmp_path: Path) -> None:
    port, disk = free_port(), tmp_path / "disk"
    saved = blocks(3000)  # 4 KiB each; memory holds a few hundred, the rest spill
    first = _kvstore_process(redis_url, port, disk, memory_bytes=2**20)
    try:
        client = KVStoreClient(f"127.0.0.1:{port}", as_worker())
        for start in range(0, len(saved), 200):
            assert (await client.put(saved[start : start + 200])).stored == 200
        on_disk = (await _disk_stats(client)).blocks
        await client.close()
    finally:
        first.terminate(grace_s=0)  # SIGKILL: a crash, not a shutdown
    assert on_disk > 2500
    spilled = sorted(disk.glob("*.blk"))
    victim = spilled[len(spilled) // 2]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in a payload
    victim.write_bytes(bytes(data))

    second = _kvstore_process(redis_url, port, disk, memory_bytes=2**20)
    try:
        client = KVStoreClient(f"127.0.0.1:{port}", as_worker())
        stats = await _disk_stats(client)
        assert stats.blocks == on_disk
        by_hash = {b.hash: b for b in saved}
        on_disk_blocks = [by_hash[bytes.fromhex(p.name.removesuffix(".blk"))] for p in spilled]
        got = []
        for start in range(0, len(on_disk_blocks), 200):
            got += await client.get([b.hash for b in on_disk_blocks[start : start + 200]], prefix_only=False)
        corrupt = by_hash[bytes.fromhex(victim.name.removesuffix(".blk"))]
        assert corrupt not in got and not victim.exists()  # verified on read, never served, deleted
        assert got == [b for b in on_disk_blocks if b is not corrupt]  # every other block, byte for byte
        stats = await _disk_stats(client)
        assert stats.corrupt_dropped == 1 and stats.blocks == on_disk - 1
        await client.close()
    finally:
        second.terminate(grace_s=5)


def _sizes(folder: Path) -> dict[str, int]:
    return {path.name: path.stat().st_size for path in folder.iterdir()}


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB filesystem (tmpfs): writes past it fail with ENOSPC."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True, check=False
    )
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs root: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.integration
async def test_a_full_disk_drops_spills_without_errors_or_temporary_files(redis_url: str, small_disk: Path) -> None:
    # The tier believes it has 64 MiB; the filesystem under it holds 1 MiB.
    settings = {"memory_bytes": 2**20, "max_block_bytes": 64 * 1024, "disk_path": small_disk, "disk_bytes": 64 * 2**20}
    saved = blocks(1200)  # ~5 MiB: memory and disk together cannot hold them
    async with running_kvstore(redis_url, **settings) as app:
        client = KVStoreClient(app.address, as_worker())
        for start in range(0, len(saved), 100):
            result = await client.put(saved[start : start + 100])  # never INTERNAL: a full disk is no error
            assert result.stored == 100
        disk = app.store.disk
        assert disk is not None
        assert disk.write_failures == 1  # one refused write; the tier then rests instead of retrying each put
        files = _sizes(small_disk)
        assert all(name.endswith(".blk") for name in files)  # no temporary file left behind
        assert disk.used_bytes == sum(files.values())  # the index counts what is on disk
        newest = saved[-100:]
        assert await client.get([b.hash for b in newest], prefix_only=False) == newest  # memory still serves
        await client.close()
