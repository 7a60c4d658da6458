"""The dashboards and alert rules as shipped: the JSON in the chart is what cli/dashboards.py generates, the
chart packs each into its ConfigMap or PrometheusRule unchanged, and the ServiceMonitor gives every scraped
service the job name the rules and dashboards query. (Their PromQL runs on a real Prometheus in
tests/monitoring.)"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml

from cli.dashboards import DASHBOARDS, DASHBOARDS_DIR, render
from cli.localstack import ALERT_RULES
from tests.unit.test_chart_security import ROOT
from tests.unit.test_chart_security import render as render_chart

pytestmark = pytest.mark.unit

FOLDER = ROOT / DASHBOARDS_DIR
JOBS = {"shoal-router", "shoal-controller", "shoal-kvstore", "shoal-worker"}


def test_the_committed_dashboards_are_the_generated_ones() -> None:
    assert sorted(p.name for p in FOLDER.glob("*.json")) == sorted(f"{d.uid}.json" for d in DASHBOARDS)
    for dashboard in DASHBOARDS:
        committed = json.loads((FOLDER / f"{dashboard.uid}.json").read_text())
        assert committed == render(dashboard), f"{dashboard.uid}: run `make dashboards`"
        ids = [panel["id"] for panel in committed["panels"]]
        assert len(ids) == len(set(ids))
        places = [(p["gridPos"]["x"], p["gridPos"]["y"]) for p in committed["panels"]]
        assert len(places) == len(set(places)), "two panels on the same spot"


def test_the_chart_ships_the_dashboards_and_rules_unchanged() -> None:
    docs = render_chart("monitoring.dashboards.enabled=true", "monitoring.prometheusRule.enabled=true")
    maps = [d for d in docs if d["kind"] == "ConfigMap" and "grafana_dashboard" in d["metadata"]["labels"]]
    assert len(maps) == len(DASHBOARDS)
    for config_map in maps:
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        [(name, text)] = config_map["data"].items()
        assert json.loads(text) == json.loads((FOLDER / name).read_text())
    [rule] = [d for d in docs if d["kind"] == "PrometheusRule"]
    # Untouched by Helm: the annotations' {{ $labels.pool }} reach Prometheus as written.
    assert rule["spec"] == yaml.safe_load(ALERT_RULES.read_text())
    off = render_chart()
    assert not [d for d in off if d["kind"] in {"PrometheusRule", "ServiceMonitor"} or "grafana_dashboard" in str(d)]


def relabel(rules: list[dict[str, Any]], meta: dict[str, str]) -> dict[str, str]:
    """Prometheus's `replace` relabelling: source values joined by ';', an anchored regex, $1 substituted."""
    labels = dict(meta)
    for rule in rules:
        value = ";".join(labels.get(source, "") for source in rule["sourceLabels"])
        match = re.fullmatch(rule["regex"], value)
        if match:
            labels[rule["targetLabel"]] = match.expand(rule["replacement"].replace("$", "\\"))
    return labels


def test_the_service_monitor_names_jobs_and_worker_labels_as_the_rules_expect() -> None:
    docs = render_chart("serviceMonitor.enabled=true")
    [monitor] = [d for d in docs if d["kind"] == "ServiceMonitor"]
    services = [d for d in docs if d["kind"] == "Service"]
    found = set()
    for endpoint in monitor["spec"]["endpoints"]:
        for service in services:
            component = service["metadata"]["labels"]["app.kubernetes.io/component"]
            if endpoint["port"] not in {port["name"] for port in service["spec"]["ports"]}:
                continue
            meta = {
                "job": service["metadata"]["name"],
                "__meta_kubernetes_service_label_app_kubernetes_io_component": component,
                "__meta_kubernetes_pod_name": "shoal-worker-decode-5d8f7-abcde",
            }
            labels = relabel(endpoint["relabelings"], meta)
            found.add(labels["job"])
            if component.startswith("worker-"):
                assert labels["pool"] == component.removeprefix("worker-")
                assert labels["worker"] == "shoal-worker-decode-5d8f7-abcde"  # the worker's id is its pod's name
    assert found == JOBS
    queried = set(re.findall(r'job="([a-z-]+)"', ALERT_RULES.read_text()))
    assert queried <= JOBS
