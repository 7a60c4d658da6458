"""The chart's internal TLS as rendered: each service mounts its own certificate, naming it, from one CA;
cert-manager and provided Secrets fill the same place; plaintext only when asked; the identity rules
match the NetworkPolicies' flows."""

from __future__ import annotations

import base64
import subprocess
from typing import Any

import pytest
from cryptography import x509

from shared.rpc.security import CALLERS, Role, certificate_roles
from tests.unit.test_chart_security import FLOWS, render

pytestmark = pytest.mark.unit

# Which certificate each pod presents (the Celery worker acts for the controller).
POD_ROLES = {"router": "router", "controller": "controller", "celery": "controller", "kvstore": "kvstore"}
GRPC_PORTS = {"worker": 50051, "kvstore": 50060}
# The names the chart's Redis certificate carries: what redis clients check against the URL's host.
REDIS_NAMES = ["shoal-redis", "shoal-redis.shoal.svc", "shoal-redis.shoal.svc.cluster.local"]


def pods(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Pod specs of the Shoal services by component (one worker pool stands for all)."""
    out = {}
    for doc in docs:
        if doc["kind"] in {"Deployment", "StatefulSet"}:
            component = doc["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component")
            if component in {*POD_ROLES, "worker"}:
                out[component] = doc["spec"]["template"]["spec"]
    return out


def env(spec: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}


def tls_secret(spec: dict[str, Any]) -> str | None:
    volume = next((v for v in spec["volumes"] if v["name"] == "tls"), None)
    return None if volume is None else str(volume["secret"]["secretName"])


def test_each_service_mounts_its_own_certificate_from_one_authority() -> None:
    docs = render()
    secrets = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "Secret"}
    authorities = set()
    for component, spec in pods(docs).items():
        role = POD_ROLES.get(component, "worker")
        assert env(spec)["SHOAL_TLS_DIR"] == "/etc/shoal-tls"
        assert "SHOAL_RPC_PLAINTEXT" not in env(spec)
        mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "tls")
        assert mount == {"name": "tls", "mountPath": "/etc/shoal-tls", "readOnly": True}
        data = secrets[tls_secret(spec) or ""]
        cert = x509.load_pem_x509_certificate(base64.b64decode(data["tls.crt"]))
        ca = x509.load_pem_x509_certificate(base64.b64decode(data["ca.crt"]))
        cert.verify_directly_issued_by(ca)
        assert certificate_roles(base64.b64decode(data["tls.crt"])) == {Role(role)}, component
        authorities.add(data["ca.crt"])
    assert len(authorities) == 1


def test_probes_use_the_plaintext_health_port_and_nothing_else_does() -> None:
    for component, spec in pods(render()).items():
        if component not in {"worker", "kvstore"}:
            continue
        container = spec["containers"][0]
        assert env(spec)["SHOAL_HEALTH_PORT"] == "50070"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == 50070, (component, probe)


def test_plaintext_is_an_explicit_setting() -> None:
    docs = render("tls.enabled=false")
    assert not [d for d in docs if d["metadata"]["name"].startswith("shoal-tls-")]
    for spec in pods(docs).values():
        assert env(spec)["SHOAL_RPC_PLAINTEXT"] == "true"
        assert "SHOAL_TLS_DIR" not in env(spec) and tls_secret(spec) is None
        assert env(spec)["SHOAL_REDIS_URL"] == "redis://shoal-redis:6379/0"
    redis = next(d for d in docs if d["metadata"]["name"] == "shoal-redis" and d["kind"] == "StatefulSet")
    assert "--tls-port" not in redis["spec"]["template"]["spec"]["containers"][0]["args"][0]


def test_the_charts_redis_speaks_tls_with_a_certificate_naming_its_service() -> None:
    docs = render()
    secrets = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "Secret"}
    redis = next(d for d in docs if d["metadata"]["name"] == "shoal-redis" and d["kind"] == "StatefulSet")
    spec = redis["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert "--port 0 --tls-port 6379" in container["args"][0]  # no plaintext port at all
    assert {"name": "tls", "mountPath": "/etc/redis-tls", "readOnly": True} in container["volumeMounts"]
    assert "--tls" in container["readinessProbe"]["exec"]["command"]
    data = secrets[tls_secret(spec) or ""]
    cert = x509.load_pem_x509_certificate(base64.b64decode(data["tls.crt"]))
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == REDIS_NAMES
    assert certificate_roles(base64.b64decode(data["tls.crt"])) == set()  # no service identity
    for component, pod in pods(docs).items():
        trusted = secrets[tls_secret(pod) or ""]["ca.crt"]
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(base64.b64decode(trusted)))
        url = env(pod)["SHOAL_REDIS_URL"]
        assert url == "rediss://shoal-redis:6379/0?ssl_cert_reqs=required&ssl_ca_certs=/etc/shoal-tls/ca.crt", component


def test_cert_manager_issues_the_same_identities_into_the_same_secrets() -> None:
    docs = render(
        "tls.source=certManager",
        "tls.certManager.issuerRef.name=shoal-ca",
        "tls.certManager.issuerRef.kind=ClusterIssuer",
    )
    certificates = {d["spec"]["secretName"]: d["spec"] for d in docs if d["kind"] == "Certificate"}
    assert set(certificates) == {f"shoal-tls-{name}" for name in (*Role, "redis")}
    for name, spec in certificates.items():
        role = name.removeprefix("shoal-tls-")
        assert spec["dnsNames"] == (REDIS_NAMES if role == "redis" else [f"{role}.shoal.internal"])
        assert {"server auth", "client auth"} <= set(spec["usages"])
        assert spec["issuerRef"] == {"name": "shoal-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    assert not [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"].startswith("shoal-tls-")]
    assert {tls_secret(spec) for spec in pods(docs).values()} <= set(certificates)
    with pytest.raises(subprocess.CalledProcessError):
        render("tls.source=certManager")  # no issuer named


def test_provided_secrets_are_mounted_by_name() -> None:
    names = {name: f"mine-{name}" for name in (*Role, "redis")}
    docs = render("tls.source=existing", *(f"tls.existingSecrets.{r}={n}" for r, n in names.items()))
    for component, spec in pods(docs).items():
        assert tls_secret(spec) == names[POD_ROLES.get(component, "worker")]
    redis = next(d for d in docs if d["metadata"]["name"] == "shoal-redis" and d["kind"] == "StatefulSet")
    assert tls_secret(redis["spec"]["template"]["spec"]) == names["redis"]
    with pytest.raises(subprocess.CalledProcessError):
        render("tls.source=existing")


def test_who_may_call_whom_is_what_the_network_policies_allow() -> None:
    """The certificate rules (shared/rpc/security.py) and the NetworkPolicies draw the same gRPC flows."""
    by_certificate = {
        (client, server.value)
        for server, callers in CALLERS.items()
        for client in POD_ROLES | {"worker": "worker"}
        if Role((POD_ROLES | {"worker": "worker"})[client]) in callers
    }
    by_network = {(client, server) for client, server, port in FLOWS if port == GRPC_PORTS.get(server)}
    assert by_certificate == by_network
