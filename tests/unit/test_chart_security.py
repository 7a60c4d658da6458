"""The chart as rendered (`helm template`): NetworkPolicies allow exactly the documented flows, pods run
locked down, each account has only the rights its process uses, Redis asks for a password and each
service signs in as its own user."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.state import acl

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
HELM = ROOT / ".tools" / "helm"
COMPONENTS = ("router", "controller", "celery", "kvstore", "worker", "redis")

# Every flow between the release's pods (client, server, port): docs/security.md's table, and nothing else.
FLOWS = {
    ("router", "worker", 50051), ("router", "worker", 50052),  # serve channel, prefill and KV calls
    ("router", "kvstore", 50060), ("router", "kvstore", 50061),  # pins and hand-off lookups
    ("router", "redis", 6379),
    ("controller", "worker", 50051),  # expert statistics, drains
    ("controller", "router", 8000),  # agent graphs' LLM steps
    ("controller", "redis", 6379),
    ("celery", "worker", 50051),  # migrations, drains
    ("celery", "redis", 6379),
    ("worker", "worker", 50051),  # KV from a prefill worker, experts from a serving rank
    ("worker", "kvstore", 50060), ("worker", "kvstore", 50061),
    ("worker", "redis", 6379),
    ("kvstore", "redis", 6379),
}  # fmt: skip
# What comes in from outside the release: clients of the two APIs only (metrics scrapers when configured).
OPEN_INGRESS = {("router", 8000), ("controller", 8080)}


def render(*values: str) -> list[dict[str, Any]]:
    argv = [str(HELM), "template", "shoal", str(ROOT / "deploy/helm/shoal"), "--namespace", "shoal"]
    for value in values:
        argv += ["--set", value]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def component(selector: dict[str, Any]) -> str | None:
    """Which component a pod selector picks (None: every pod of the release)."""
    labels: dict[str, str] = selector.get("matchLabels", {})
    if any(e["key"] == "shoal.io/pool" for e in selector.get("matchExpressions", [])):
        return "worker"
    return labels.get("app.kubernetes.io/component")


def rules(docs: list[dict[str, Any]], direction: str) -> dict[str, list[tuple[str | None, int]]]:
    """Per component, its policies' (peer component or None for any/ipBlock, port) in one direction."""
    out: dict[str, list[tuple[str | None, int]]] = {c: [] for c in COMPONENTS}
    for doc in docs:
        if doc["kind"] != "NetworkPolicy":
            continue
        spec = doc["spec"]
        target = component(spec["podSelector"])
        assert set(spec["policyTypes"]) == {"Ingress", "Egress"}, doc["metadata"]["name"]
        if target is None:  # the default deny: no rules at all
            assert not spec.get("ingress") and not spec.get("egress")
            continue
        for rule in spec.get(direction, []):
            peers = rule.get("from" if direction == "ingress" else "to") or [{}]
            for peer in peers:
                who = component(peer["podSelector"]) if "podSelector" in peer else None
                for port in rule["ports"]:
                    out[target].append((who, int(port["port"])))
    return out


def flows(docs: list[dict[str, Any]]) -> set[tuple[str, str, int]]:
    """Pod-to-pod flows both ends allow (the client's egress and the server's ingress)."""
    ingress, egress = rules(docs, "ingress"), rules(docs, "egress")
    allowed = set()
    for client in COMPONENTS:
        for server in COMPONENTS:
            for peer, port in egress[client]:
                if peer not in (server, None):
                    continue
                if (client, port) in ingress[server] or (None, port) in ingress[server]:
                    allowed.add((client, server, port))
    return allowed


def test_network_policies_allow_the_documented_flows_and_nothing_else() -> None:
    docs = render()
    assert flows(docs) == FLOWS
    ingress = rules(docs, "ingress")
    open_ingress = {(c, port) for c in COMPONENTS for who, port in ingress[c] if who is None}
    assert open_ingress == OPEN_INGRESS
    # Egress beyond the release: DNS everywhere, the Kubernetes API for the controller (the actuator).
    egress = rules(docs, "egress")
    outside = {(c, port) for c in COMPONENTS for who, port in egress[c] if who is None}
    dns = {(c, 53) for c in COMPONENTS if c != "redis"}
    assert outside == dns | {("controller", 443), ("controller", 6443)}


def test_the_documented_flows_are_the_ones_in_docs_security() -> None:
    text = (ROOT / "docs/security.md").read_text()
    for client, server, port in FLOWS:
        assert f"| {client} | {server} | {port} |" in text, (client, server, port)


def test_metrics_scrapers_get_in_only_when_named() -> None:
    assert not any(port == 9090 for c in COMPONENTS for _, port in rules(render(), "ingress")[c])
    docs = render("networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.team=monitoring")
    scraped = {
        doc["metadata"]["name"]: rule["from"]
        for doc in docs
        if doc["kind"] == "NetworkPolicy"
        for rule in doc["spec"].get("ingress", [])
        if [p["port"] for p in rule["ports"]] == [9090]
    }
    assert scraped == {
        name: [{"namespaceSelector": {"matchLabels": {"team": "monitoring"}}}]
        for name in ("shoal-workers", "shoal-kvstore")
    }


