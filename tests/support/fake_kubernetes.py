"""FAKE Kubernetes API server, for tests only: no real API server can run here.

It speaks the HTTP API the `kubernetes` client uses for what the Kubernetes
actuator does (Deployment scale subresource; get, list and patch pods) and
plays the ReplicaSet controller: raising replicas creates Ready pods,
lowering them deletes the pods with the lowest `pod-deletion-cost` first (the
rule the real ReplicaSet controller follows). Everything else is 404. Never
what a user gets: the actuator talks to a real cluster in production.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvicorn
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from shared.processes import free_port

DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"


@dataclass
class FakeCluster:
    namespace: str
    pool_label: str
    deployments: dict[str, int] = field(default_factory=dict)  # name -> replicas
    pool_of: dict[str, str] = field(default_factory=dict)  # deployment -> pool label value
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)
    patches: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    _ids: Iterator[int] = field(default_factory=itertools.count)

    def add_deployment(self, name: str, pool: str, replicas: int = 0) -> None:
        self.deployments[name], self.pool_of[name] = 0, pool
        self.set_replicas(name, replicas)

    def pods_of(self, deployment: str) -> list[dict[str, Any]]:
        pool = self.pool_of[deployment]
        return [p for p in self.pods.values() if p["metadata"]["labels"][self.pool_label] == pool]

    def set_replicas(self, deployment: str, replicas: int) -> None:
        self.deployments[deployment] = replicas
        pods = self.pods_of(deployment)
        for _ in range(replicas - len(pods)):
            name = f"{deployment}-{next(self._ids)}"
            self.pods[name] = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": name,
                    "namespace": self.namespace,
                    "labels": {self.pool_label: self.pool_of[deployment]},
                    "annotations": {},
                    "creationTimestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                },
                "status": {"conditions": [{"type": "Ready", "status": "True"}]},
            }
        by_cost = sorted(pods, key=lambda p: int(p["metadata"]["annotations"].get(DELETION_COST, "0")))
        for pod in by_cost[: max(0, len(pods) - replicas)]:
            del self.pods[pod["metadata"]["name"]]

    def scale(self, name: str) -> dict[str, Any]:
        replicas = self.deployments[name]
        return {
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": {"replicas": replicas},
            "status": {"replicas": replicas},
        }


def _not_found(what: str) -> JSONResponse:
    body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": f"{what} not found", "code": 404}
    return JSONResponse(body, status_code=404)


def build_fake_api(cluster: FakeCluster) -> FastAPI:
    api = FastAPI()
    ns = "/namespaces/{namespace}"

    @api.get("/apis/apps/v1" + ns + "/deployments/{name}/scale")
    async def read_scale(namespace: str, name: str) -> Any:
        if namespace != cluster.namespace or name not in cluster.deployments:
            return _not_found(f'deployments.apps "{name}"')
        return cluster.scale(name)

    @api.patch("/apis/apps/v1" + ns + "/deployments/{name}/scale")
    async def patch_scale(namespace: str, name: str, request: Request) -> Any:
        if namespace != cluster.namespace or name not in cluster.deployments:
            return _not_found(f'deployments.apps "{name}"')
        body = await request.json()
        cluster.patches.append((name, body))
        cluster.set_replicas(name, int(body["spec"]["replicas"]))
        return cluster.scale(name)

    @api.get("/api/v1" + ns + "/pods")
    async def list_pods(namespace: str, labelSelector: str = "") -> Any:  # the API's own name
        key, _, value = labelSelector.partition("=")
        items = [p for p in cluster.pods.values() if not key or p["metadata"]["labels"].get(key) == value]
        return {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}

    @api.get("/api/v1" + ns + "/pods/{name}")
    async def read_pod(namespace: str, name: str) -> Any:
        return cluster.pods.get(name) or _not_found(f'pods "{name}"')

    @api.patch("/api/v1" + ns + "/pods/{name}")
    async def patch_pod(namespace: str, name: str, request: Request) -> Any:
        pod = cluster.pods.get(name)
        if pod is None:
            return _not_found(f'pods "{name}"')
        body = await request.json()
        pod["metadata"]["annotations"].update(body.get("metadata", {}).get("annotations", {}))
        return pod

    return api


@contextlib.contextmanager
def fake_kubernetes(cluster: FakeCluster, kubeconfig: Path) -> Iterator[str]:
    """Serve the FAKE API on a free loopback port and write a kubeconfig that points at it."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_fake_api(cluster), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True, name="fake-kubernetes")
    thread.start()
    url = f"http://127.0.0.1:{port}"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": url}}],
                "users": [{"name": "fake", "user": {"token": "fake-token"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": "shoal"}}],
                "current-context": "fake",
            }
        )
    )
    try:
        while not server.started:
            thread.join(0.01)
        yield url
    finally:
        server.should_exit = True
        thread.join(10)
