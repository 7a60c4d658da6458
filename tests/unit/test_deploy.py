"""docker-compose.yml checked against the services it runs, so it cannot drift.

No Docker engine runs here: the file is parsed and every service's command,
environment, ports, health checks and dependencies are checked against the
settings classes the services really read (values included).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from cli.localstack import StackConfig
from shared.config import SERVICE_SETTINGS, env_names, load_settings
from shared.state import acl

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
SHOAL = {name: spec for name, spec in SERVICES.items() if spec.get("command", [""])[0] in SERVICE_SETTINGS}


def defaults(value: str) -> str:
    """`value` with every ${VAR:-default} and ${VAR-default} resolved to its default, and every required
    ${VAR:?message} (a secret from .env) to a value like those `make compose-env` writes."""
    value = re.sub(r"\$\{[A-Z_]+:\?[^}]*\}", "0123456789abcdef0123456789abcdef", value)
    return re.sub(r"\$\{[A-Z_]+:?-([^}]*)\}", r"\1", value)


def environment(spec: dict[str, Any]) -> dict[str, str]:
    """The service's environment with its variables resolved to their defaults."""
    return {k: defaults(str(v)) for k, v in spec.get("environment", {}).items()}


def test_every_shoal_service_runs_a_real_module() -> None:
    assert set(SHOAL) >= {"router", "controller", "celery", "kvstore", "worker-prefill", "worker-decode"}
    for spec in SHOAL.values():
        assert importlib.util.find_spec(spec["command"][0]) is not None


