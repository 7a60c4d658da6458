"""The Grafana dashboards, written as JSON into the chart (`shoal dashboards`, `make dashboards`).

One definition per panel here; the JSON under deploy/helm/shoal/monitoring/dashboards is generated from it
and checked in (the chart ships it as ConfigMaps, docker-compose provisions it into Grafana, and a test
keeps the two in step). `pool` and `worker` are target labels the scrape attaches (the controller's
Prometheus service discovery, the chart's ServiceMonitor relabelling, compose's static targets).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer

DASHBOARDS_DIR = Path("deploy/helm/shoal/monitoring/dashboards")
RATE = "$__rate_interval"  # Grafana's window for rate(): at least four scrapes


@dataclass(frozen=True)
class Panel:
    title: str
    # (PromQL, legend) per series.
    queries: list[tuple[str, str]]
    unit: str = "short"
    description: str = ""
    kind: str = "timeseries"


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    panels: list[Panel] = field(default_factory=list)


def _quantiles(metric: str, by: str) -> list[tuple[str, str]]:
    """p50, p90 and p99 of a histogram, per `by`."""
    return [
        (
            f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket[{RATE}])))",
            f"p{round(q * 100)} {{{{{by}}}}}",
        )
        for q in (0.5, 0.9, 0.99)
    ]


def _share(metric: str, selector: str, by: str = "") -> str:
    """The share of a counter's rate that matches `selector` (per `by`, when given)."""
    grouping = f" by ({by}) " if by else ""
    return f"sum{grouping}(rate({metric}{{{selector}}}[{RATE}])) / sum{grouping}(rate({metric}[{RATE}]))"


def _rate(metric: str, by: str, selector: str = "") -> list[tuple[str, str]]:
    legend = " ".join(f"{{{{{label.strip()}}}}}" for label in by.split(","))
    return [(f"sum by ({by}) (rate({metric}{selector}[{RATE}]))", legend)]


ROUTER = Dashboard(
    "shoal-router",
    "Shoal / Router",
    "The OpenAI front: requests, latency as users see it, routing decisions, retries and P/D hand-offs.",
    [
        Panel("Requests per second by status", _rate("shoal_router_requests_total", "status"), "reqps"),
        Panel(
            "Server errors (5xx share of requests)",
            [
                (
                    f'(sum(rate(shoal_router_requests_total{{status=~"5.."}}[{RATE}])) or vector(0))'
                    f" / sum(rate(shoal_router_requests_total[{RATE}]))",
                    "5xx",
                )
            ],
            "percentunit",
        ),
        Panel("Time to first token", _quantiles("shoal_router_ttft_seconds", "model"), "s"),
        Panel("Time between tokens", _quantiles("shoal_router_tbt_seconds", "model"), "s"),
        Panel("End to end", _quantiles("shoal_router_e2e_seconds", "model"), "s"),
        Panel("Tokens per second", _rate("shoal_router_tokens_total", "model, kind")),
        Panel(
            "Routing decisions by reason",
            _rate("shoal_router_routing_decisions_total", "phase, reason"),
            "ops",
            "Why each request went where it went (prefix hit, least load, session, ...).",
        ),
        Panel(
            "Retries (before a token) and resumes (after)",
            _rate("shoal_router_retries_total", "kind"),
            "ops",
        ),
        Panel("Stalled workers found", _rate("shoal_router_worker_stalls_total", "job"), "ops"),
        Panel("P/D hand-offs by outcome", _rate("shoal_router_pd_total", "outcome"), "ops"),
        Panel("KV imports by source", _rate("shoal_router_kv_imports_total", "source"), "ops"),
        Panel("Requests in flight", [("sum(shoal_router_inflight_requests)", "in flight")]),
        Panel("Requests per API key", _rate("shoal_router_key_requests_total", "name"), "reqps"),
    ],
)

WORKERS = Dashboard(
    "shoal-workers",
    "Shoal / Workers",
    "Engines: queues, KV-cache usage, throughput and each pool's SLO attainment.",
    [
        Panel(
            "SLO attainment (share of first tokens and token gaps within target)",
            [(_share("shoal_worker_slo_events_total", 'result="met"', "pool, slo"), "{{pool}} {{slo}}")],
            "percentunit",
            "A pool meets its SLO when 90% of its events are within target (its p90 targets).",
        ),
        Panel("Running requests", [("sum by (pool) (shoal_worker_running_requests)", "{{pool}}")]),
        Panel("Queued requests", [("sum by (pool) (shoal_worker_waiting_requests)", "{{pool}}")]),
        Panel(
            "KV cache used",
            [("shoal_worker_kv_blocks_used / shoal_worker_kv_blocks_total", "{{worker}}")],
            "percentunit",
        ),
        Panel("Draining workers", [("sum by (pool) (shoal_worker_draining)", "{{pool}}")]),
        Panel("Decode tokens per second", [("sum by (pool) (shoal_worker_decode_tokens_per_second)", "{{pool}}")]),
        Panel("Tokens per second by kind", _rate("shoal_worker_tokens_total", "pool, kind")),
        Panel("Finished requests by reason", _rate("shoal_worker_requests_total", "pool, finish"), "reqps"),
        Panel("Engine step time", _quantiles("shoal_worker_step_seconds", "pool"), "s"),
        Panel("Time to first token at the worker", _quantiles("shoal_worker_ttft_seconds", "pool"), "s"),
        Panel("P/D KV imports by result", _rate("shoal_worker_kv_imports_total", "pool, result"), "ops"),
    ],
)

