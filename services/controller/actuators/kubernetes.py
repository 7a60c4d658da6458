"""The Kubernetes actuator: each pool is a Deployment of workers.

Scaling sets the Deployment's replicas through its `scale` subresource.
Removal is drain-first: the job has drained the chosen worker (its pod), so
the actuator marks that pod with the lowest `pod-deletion-cost` and lowers the
replicas by one, which makes the ReplicaSet delete exactly that pod. The pod's
annotations record the request and the replica count it asks for, written
before the replicas are lowered: a retry after a crash in between lowers
them (they are still one above the recorded count), a retry after the
decrement does not (they equal it), so the replicas drop exactly once.
Readiness comes from the pods' Ready condition. The RBAC this needs
(get/patch on deployments/scale and pods, list pods) is in the Helm chart.
The `kubernetes` client is synchronous, so calls run in a thread.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from services.controller.actuators.base import Instance, InstanceState, PoolInstances
from shared.errors import Unavailable
from shared.types.pools import ModelPublic, PoolPublic

DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
REMOVAL = "shoal.io/removal-requested"
# The Deployment's replica count the removal asks for (its count when the pod was marked, minus one).
REMOVAL_REPLICAS = "shoal.io/removal-replicas"
POOL_LABEL = "shoal.io/pool"


class KubernetesActuator:
    name = "kubernetes"

    def __init__(self, namespace: str, deployment_prefix: str, kubeconfig: Path | None = None) -> None:
        from kubernetes import client, config

        configuration = client.Configuration()
        if kubeconfig is not None:
            config.load_kube_config(str(kubeconfig), client_configuration=configuration)  # type: ignore[no-untyped-call]
        else:
            config.load_incluster_config(configuration)  # type: ignore[no-untyped-call]
        api_client = client.ApiClient(configuration)
        self.namespace = namespace
        self.prefix = deployment_prefix
        self.apps = client.AppsV1Api(api_client)
        self.core = client.CoreV1Api(api_client)

    def deployment(self, pool: str) -> str:
        return f"{self.prefix}{pool}"

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from kubernetes.client.exceptions import ApiException

        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except ApiException as exc:
            raise Unavailable(f"kubernetes API: {exc.status} {exc.reason}", status=exc.status) from None

    async def scale_to(self, pool: PoolPublic, model: ModelPublic, replicas: int) -> None:
        await self._call(
            self.apps.patch_namespaced_deployment_scale,
            self.deployment(pool.name),
            self.namespace,
            {"spec": {"replicas": replicas}},
        )

    async def remove(self, pool: PoolPublic, worker_id: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            pod = await asyncio.to_thread(self.core.read_namespaced_pod, worker_id, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return  # already gone: nothing left to do
            raise Unavailable(f"kubernetes API: {exc.status} {exc.reason}") from None
        annotations = (pod.metadata.annotations if pod.metadata else None) or {}
        deployment = self.deployment(pool.name)
        scale = await self._call(self.apps.read_namespaced_deployment_scale, deployment, self.namespace)
        replicas = int(scale.spec.replicas or 0)
        if annotations.get(REMOVAL) == "true":
            recorded = annotations.get(REMOVAL_REPLICAS)
            if recorded is None or replicas != int(recorded) + 1:
                return  # lowered already (or changed since by someone else): never lower twice
            target = int(recorded)  # a crash came between the annotation and the decrement: finish it
        else:
            target = max(0, replicas - 1)
            await self._call(
                self.core.patch_namespaced_pod,
                worker_id,
                self.namespace,
                {
                    "metadata": {
                        "annotations": {DELETION_COST: "-1000000", REMOVAL: "true", REMOVAL_REPLICAS: str(target)}
                    }
                },
            )
        await self._call(
            self.apps.patch_namespaced_deployment_scale, deployment, self.namespace, {"spec": {"replicas": target}}
        )

    async def instances(self, pool: str) -> PoolInstances:
        scale = await self._call(self.apps.read_namespaced_deployment_scale, self.deployment(pool), self.namespace)
        pods = await self._call(self.core.list_namespaced_pod, self.namespace, label_selector=f"{POOL_LABEL}={pool}")
        instances = []
        for pod in pods.items:
            ready = any(c.type == "Ready" and c.status == "True" for c in (pod.status.conditions or []))
            state = (
                InstanceState.STOPPING
                if pod.metadata.deletion_timestamp
                else (InstanceState.RUNNING if ready else InstanceState.STARTING)
            )
            started = pod.metadata.creation_timestamp.timestamp() if pod.metadata.creation_timestamp else 0.0
            instances.append(Instance(pod.metadata.name, state, started))
        return PoolInstances(int(scale.spec.replicas or 0), instances)

    async def delete_pool(self, pool: str) -> None:
        await self._call(
            self.apps.patch_namespaced_deployment_scale,
            self.deployment(pool),
            self.namespace,
            {"spec": {"replicas": 0}},
        )