@pytest.mark.parametrize("name", sorted(SHOAL))
def test_environment_names_and_values_are_what_the_service_reads(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cls = SERVICE_SETTINGS[SHOAL[name]["command"][0]]
    env = environment(SHOAL[name])
    unknown = {key for key in env if key.startswith("SHOAL_")} - env_names(cls)
    assert not unknown, f"{name} sets variables {cls.__name__} does not read: {unknown}"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    load_settings(cls)  # raises with the variable and the fix when a value is invalid


def test_the_router_serves_the_model_of_every_worker_from_the_same_folder() -> None:
    served = dict(item.split("=", 1) for item in environment(SERVICES["router"])["SHOAL_ROUTER_MODELS"].split(","))
    workers = [environment(spec) for spec in SHOAL.values() if spec["command"][0] == "services.worker"]
    # A worker's model defaults to the image's tiny model (its settings default and the image's ENV).
    kept = {(w.get("SHOAL_WORKER_MODEL_NAME", "shoal-tiny-moe"), w.get("SHOAL_WORKER_MODEL_PATH")) for w in workers}
    assert kept == set(served.items())


def test_ports_match_make_run_and_the_health_checks() -> None:
    stack = StackConfig()
    router, controller = environment(SERVICES["router"]), environment(SERVICES["controller"])
    published = {name: [defaults(p) for p in SERVICES[name]["ports"]] for name in ("router", "controller")}
    assert published["router"] == [f"{stack.router_port}:{router['SHOAL_ROUTER_HTTP_PORT']}"]
    assert published["controller"] == [f"{stack.controller_port}:{controller['SHOAL_CONTROLLER_HTTP_PORT']}"]
    for name, spec in SHOAL.items():
        env = environment(spec)
        probe = spec.get("healthcheck", {}).get("test", [])
        ports = [v for k, v in env.items() if k.endswith(("_GRPC_PORT", "_HTTP_PORT"))]
        if probe:
            assert any(f":{port}" in probe[3] for port in ports), f"{name}'s health check probes another port"


def test_addresses_point_at_services_that_listen_there() -> None:
    host, port = environment(SERVICES["router"])["SHOAL_ROUTER_KVSTORE_ADDRESS"].split(":")
    assert environment(SERVICES[host])["SHOAL_KVSTORE_GRPC_PORT"] == port
    for name, spec in SHOAL.items():
        env = environment(spec)
        advertised = [v for k, v in env.items() if k.endswith("_ADVERTISE_HOST")]
        assert advertised in ([], [name]), f"{name} advertises {advertised}, not its own service name"
        assert env["SHOAL_REDIS_URL"].startswith("redis://redis:")


def test_no_secret_has_a_default_so_compose_refuses_to_start_without_them() -> None:
    secrets = ("PASSWORD", "TOKEN", "API_KEY")
    for name, spec in SERVICES.items():
        for key, value in spec.get("environment", {}).items():
            if any(word in key for word in secrets) and key != "SHOAL_OTLP_ENDPOINT":
                assert re.fullmatch(r"\$\{SHOAL_[A-Z_]+(:\?[^}]*)?\}(:admin)?", str(value)), (name, key, value)


def test_dependencies_exist_and_wait_for_health() -> None:
    for name, spec in SERVICES.items():
        for dependency, condition in spec.get("depends_on", {}).items():
            assert dependency in SERVICES, f"{name} depends on unknown {dependency}"
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in SERVICES[dependency], f"{dependency} has no health check to wait on"


def test_the_charts_values_schema_is_generated_from_the_current_settings() -> None:
    generated = subprocess.run(
        [sys.executable, str(ROOT / "deploy/helm/schema.py")], check=True, capture_output=True, text=True
    ).stdout
    committed = (ROOT / "deploy/helm/shoal/values.schema.json").read_text()
    assert json.loads(generated) == json.loads(committed), "stale values.schema.json: run `make helm-schema`"


def test_prometheus_scrapes_every_service_under_the_names_the_rules_use() -> None:
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    jobs = {job["job_name"]: job["static_configs"] for job in config["scrape_configs"]}
    assert set(jobs) == {"shoal-router", "shoal-controller", "shoal-kvstore", "shoal-worker"}
    metrics = {
        name: environment(spec).get(f"SHOAL_{spec['command'][0].split('.')[1].upper()}_METRICS_PORT")
        for name, spec in SHOAL.items()
    }
    assert jobs["shoal-kvstore"] == [{"targets": [f"kvstore:{metrics['kvstore']}"]}]
    assert jobs["shoal-router"] == [{"targets": [f"router:{environment(SHOAL['router'])['SHOAL_ROUTER_HTTP_PORT']}"]}]
    controller_port = environment(SHOAL["controller"])["SHOAL_CONTROLLER_HTTP_PORT"]
    assert jobs["shoal-controller"] == [{"targets": [f"controller:{controller_port}"]}]
    workers = {name: environment(spec) for name, spec in SHOAL.items() if spec["command"][0] == "services.worker"}
    assert jobs["shoal-worker"] == [
        {
            "targets": [f"{name}:{env['SHOAL_WORKER_METRICS_PORT']}"],
            "labels": {"pool": env["SHOAL_WORKER_POOL"], "worker": env["SHOAL_WORKER_WORKER_ID"]},
        }
        for name, env in workers.items()
    ]
    prometheus, grafana = SERVICES["prometheus"], SERVICES["grafana"]
    assert prometheus["profiles"] == grafana["profiles"] == ["monitoring"]  # not started by a plain `up`
    mounted = {volume.split(":")[0] for spec in (prometheus, grafana) for volume in spec["volumes"]}
    assert mounted == {
        "./deploy/prometheus/prometheus.yml",
        "./deploy/helm/shoal/monitoring/alerts.yaml",
        "./deploy/grafana/provisioning",
        "./deploy/helm/shoal/monitoring/dashboards",
    }
    assert all((ROOT / path).exists() for path in mounted)


def test_make_compose_env_writes_every_secret_compose_asks_for_and_keeps_old_ones(tmp_path: Path) -> None:
    """The compose-env recipe run for real (in a scratch folder): a password per Redis user of
    shared/state/acl.py, every secret docker-compose.yml requires (which lists the users itself), and a
    second run changes nothing."""
    recipe = re.search(r"^compose-env:.*\n\t@(.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert recipe is not None
    runs = []
    for _ in range(2):
        # As make runs it, with the repository importable (the names come from shared/state/acl.py).
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        subprocess.run(["sh", "-c", recipe.group(1)], cwd=tmp_path, check=True, env=env)
        runs.append(dict(line.split("=", 1) for line in (tmp_path / ".env").read_text().splitlines()))
    written = runs[0]
    assert runs[1] == written  # an existing .env keeps its values
    required = set(re.findall(r"\$\{([A-Z_]+):\?", (ROOT / "docker-compose.yml").read_text()))
    assert required <= set(written)
    users = {acl.password_variable(user) for user in acl.USER_NAMES}
    assert users <= set(written)
    redis = {k for k in SERVICES["redis"]["environment"] if k.startswith("SHOAL_REDIS_PASSWORD_")}
    assert redis == users
