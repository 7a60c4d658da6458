"""`shoal graph submit | status | list | cancel` and `shoal catalogue`: agent graphs from a terminal."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import typer
import yaml

from cli.admin import Admin, Token, Url, console, print_table

graph_app = typer.Typer(help="Agent task graphs: submit, watch, cancel.", no_args_is_help=True)

FINAL = ("succeeded", "failed", "cancelled")


def _show(record: dict[str, Any]) -> None:
    started = record["created_at"]
    rows = []
    for step_id, step in record["steps"].items():
        took = f"{step['finished_at'] - step['started_at']:.2f}s" if step["finished_at"] and step["started_at"] else ""
        began = f"+{step['started_at'] - started:.2f}s" if step["started_at"] else ""
        rows.append([step_id, step["kind"], step["state"], step["pool"], f"{step['estimated_s']:.2f}s", began, took,
                     step["attempts"], (step["error"] or "")[:60]])  # fmt: skip
    title = f"{record['id']} ({record['name']}): {record['state']}, plan {record['plan_solver']} " + (
        f"{record['plan_latency_s']:.1f}s / ${record['plan_cost']:.5f}, {record['replans']} re-plan(s)"
    )
    print_table(title, ["step", "kind", "state", "pool", "estimate", "started", "took", "attempts", "error"], rows)
    if record["state"] == "succeeded":
        console.print(f"result: {record['result']}")
    elif record["error"]:
        console.print(f"[red]{record['error']}[/]")


@graph_app.command()
def submit(
    spec: Path = typer.Argument(..., help="Graph spec, JSON or YAML."),
    input: list[str] = typer.Option([], "--input", help="name=value for {{inputs.name}} (repeatable)."),
    follow: bool = typer.Option(True, help="Show progress until the graph ends."),
    url: str = Url,
    token: str = Token,
) -> None:
    """Submit a graph; refused graphs print where each problem is."""
    try:
        document = yaml.safe_load(spec.read_text())
    except (OSError, yaml.YAMLError) as exc:
        console.print(f"[red]cannot read {spec}: {exc}[/]")
        raise typer.Exit(2) from None
    for item in input:
        name, sep, value = item.partition("=")
        if not sep:
            console.print(f"[red]--input {item!r}: expected name=value[/]")
            raise typer.Exit(2)
        document.setdefault("inputs", {})[name] = value
    admin = Admin(url, token)
    record = admin.call("POST", "/v1/graphs", json=document)
    console.print(f"submitted {record['id']} (session {record['session_id']})")
    if follow:
        _watch(admin, record["id"])


def _watch(admin: Admin, graph_id: str, poll_s: float = 0.5) -> None:
    while True:
        record = admin.call("GET", f"/v1/graphs/{graph_id}")
        if record["state"] in FINAL:
            break
        time.sleep(poll_s)
    _show(record)
    if record["state"] != "succeeded":
        raise typer.Exit(1)


@graph_app.command()
def status(graph_id: str, url: str = Url, token: str = Token, as_json: bool = typer.Option(False, "--json")) -> None:
    """One graph: per-step state, pool, timings, result."""
    record = Admin(url, token).call("GET", f"/v1/graphs/{graph_id}")
    if as_json:
        console.print_json(json.dumps(record))
    else:
        _show(record)


@graph_app.command()
def result(graph_id: str, url: str = Url, token: str = Token) -> None:
    """A finished graph's result (exits 1 while it runs or when it did not succeed)."""
    console.print(Admin(url, token).call("GET", f"/v1/graphs/{graph_id}/result")["result"])


@graph_app.command("list")
def list_graphs(url: str = Url, token: str = Token, limit: int = 20) -> None:
    """Recent graphs."""
    rows = [
        [g["id"], g["name"], g["state"], len(g["steps"]), f"{g['plan_cost']:.5f}", g["error"] or ""]
        for g in Admin(url, token).call("GET", "/v1/graphs", params={"limit": limit})
    ]
    print_table("graphs", ["id", "name", "state", "steps", "planned cost", "error"], rows)


@graph_app.command()
def cancel(graph_id: str, url: str = Url, token: str = Token) -> None:
    """Cancel a running graph: its running steps stop."""
    record = Admin(url, token).call("POST", f"/v1/graphs/{graph_id}/cancel")
    console.print(f"{record['id']}: cancel requested")


def catalogue(url: str = Url, token: str = Token) -> None:
    """The hardware catalogue agent placement uses: pools, GPU types, prices, speeds, queueing now."""
    rows = [
        [h["pool"], h["model"], h["gpu_type"], f"{h['cost_per_hour']:g}", f"{h['prefill_tps']:.0f}",
         f"{h['decode_tps']:.0f}", f"{h['stream_tps']:.1f}", f"{h['wait_s']:.2f}s",
         "measured" if h["measured"] else "declared"]
        for h in Admin(url, token).call("GET", "/v1/catalogue")
    ]  # fmt: skip
    print_table(
        "catalogue",
        ["pool", "model", "gpu", "$/h", "prefill tok/s", "decode tok/s", "stream tok/s", "wait", "source"],
        rows,
    )