def pods(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds = ("Deployment", "StatefulSet")
    return {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in docs if d["kind"] in kinds}


def test_every_pod_runs_read_only_without_privileges_under_seccomp() -> None:
    for name, spec in pods(render()).items():
        assert spec["securityContext"].get("seccompProfile", {}).get("type") == "RuntimeDefault" or name.endswith(
            "-redis"
        ), name
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["allowPrivilegeEscalation"] is False and context["capabilities"]["drop"] == ["ALL"], name
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{name} has nowhere to write temporary files"


def test_celery_has_its_own_account_with_no_rights_and_the_controller_only_its_actuators() -> None:
    docs = render()
    specs = pods(docs)
    controller, celery = specs["shoal-controller"], specs["shoal-celery"]
    assert controller["serviceAccountName"] != celery["serviceAccountName"]
    roles = {d["metadata"]["name"]: d["rules"] for d in docs if d["kind"] == "Role"}
    verbs = {
        (account, rule_resource): set(rule["verbs"])
        for account, role_rules in roles.items()
        for rule in role_rules
        for rule_resource in rule["resources"]
    }
    # Pods: watched, and a drained one marked for deletion; never created, deleted or exec'd into.
    assert verbs[controller["serviceAccountName"], "pods"] == {"get", "list", "watch", "patch"}
    scale = next(r for r in roles[controller["serviceAccountName"]] if r["resources"] == ["deployments/scale"])
    assert scale["resourceNames"] and all(n.startswith("shoal-worker-") for n in scale["resourceNames"])
    assert set(roles) == {controller["serviceAccountName"]}  # Celery's account is bound to no role
    accounts = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    assert celery["serviceAccountName"] in accounts and celery["automountServiceAccountToken"] is False
    for spec in specs.values():
        if spec is not controller:
            assert spec.get("automountServiceAccountToken") is False or "serviceAccountName" not in spec


def redis_user_of(pod: str) -> str:
    """The Redis user a pod of the release signs in as."""
    component = pod.removeprefix("shoal-")
    return "worker" if component.startswith("worker-") else {"celery": "controller"}.get(component, component)


def redis_password_keys(container: dict[str, Any]) -> dict[str, str]:
    """The container's variables read from the Secret's Redis password keys, and those keys."""
    return {
        e["name"]: e["valueFrom"]["secretKeyRef"]["key"]
        for e in container.get("env", [])
        if e.get("valueFrom", {}).get("secretKeyRef", {}).get("key", "").startswith("redis-password")
    }


def test_redis_has_a_user_per_service_and_each_pod_gets_only_its_own_password() -> None:
    docs = render()
    redis = pods(docs)["shoal-redis"]["containers"][0]
    assert 'requirepass "$REDIS_PASSWORD"' in redis["args"][0]
    # The rules are shared/state/acl.py's, their passwords from the Secret.
    for line in acl.users_template().splitlines():
        assert line in redis["args"][0]
    assert redis_password_keys(redis) == {
        "REDIS_PASSWORD": "redis-password",
        "REDISCLI_AUTH": "redis-password",
        **{acl.password_variable(user): f"redis-password-{user}" for user in acl.USER_NAMES},
    }
    secret = next(d for d in docs if d["kind"] == "Secret")
    for user in ("", *(f"-{name}" for name in acl.USER_NAMES)):
        assert len(secret["stringData"][f"redis-password{user}"]) >= 32
    for name, spec in pods(docs).items():
        if name == "shoal-redis":
            continue
        user = redis_user_of(name)
        for container in spec["containers"]:
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env["SHOAL_REDIS_USERNAME"] == user, name
            assert redis_password_keys(container) == {"SHOAL_REDIS_PASSWORD": f"redis-password-{user}"}, name


def test_without_service_users_every_client_signs_in_as_the_default_user() -> None:
    docs = render("redis.serviceUsers=false")
    assert "user " not in pods(docs)["shoal-redis"]["containers"][0]["args"][0]
    for name, spec in pods(docs).items():
        if name != "shoal-redis":
            assert redis_password_keys(spec["containers"][0]) == {"SHOAL_REDIS_PASSWORD": "redis-password"}, name
            assert "SHOAL_REDIS_USERNAME" not in {e["name"] for e in spec["containers"][0]["env"]}


def test_the_charts_redis_users_file_is_the_acl_table() -> None:
    written = (ROOT / "deploy/helm/shoal/files/redis-users.conf").read_text()
    regenerate = "shoal redis-users > deploy/helm/shoal/files/redis-users.conf"
    assert written == acl.users_template(), f"regenerate it: {regenerate}"
