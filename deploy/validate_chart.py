"""Render the Helm chart and check what comes out (run by `make helm-lint`, part of `make test`).

For the default values and each values file given:
* every manifest validates against the Kubernetes 1.35 schema, strictly
  (`kubernetes-validate`; custom resources such as ServiceMonitor are
  reported and skipped, their CRDs are not in it);
* every Shoal container sets only SHOAL_* variables its service reads, with
  values its settings class accepts (secret and downward-API values are
  stood in for by well-formed samples);
* the controller's bootstrap document holds models, aliases and pools the controller
  accepts, one worker Deployment per pool, and the actuator's Role may
  scale exactly those Deployments.

Usage: python deploy/validate_chart.py HELM CHART [VALUES.yaml ...]
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import kubernetes_validate
import yaml

from shared.config import SERVICE_SETTINGS, SettingsError, env_names, load_settings
from shared.state.acl import USER_NAMES
from shared.types.pools import ModelCreate, PoolCreate

KUBERNETES = "1.35.0"
# Stand-ins for values only known in a cluster: secrets and the downward API.
SAMPLES = {
    "secretKeyRef:internal-token": "sample-internal-token-7f3a9c",
    "secretKeyRef:admin-tokens": "sample-admin-token-7f3a9c:admin",
    "secretKeyRef:api-keys": "sk-sample-key-7f3a9c",
    "secretKeyRef:redis-password": "sample-redis-password-7f3a9c",
    **{f"secretKeyRef:redis-password-{user}": f"sample-redis-{user}-7f3a9c" for user in USER_NAMES},
    "fieldRef:metadata.name": "shoal-worker-decode-5d8f7-abcde",
    "fieldRef:status.podIP": "10.0.0.12",
    "fieldRef:spec.nodeName": "gpu-node-3",
}


def render(helm: str, chart: str, values: str | None) -> list[dict[str, Any]]:
    argv = [helm, "template", "shoal", chart, "--namespace", "shoal"] + (["-f", values] if values else [])
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def env_value(item: dict[str, Any]) -> str:
    if "value" in item:
        return str(item["value"])
    source = item["valueFrom"]
    if "secretKeyRef" in source:
        return SAMPLES[f"secretKeyRef:{source['secretKeyRef']['key']}"]
    return SAMPLES[f"fieldRef:{source['fieldRef']['fieldPath']}"]


def check_containers(doc: dict[str, Any], problems: list[str]) -> None:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    for container in spec.get("containers", []):
        module = (container.get("args") or [""])[0]
        cls = SERVICE_SETTINGS.get(module)
        if cls is None:
            continue
        env = {item["name"]: env_value(item) for item in container.get("env", [])}
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        unknown = {name for name in env if name.startswith("SHOAL_")} - env_names(cls)
        if unknown:
            problems.append(f"{where}: {cls.__name__} reads none of {sorted(unknown)}")
        saved = dict(os.environ)
        os.environ.update(env)
        try:
            load_settings(cls)
        except SettingsError as exc:
            problems.append(f"{where}: {exc}")
        finally:
            os.environ.clear()
            os.environ.update(saved)


def check_bootstrap(docs: list[dict[str, Any]], problems: list[str]) -> None:
    bootstrap = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-bootstrap"))
    document = yaml.safe_load(bootstrap["data"]["bootstrap.yaml"])
    pools = []
    try:
        models = {ModelCreate(**item).name for item in document["models"]}
        pools = [PoolCreate(**item) for item in document["pools"]]
    except ValueError as exc:
        problems.append(f"bootstrap: the controller would refuse it: {exc}")
    else:
        for pool in pools:
            if pool.model not in models:
                problems.append(f"bootstrap: pool {pool.name} serves {pool.model!r}, which `models` does not hold")
        for alias, target in (document.get("aliases") or {}).items():
            if target not in models or alias in models:
                problems.append(f"bootstrap: alias {alias} -> {target!r}: not a model, or the alias is one")
    deployments = {
        d["metadata"]["name"] for d in docs if d["kind"] == "Deployment" and "-worker-" in d["metadata"]["name"]
    }
    prefix = next(
        e["value"]
        for d in docs
        if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-controller")
        for e in d["spec"]["template"]["spec"]["containers"][0]["env"]
        if e["name"] == "SHOAL_CONTROLLER_DEPLOYMENT_PREFIX"
    )
    if deployments != {prefix + p.name for p in pools}:
        problems.append(f"worker Deployments {sorted(deployments)} do not match the pools {[p.name for p in pools]}")
    role = next(d for d in docs if d["kind"] == "Role")
    scalable = next(set(r["resourceNames"]) for r in role["rules"] if "deployments/scale" in r["resources"])
    if scalable != deployments:
        problems.append(f"the actuator's Role scales {sorted(scalable)}, not the worker Deployments")


def main(helm: str, chart: str, values_files: list[str]) -> int:
    problems: list[str] = []
    for values in [None, *values_files]:
        label = values or "default values"
        docs = render(helm, chart, values)
        skipped = []
        for doc in docs:
            try:
                kubernetes_validate.validate(doc, KUBERNETES, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                skipped.append(doc["kind"])
            except kubernetes_validate.ValidationError as exc:
                problems.append(f"{label}: {doc['kind']}/{doc['metadata']['name']}: {exc.message}")
            check_containers(doc, problems)
        check_bootstrap(docs, problems)
        note = f" (no schema, skipped: {', '.join(skipped)})" if skipped else ""
        print(f"{label}: {len(docs)} manifests valid against Kubernetes {KUBERNETES}{note}")
    for problem in problems:
        print(f"  PROBLEM {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