CONTROLLER = Dashboard(
    "shoal-controller",
    "Shoal / Controller",
    "Scaling: replicas desired and actual per pool, the decisions and their reasons, jobs.",
    [
        Panel("Desired replicas", [("sum by (pool) (shoal_controller_desired_replicas)", "{{pool}}")]),
        Panel("Ready replicas", [("sum by (pool) (shoal_controller_ready_replicas)", "{{pool}}")]),
        Panel("Starting replicas", [("sum by (pool) (shoal_controller_starting_replicas)", "{{pool}}")]),
        Panel(
            "Scaling decisions by reason",
            _rate("shoal_controller_decisions_total", "pool, reason"),
            "ops",
            "One decision per pool per reconcile pass; the admin API's /v1/scaling/decisions explains each change.",
        ),
        Panel("Jobs opened", _rate("shoal_controller_jobs_total", "kind"), "ops"),
        Panel("Open jobs by state", [("sum by (state) (shoal_controller_open_jobs)", "{{state}}")]),
        Panel("Oldest open job", [("max(shoal_controller_oldest_open_job_seconds)", "age")], "s"),
        Panel("Failed reconcile passes", _rate("shoal_controller_pool_errors_total", "pool"), "ops"),
    ],
)

KVSTORE = Dashboard(
    "shoal-kvstore",
    "Shoal / KV store",
    "The shared KV-cache store: hit rate, bytes moved and what each tier holds.",
    [
        Panel(
            "Hit rate",
            [(_share("shoal_kvstore_block_reads_total", 'result="hit"'), "hits")],
            "percentunit",
        ),
        Panel("Bytes per second", _rate("shoal_kvstore_transfer_bytes_total", "direction"), "Bps"),
        Panel("Bytes held per tier", [("sum by (tier) (shoal_kvstore_bytes)", "{{tier}}")], "bytes"),
        Panel("Blocks per tier", [("sum by (tier) (shoal_kvstore_blocks)", "{{tier}}")]),
        Panel("Evictions per tier", _rate("shoal_kvstore_evictions_total", "tier"), "ops"),
        Panel("Pinned blocks (sessions)", [("sum(shoal_kvstore_pinned_blocks)", "pinned")]),
    ],
)

EXPERTS = Dashboard(
    "shoal-experts",
    "Shoal / Experts",
    "Mixture-of-experts instances: balance per layer, live migration's bytes and pauses.",
    [
        Panel(
            "Balance per layer (max / mean tokens per rank; 1 is perfect)",
            [("max by (layer) (shoal_worker_expert_balance)", "layer {{layer}}")],
            kind="heatmap",
        ),
        Panel("Worst layer per instance", [("max by (worker) (shoal_worker_expert_balance)", "{{worker}}")]),
        Panel("Ranks per instance", [("max by (worker) (shoal_worker_expert_ranks)", "{{worker}}")]),
        Panel("Expert bytes moved", _rate("shoal_worker_expert_bytes_total", "action"), "Bps"),
        Panel("Pause while ranks switch maps", _quantiles("shoal_worker_expert_commit_stall_seconds", "worker"), "s"),
    ],
)

DASHBOARDS = [ROUTER, WORKERS, CONTROLLER, KVSTORE, EXPERTS]


def _panel(panel: Panel, index: int) -> dict[str, Any]:
    return {
        "id": index + 1,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12, "x": 12 * (index % 2), "y": 8 * (index // 2)},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
        "targets": [
            {"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(panel.queries)
        ],
    }


def render(dashboard: Dashboard) -> dict[str, Any]:
    """The dashboard as Grafana's JSON model (schema 39), with a Prometheus data-source variable."""
    return {
        "uid": dashboard.uid,
        "title": dashboard.title,
        "description": dashboard.description,
        "tags": ["shoal"],
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "timezone": "browser",
        "templating": {
            "list": [{"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus"}]
        },
        "panels": [_panel(panel, i) for i, panel in enumerate(dashboard.panels)],
    }


def write(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for dashboard in DASHBOARDS:
        path = out / f"{dashboard.uid}.json"
        path.write_text(json.dumps(render(dashboard), indent=2) + "\n")
        written.append(path)
    return written


def dashboards(out: Path = typer.Option(DASHBOARDS_DIR, help="Folder the JSON files go to.")) -> None:
    """Write the Grafana dashboards (one JSON file each)."""
    for path in write(out):
        typer.echo(path)
