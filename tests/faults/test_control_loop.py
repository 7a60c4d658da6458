"""Faults in the control loop: one pool's actuator failing must not stop the others, nor the job sweep."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.controller.actuators.kubernetes import POOL_LABEL
from services.controller.jobs.store import JobState
from shared.types.pools import ModelCreate, PoolCreate
from tests.support.fake_kubernetes import FakeCluster, fake_kubernetes
from tests.support.services import running_controller

pytestmark = pytest.mark.integration

NAMESPACE = "shoal"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[FakeCluster, Path]]:
    """A FAKE Kubernetes API (no API server runs here) with the decode pool's Deployment only."""
    fake = FakeCluster(NAMESPACE, POOL_LABEL)
    fake.add_deployment("shoal-worker-decode", "decode")
    kubeconfig = tmp_path / "kubeconfig"
    with fake_kubernetes(fake, kubeconfig):
        yield fake, kubeconfig


async def test_a_pool_whose_actuator_fails_does_not_stop_the_others(
    cluster: tuple[FakeCluster, Path], redis_url: str
) -> None:
    fake, kubeconfig = cluster
    async with running_controller(
        redis_url,
        actuator="kubernetes",
        kubernetes_namespace=NAMESPACE,
        kubeconfig=kubeconfig,
        reconcile_interval_s=3600,  # the test drives the ticks
    ) as front:
        app = front.app
        await app.desired.create_model(ModelCreate(name="tiny", path="/models/tiny"))
        # "prefill" is declared first and its Deployment does not exist: every call for it is a 404.
        for name in ("prefill", "decode"):
            await app.desired.create_pool(
                PoolCreate(name=name, model="tiny", role=name, engine="sim", min_replicas=2, max_replicas=4)
            )
        jobs = app.reconciler.jobs
        job, _ = await jobs.create("scale-down", {"pool": "decode", "worker_id": "gone"})
        job = await jobs.update(job, state=JobState.RUNNING, owner="a-runner-that-died", lease_until=time.time() - 60)

        statuses = await app.reconciler.tick()

        assert [s.pool for s in statuses] == ["decode"]
        (decode,) = statuses
        assert decode.acted and decode.desired >= 2
        # The healthy pool still scaled: to its target plus the one replica the open scale-down will remove.
        assert fake.deployments["shoal-worker-decode"] == decode.desired + 1
        assert "404" in app.reconciler.pool_errors["prefill"]
        for _ in range(100):  # and the job whose runner died was handed to a new one
            if (await jobs.get(job.id)).attempts == 1:
                break
            await asyncio.sleep(0.05)
        assert (await jobs.get(job.id)).owner != "a-runner-that-died"
