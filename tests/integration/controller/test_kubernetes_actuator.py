"""The Kubernetes actuator through the real `kubernetes` client, against a FAKE API server (HTTP level).

No Kubernetes API server runs here; tests/support/fake_kubernetes.py plays
one (scale subresource, pods, the ReplicaSet's deletion-cost rule).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.controller.actuators.base import InstanceState
from services.controller.actuators.kubernetes import POOL_LABEL, REMOVAL, REMOVAL_REPLICAS, KubernetesActuator
from shared.errors import Unavailable
from shared.types.pools import ModelCreate, ModelPublic, PoolCreate, PoolPublic
from tests.support.fake_kubernetes import FakeCluster, fake_kubernetes
from tests.support.services import running_controller

pytestmark = pytest.mark.integration

NAMESPACE = "shoal"
MODEL_SPEC = ModelCreate(name="tiny", path="/models/tiny")
POOL_SPEC = PoolCreate(name="decode", model="tiny", role="decode", engine="sim", min_replicas=2, max_replicas=4)
MODEL = ModelPublic(**MODEL_SPEC.model_dump())
POOL = PoolPublic(**POOL_SPEC.model_dump())


@pytest.fixture
def kubeconfig(tmp_path: Path) -> Path:
    return tmp_path / "kubeconfig"


@pytest.fixture
def cluster(kubeconfig: Path) -> Iterator[FakeCluster]:
    fake = FakeCluster(NAMESPACE, POOL_LABEL)
    fake.add_deployment("shoal-worker-decode", "decode")
    with fake_kubernetes(fake, kubeconfig):
        yield fake


async def test_scale_instances_and_a_drain_first_removal(cluster: FakeCluster, kubeconfig: Path) -> None:
    actuator = KubernetesActuator(NAMESPACE, "shoal-worker-", kubeconfig)
    await actuator.scale_to(POOL, MODEL, 3)
    instances = await actuator.instances("decode")
    assert instances.target == 3 and instances.count(InstanceState.RUNNING) == 3

    chosen = instances.instances[1].worker_id
    await actuator.remove(POOL, chosen)
    # Exactly the drained pod went away: it was marked cheapest to delete before replicas dropped.
    assert chosen not in cluster.pods and len(cluster.pods) == 2
    assert cluster.deployments["shoal-worker-decode"] == 2
    await actuator.remove(POOL, chosen)  # a retried job: the pod is gone, nothing more is lowered
    assert cluster.deployments["shoal-worker-decode"] == 2

    survivor = next(iter(cluster.pods))
    cluster.pods[survivor]["metadata"]["annotations"][REMOVAL] = "true"
    await actuator.remove(POOL, survivor)  # marked already: a retry after the replicas were lowered
    assert cluster.deployments["shoal-worker-decode"] == 2


async def test_a_removal_interrupted_after_marking_the_pod_is_finished_by_its_retry(
    cluster: FakeCluster, kubeconfig: Path
) -> None:
    actuator = KubernetesActuator(NAMESPACE, "shoal-worker-", kubeconfig)
    await actuator.scale_to(POOL, MODEL, 3)
    chosen = (await actuator.instances("decode")).instances[0].worker_id
    # The controller marked the pod and crashed before lowering the replicas.
    cluster.pods[chosen]["metadata"]["annotations"].update(
        {REMOVAL: "true", REMOVAL_REPLICAS: "2", "controller.kubernetes.io/pod-deletion-cost": "-1000000"}
    )
    assert cluster.deployments["shoal-worker-decode"] == 3
    await actuator.remove(POOL, chosen)  # the retried job
    assert cluster.deployments["shoal-worker-decode"] == 2
    assert chosen not in cluster.pods  # exactly the drained pod went away
    await actuator.remove(POOL, chosen)  # and a further retry changes nothing
    assert cluster.deployments["shoal-worker-decode"] == 2

    await actuator.delete_pool("decode")
    assert cluster.deployments["shoal-worker-decode"] == 0 and not cluster.pods


async def test_a_missing_deployment_is_a_clear_error(cluster: FakeCluster, kubeconfig: Path) -> None:
    actuator = KubernetesActuator(NAMESPACE, "shoal-worker-", kubeconfig)
    with pytest.raises(Unavailable, match="404"):
        await actuator.scale_to(POOL.model_copy(update={"name": "prefill"}), MODEL, 1)


async def test_the_controller_scales_a_pool_deployment_to_its_minimum(
    cluster: FakeCluster, kubeconfig: Path, redis_url: str
) -> None:
    async with running_controller(
        redis_url, actuator="kubernetes", kubernetes_namespace=NAMESPACE, kubeconfig=kubeconfig
    ) as front:
        await front.app.desired.create_model(MODEL_SPEC)
        await front.app.desired.create_pool(POOL_SPEC)
        for _ in range(100):
            if cluster.deployments["shoal-worker-decode"] == POOL.min_replicas:
                break
            await asyncio.sleep(0.1)
        assert cluster.deployments["shoal-worker-decode"] == POOL.min_replicas
