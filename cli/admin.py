"""`shoal status | pools | workers | scale | drain | remove | jobs | decisions`: the admin API from a terminal.

Every command is one or two calls to the controller's REST API (so the CLI
can do nothing the API does not allow) and prints a rich table. The URL and
token come from --url / --token or SHOAL_CONTROLLER_URL / SHOAL_ADMIN_TOKEN.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console()

Url = typer.Option("http://127.0.0.1:8080", envvar="SHOAL_CONTROLLER_URL", help="The controller's admin API.")
Token = typer.Option("", envvar="SHOAL_ADMIN_TOKEN", help="A bearer token of the admin API.")


class Admin:
    def __init__(self, url: str, token: str) -> None:
        self.http = httpx.Client(base_url=url, headers={"authorization": f"Bearer {token}"}, timeout=30)

    def call(self, method: str, path: str, **kw: Any) -> Any:
        try:
            response = self.http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            console.print(f"[red]cannot reach the controller at {self.http.base_url}: {exc}[/]")
            raise typer.Exit(2) from None
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text
            console.print(f"[red]{response.status_code}: {message}[/]")
            raise typer.Exit(1)
        return response.json() if response.content else None


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*("" if cell is None else str(cell) for cell in row))
    console.print(table)


def _when(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%H:%M:%S")


def status(url: str = Url, token: str = Token) -> None:
    """Pools (ready / desired / why) and the cluster's totals."""
    admin = Admin(url, token)
    cluster = admin.call("GET", "/v1/cluster")
    scaling = {p["pool"]: p for p in admin.call("GET", "/v1/scaling")["pools"]}
    rows = []
    for name, pool in cluster["pools"].items():
        last = scaling.get(name, {})
        rows.append([name, pool["role"], pool["workers"], pool["desired"], last.get("reason"), last.get("explanation")])
    print_table("pools", ["pool", "role", "workers", "desired", "reason", "explanation"], rows)
    paused = " (scaling paused)" if cluster["paused"] else ""
    console.print(f"{cluster['workers']} worker(s), {cluster['jobs_running']} job(s) running{paused}")


def pools(url: str = Url, token: str = Token) -> None:
    """The desired pools."""
    rows = [
        [
            p["name"],
            p["model"],
            p["role"],
            p["engine"],
            p["gpu_type"],
            p["min_replicas"],
            p["max_replicas"],
            p.get("replicas_override"),
        ]
        for p in Admin(url, token).call("GET", "/v1/pools")
    ]
    print_table("pools", ["name", "model", "role", "engine", "gpu", "min", "max", "override"], rows)


def workers(url: str = Url, token: str = Token, pool: str | None = None) -> None:
    """Registered workers and their load."""
    params = {"pool": pool} if pool else {}
    rows = []
    for w in Admin(url, token).call("GET", "/v1/workers", params=params):
        state = "draining" if w["draining"] else ("cordoned" if w["cordoned"] else "serving")
        rows.append(
            [
                w["worker_id"],
                w["pool"],
                w["role"],
                state,
                w["running_requests"],
                w["waiting_requests"],
                f"{w['kv_usage']:.0%}",
                f"{w['decode_tokens_per_s']:.0f}",
            ]
        )
    print_table("workers", ["id", "pool", "role", "state", "running", "waiting", "kv", "tok/s"], rows)


def scale(
    pool: str = typer.Argument(..., help="Pool name."),
    replicas: str = typer.Argument(..., help="A number of replicas, or `auto` to hand the pool back to its policy."),
    url: str = Url,
    token: str = Token,
) -> None:
    """Pin a pool's replicas (manual override), or release the pin."""
    if replicas != "auto" and not replicas.isdigit():
        console.print("[red]replicas must be a whole number or `auto`[/]")
        raise typer.Exit(2)
    body = {"replicas": None if replicas == "auto" else int(replicas)}
    Admin(url, token).call("POST", f"/v1/pools/{pool}/scale", json=body)
    console.print(f"{pool}: {'policy' if replicas == 'auto' else replicas + ' replica(s), pinned'}")


def drain(worker_id: str = typer.Argument(..., help="Worker id."), url: str = Url, token: str = Token) -> None:
    """Stop sending requests to a worker; what it runs finishes. It stays up."""
    result = Admin(url, token).call("POST", f"/v1/workers/{worker_id}/drain")
    console.print(f"{worker_id}: draining, {result['running_requests']} request(s) still running")


def remove(
    worker_id: str = typer.Argument(..., help="Worker id."),
    url: str = Url,
    token: str = Token,
    wait: bool = typer.Option(True, help="Follow the job until it ends."),
) -> None:
    """Drain a worker, then stop it (a scale-down job)."""
    admin = Admin(url, token)
    job = admin.call("DELETE", f"/v1/workers/{worker_id}")
    console.print(f"job {job['id']} opened")
    if wait:
        _follow(admin, job["id"])


def jobs(
    url: str = Url,
    token: str = Token,
    follow: str | None = typer.Option(None, help="A job id: show its progress live until it ends."),
    limit: int = 20,
) -> None:
    """Recent jobs, or one job's live progress."""
    admin = Admin(url, token)
    if follow:
        _follow(admin, follow)
        return
    rows = [
        [j["id"], j["kind"], j["state"], j["phase"], f"{j['progress']:.0%}", j["attempts"], j["message"]]
        for j in admin.call("GET", "/v1/jobs", params={"limit": limit})
    ]
    print_table("jobs", ["id", "kind", "state", "phase", "progress", "attempts", "message"], rows)


