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


def test_cert_manager_issues_the_same_identities_into_the_same_secrets() -> None:
    docs = render(
        "tls.source=certManager",
        "tls.certManager.issuerRef.name=shoal-ca",
        "tls.certManager.issuerRef.kind=ClusterIssuer",
    )
    certificates = {d["spec"]["secretName"]: d["spec"] for d in docs if d["kind"] == "Certificate"}
    assert set(certificates) == {f"shoal-tls-{role.value}" for role in Role}
    for name, spec in certificates.items():
        role = name.removeprefix("shoal-tls-")
        assert spec["dnsNames"] == [f"{role}.shoal.internal"]
        assert {"server auth", "client auth"} <= set(spec["usages"])
        assert spec["issuerRef"] == {"name": "shoal-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    assert not [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"].startswith("shoal-tls-")]
    assert {tls_secret(spec) for spec in pods(docs).values()} <= set(certificates)
    with pytest.raises(subprocess.CalledProcessError):
        render("tls.source=certManager")  # no issuer named


def test_provided_secrets_are_mounted_by_name() -> None:
    names = {role.value: f"mine-{role.value}" for role in Role}
    docs = render("tls.source=existing", *(f"tls.existingSecrets.{r}={n}" for r, n in names.items()))
    for component, spec in pods(docs).items():
        assert tls_secret(spec) == names[POD_ROLES.get(component, "worker")]
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
