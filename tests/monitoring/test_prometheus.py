"""Every PromQL expression the project ships (dashboards, recording and alert rules) runs on a real
Prometheus scraping a loaded stack and returns data; the rules pass promtool; every metric a dashboard
names is one the services export."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from cli.dashboards import DASHBOARDS_DIR
from cli.localstack import ALERT_RULES
from tests.monitoring.conftest import Monitored, Prometheus

pytestmark = [pytest.mark.monitoring, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
ALERTS_TEST = Path(__file__).with_name("alerts-test.yaml")
# Grafana's variables, as the dashboards' data source would expand them.
GRAFANA_VARIABLES = {"$__rate_interval": "30s"}
METRIC = re.compile(r"\b(shoal_[a-z0-9_]+|up)\b")
# An alert's condition: the expression, a comparison, a number (`and` joins the windows of a burn rate).
CONDITION = re.compile(r"^(?P<expr>.+?)\s*(?:>|<|==|>=|<=)\s*[0-9.]+$")


def dashboard_queries() -> list[tuple[str, str]]:
    queries = []
    for path in sorted((ROOT / DASHBOARDS_DIR).glob("*.json")):
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                expr = target["expr"]
                for variable, value in GRAFANA_VARIABLES.items():
                    expr = expr.replace(variable, value)
                queries.append((f"{dashboard['uid']}: {panel['title']}", expr))
    return queries


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERT_RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def alert_parts(expr: str) -> list[str]:
    """An alert's expressions without their thresholds: each must return data on a healthy stack, where
    the alert itself (rightly) returns nothing."""
    parts = []
    for condition in expr.split(" and "):
        match = CONDITION.match(condition.strip())
        assert match, f"alert condition {condition!r} is not `expression <op> number`"
        parts.append(match.group("expr"))
    return parts


def eventually(check: Callable[[], list[str]], timeout_s: float = 120.0) -> list[str]:
    """Poll until `check` returns no failures (scrapes and rate windows need a few seconds of load)."""
    deadline = time.monotonic() + timeout_s
    failures = check()
    while failures and time.monotonic() < deadline:
        time.sleep(3)
        failures = check()
    return failures


def test_the_rules_pass_promtool() -> None:
    checked = subprocess.run(
        ["promtool", "check", "rules", str(ALERT_RULES)], check=False, capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # Each alert fires on the series that explain it and stays quiet on healthy ones (alerts-test.yaml).
    tested = subprocess.run(
        ["promtool", "test", "rules", ALERTS_TEST.name],
        cwd=ALERTS_TEST.parent,
        check=False,
        capture_output=True,
        text=True,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    alerts = {rule["alert"] for rule in rules() if "alert" in rule}
    cases = ALERTS_TEST.read_text()
    assert {alert for alert in alerts if f"alertname: {alert}" not in cases} == set(), "an alert without a test case"


def test_every_dashboard_query_returns_data(prometheus: Prometheus) -> None:
    queries = dashboard_queries()
    assert len(queries) > 40

    def empty() -> list[str]:
        return [f"{where}: {expr}" for where, expr in queries if not prometheus.query(expr)]

    assert eventually(empty) == []


def test_every_rule_expression_returns_data_and_evaluates(prometheus: Prometheus) -> None:
    expressions = []
    for rule in rules():
        if "record" in rule:
            expressions.append((rule["record"], rule["expr"]))
        else:
            expressions += [(rule["alert"], part) for part in alert_parts(rule["expr"])]
    assert len(expressions) > len(rules())  # the burn-rate alerts have two windows each

    def failing() -> list[str]:
        return [f"{name}: {expr}" for name, expr in expressions if not prometheus.query(expr)]

    assert eventually(failing) == []
    # Prometheus loaded every rule and evaluates it without error; the recorded series exist.
    loaded = httpx.get(f"{prometheus.url}/api/v1/rules", timeout=30).json()["data"]["groups"]
    states = {rule["name"]: rule["health"] for group in loaded for rule in group["rules"]}
    assert set(states) == {rule.get("record") or rule["alert"] for rule in rules()}

    def unhealthy() -> list[str]:
        loaded = httpx.get(f"{prometheus.url}/api/v1/rules", timeout=30).json()["data"]["groups"]
        bad = [f"{r['name']}: {r['health']}" for g in loaded for r in g["rules"] if r["health"] != "ok"]
        missing = [f"{r['record']}: no series" for r in rules() if "record" in r and not prometheus.query(r["record"])]
        return bad + missing

    assert eventually(unhealthy) == []
    # On this healthy stack no alert fires (an alert firing here would be a rule that cries wolf).
    firing = prometheus.query('ALERTS{alertstate="firing"}')
    assert firing == []


def test_dashboards_name_only_metrics_the_services_export(monitored: Monitored, prometheus: Prometheus) -> None:
    endpoints = monitored.endpoints
    with monitored.admin() as admin:
        workers = [t["targets"][0] for t in admin.get("/v1/monitoring/targets").json()]
    assert workers
    exported = {"up"}
    for target in [
        endpoints.router,
        endpoints.controller,
        *(f"http://{a}" for a in [endpoints.kvstore_metrics, *workers]),
    ]:
        text = httpx.get(f"{target}/metrics", timeout=10).text
        exported |= {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and line[0] != "#"}
    named = {name for _, expr in dashboard_queries() for name in METRIC.findall(expr)}
    named |= {name for rule in rules() for name in METRIC.findall(rule["expr"])}
    assert named - exported == set()
    # Prometheus found both workers through the controller's service discovery, with their pool labels.
    up = prometheus.query('up{job="shoal-worker"}')
    assert {(series["metric"]["pool"], series["value"][1]) for series in up} == {("prefill", "1"), ("decode", "1")}  # type: ignore[index]