def _follow(admin: Admin, job_id: str, poll_s: float = 0.5) -> None:
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn()
    ) as progress:
        bar = progress.add_task(job_id, total=1.0)
        while True:
            job = admin.call("GET", f"/v1/jobs/{job_id}")
            progress.update(bar, completed=job["progress"], description=f"{job_id} [{job['phase']}] {job['message']}")
            if job["state"] not in ("pending", "running"):
                break
            time.sleep(poll_s)
    console.print(f"job {job_id}: {job['state']}: {job['message']}")
    if job["state"] != "succeeded":
        raise typer.Exit(1)


def experts(
    worker_id: str = typer.Argument(..., help="Worker id (the instance's rank 0)."),
    url: str = Url,
    token: str = Token,
    heatmap: Path | None = typer.Option(None, help="Also write a PNG heatmap of tokens per rank per layer here."),
    history: int = typer.Option(0, help="Instead: the last N balance samples (the controller's history)."),
) -> None:
    """An expert-parallel instance's map: tokens per rank per layer, and balance (max / mean)."""
    if history:
        samples = Admin(url, token).call("GET", f"/v1/workers/{worker_id}/experts/history", params={"limit": history})
        rows = [
            [_when(s["t"]), f"{s['balance_mean']:.3f}", f"{s['balance_max']:.3f}", int(s["version"])] for s in samples
        ]
        print_table(f"{worker_id}: balance over time", ["time", "mean", "worst layer", "map version"], rows)
        return
    view = Admin(url, token).call("GET", f"/v1/workers/{worker_id}/experts")
    if not view["expert_parallel"]:
        console.print(f"{worker_id} holds every expert itself (no expert parallelism)")
        return
    ranks = [f"rank {r}" for r in range(view["num_ranks"])]
    rows = [
        [layer, f"{view['balance'][layer]:.3f}", *(f"{t:.0f}" for t in tokens)]
        for layer, tokens in enumerate(view["rank_tokens"])
    ]
    print_table(f"{worker_id}: expert map v{view['version']}", ["layer", "balance", *ranks], rows)
    if heatmap is not None:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt

        figure, axes = plt.subplots(figsize=(1.2 + 0.6 * len(ranks), 1.0 + 0.3 * len(rows)))
        image = axes.imshow(view["rank_tokens"], aspect="auto", cmap="viridis")
        axes.set_xlabel("rank")
        axes.set_ylabel("layer")
        axes.set_title(f"{worker_id}: routed tokens, map v{view['version']}")
        figure.colorbar(image, ax=axes)
        figure.savefig(heatmap, dpi=120, bbox_inches="tight")
        plt.close(figure)
        console.print(f"heatmap written to {heatmap}")


def rebalance(
    worker_id: str = typer.Argument(..., help="Worker id (the instance's rank 0)."),
    url: str = Url,
    token: str = Token,
    dry_run: bool = typer.Option(False, help="Plan only; move nothing."),
    policy: str = typer.Option("migration-aware", help="migration-aware or eplb."),
    source: str = typer.Option("checkpoint", help="Where moved copies come from: checkpoint or peer (a rank)."),
) -> None:
    """Plan a new expert placement from recent loads and migrate to it live, with a progress bar."""
    admin = Admin(url, token)
    body = {"dry_run": dry_run, "policy": policy, "source": source}
    answer = admin.call("POST", f"/v1/workers/{worker_id}/experts/rebalance", json=body)
    plan = answer["plan"]
    console.print(
        f"plan: balance {plan['balance_before']:.3f} -> {plan['balance_after']:.3f}, "
        f"{plan['moves']} expert copies to move (map v{plan['version']})"
    )
    if answer["job"] is not None:
        _follow(admin, answer["job"]["id"])


def resize(
    worker_id: str = typer.Argument(..., help="Worker id (the instance's rank 0)."),
    ranks: int = typer.Argument(..., help="The new rank count: one more or one fewer than now."),
    url: str = Url,
    token: str = Token,
    master: str = typer.Option(
        None, help="Growing: host:port where a joining rank waits (leave out when the local launcher starts it)."
    ),
    source: str = typer.Option("peer", help="Where moved copies come from: peer (a rank) or checkpoint."),
) -> None:
    """Add or remove a rank of a running expert-parallel instance, live, with a progress bar."""
    admin = Admin(url, token)
    body = {"ranks": ranks, "source": source, **({"master": master} if master else {})}
    job = admin.call("POST", f"/v1/workers/{worker_id}/experts/resize", json=body)
    _follow(admin, job["id"])


def decisions(url: str = Url, token: str = Token, limit: int = 20) -> None:
    """The scaling decisions log: what changed, and why."""
    rows = [
        [_when(d["at"]), d["pool"], d["ready"], d["desired"], d["reason"], d["explanation"]]
        for d in Admin(url, token).call("GET", "/v1/scaling/decisions", params={"limit": limit})
    ]
    print_table("scaling decisions", ["at", "pool", "ready", "desired", "reason", "explanation"], rows)


COMMANDS: list[Callable[..., None]] = [
    status,
    pools,
    workers,
    scale,
    drain,
    remove,
    jobs,
    decisions,
    experts,
    rebalance,
    resize,
]
