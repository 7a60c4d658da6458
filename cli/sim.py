"""`shoal sim`: replay a trace (or a synthetic workload) through the simulated cluster."""

from __future__ import annotations

import functools
import itertools
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import typer
from pydantic import ValidationError

from shared.policies.routing import PRESETS
from shared.policies.scaling import SCALING_POLICIES
from simulator.cluster import simulate
from simulator.config import load_config
from simulator.report import cap_warnings, measure, plot, table
from simulator.workload import FORMATS, SyntheticSpec, Workload, load_trace, reshape, synthetic

EXAMPLES = Path(__file__).resolve().parent.parent / "simulator" / "examples"
POLICY_KINDS = ("routing", "scaling")


def _synthetic(text: str) -> Workload:
    """`key=value,...` over SyntheticSpec's fields."""
    values: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"--synthetic: expected key=value, got {part!r}")
        values[key.strip()] = value.strip()
    try:
        return synthetic(SyntheticSpec.model_validate(values))
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ValueError(f"--synthetic: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def _variants(items: list[str]) -> list[dict[str, str]]:
    """The runs `--policy` asks for: one per combination of the values given for each kind (a kind given
    once applies to every run; none: the cluster file's policies)."""
    values: dict[str, list[str]] = {}
    for item in items:
        kind, sep, name = item.partition("=")
        if not sep or kind not in POLICY_KINDS or not name:
            raise ValueError(f"--policy {item!r}: expected routing=<preset> or scaling=<policy>[:replicas]")
        known = PRESETS if kind == "routing" else SCALING_POLICIES
        if name.partition(":")[0] not in known:
            raise ValueError(f"--policy {item!r}: unknown {kind} policy; known: {', '.join(sorted(known))}")
        values.setdefault(kind, []).append(name)
    return [dict(zip(values, combination, strict=True)) for combination in itertools.product(*values.values())]


def _apply_policies(document: dict[str, Any], chosen: dict[str, str]) -> None:
    if "routing" in chosen:
        document["routing"] = {"preset": chosen["routing"]}
    if "scaling" in chosen:
        name, _, size = chosen["scaling"].partition(":")
        if size and (name != "fixed" or not size.isdigit()):
            raise ValueError(f"--policy scaling={chosen['scaling']}: only fixed takes a size, a whole number (fixed:3)")
        for pool in document.get("pools", []):
            params: dict[str, Any] = {}
            if name == "fixed":
                # `fixed` alone is provisioned for the peak (the pool's max_replicas); `fixed:N` holds N.
                replicas = int(size) if size else pool.get("max_replicas", 4)
                params = {"replicas": replicas}
                pool["min_replicas"] = min(pool.get("min_replicas", 1), replicas)
                pool["max_replicas"] = max(pool.get("max_replicas", 4), replicas)
            pool["scaling"] = {"policy": name, "params": params}


def _label(chosen: dict[str, str]) -> str:
    return " ".join(f"{kind}={name}" for kind, name in chosen.items()) or "as configured"


def sim(
    trace: Path | None = typer.Option(None, help="Trace file, read by path (see --format)."),
    format: str = typer.Option(
        "auto", help=f"Trace format: {', '.join(FORMATS)} (auto: told from the file's first line)."
    ),
    synthetic_spec: str = typer.Option(
        "", "--synthetic", help="Instead of a trace: key=value,... e.g. rate_rps=20,duration_s=300,prompt_mean=2048."
    ),
    cluster: Path = typer.Option(
        EXAMPLES / "colocated.yaml", help="Models and pools (the controller's bootstrap YAML)."
    ),
    routing: Path | None = typer.Option(None, help="Routing document (the router's SHOAL_ROUTER_ROUTING_CONFIG)."),
    policy: list[str] = typer.Option(
        [],
        help=(
            "Override a policy: routing=<preset> (e.g. prefix-aware) or scaling=<policy> (fixed: at max_replicas; "
            "fixed:N: N replicas). Repeat a kind to compare: one run per combination, side by side."
        ),
    ),
    model: str | None = typer.Option(None, help="Model whose pools serve the workload (default: the first)."),
    time_scale: float = typer.Option(1.0, help="Replay this many times faster (same requests)."),
    rate_scale: float = typer.Option(1.0, help="Keep (<1) or copy (>1) requests to change the rate."),
    start: float = typer.Option(0.0, help="Skip the trace's first seconds."),
    duration: float | None = typer.Option(None, help="Seconds of trace to replay (before time scaling)."),
    limit: int | None = typer.Option(None, help="At most this many requests."),
    max_prompt: int | None = typer.Option(None, help="Clip prompts to this many tokens."),
    max_output: int | None = typer.Option(None, help="Clip outputs to this many tokens."),
    ttft_slo: float | None = typer.Option(None, help="TTFT SLO in seconds (default: each pool's)."),
    tbt_slo: float | None = typer.Option(None, help="TBT SLO in seconds (default: each pool's)."),
    cold: bool = typer.Option(False, help="Start with no replica ready (each pays its cold start)."),
    warmup: float = typer.Option(
        0.0,
        min=0.0,
        help="Run but do not measure the first seconds (after time scaling): every policy is judged from "
        "the state it reaches under the load, not from the one all start in.",
    ),
    out: Path = typer.Option(Path("sim-out"), help="Folder for the plot and the metrics JSON."),
) -> None:
    """Simulate the cluster on a trace with the live policies; print a table, write a plot."""
    try:
        if synthetic_spec:
            workload = _synthetic(synthetic_spec)
        elif trace is not None:
            workload = load_trace(trace, format)
        else:
            raise ValueError("give --trace PATH or --synthetic key=value,...")
        workload = reshape(
            workload,
            time_scale=time_scale,
            rate_scale=rate_scale,
            start_s=start,
            duration_s=duration,
            limit=limit,
            max_prompt=max_prompt,
            max_output=max_output,
        )
        if not workload.requests:
            raise ValueError("the workload is empty after --start/--duration/--limit")
        if warmup and not any(r.at >= warmup for r in workload.requests):
            raise ValueError(f"--warmup {warmup:g}: no request arrives after it")
        variants = _variants(policy)
        configs = {
            _label(chosen) if len(variants) > 1 else workload.name: load_config(
                cluster, routing, mutate=functools.partial(_apply_policies, chosen=chosen)
            )
            for chosen in variants
        }
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"simulating {len(workload.requests)} requests from {workload.name} over {workload.span_s:.0f} s")
    results = {
        name: simulate(config, workload, model, warm=not cold, warmup_s=warmup) for name, config in configs.items()
    }
    metrics = {name: measure(result, ttft_slo, tbt_slo) for name, result in results.items()}
    typer.echo(table(metrics))
    for name, result in results.items():
        heading = f"{name}: " if len(results) > 1 else ""
        for event in result.scaling_events[:20]:
            typer.echo(f"  {heading}t={event.t:8.1f}s {event.pool}: {event.before} -> {event.after} ({event.reason})")
        if len(result.scaling_events) > 20:
            typer.echo(f"  {heading}... {len(result.scaling_events) - 20} more scaling events")
        for warning in cap_warnings(result):
            typer.echo(f"warning: {heading}{warning}", err=True)
    out.mkdir(parents=True, exist_ok=True)
    # One run: its metrics, as before; several: keyed by run.
    dumped = {name: asdict(m) for name, m in metrics.items()}
    (out / "metrics.json").write_text(json.dumps(next(iter(dumped.values())) if len(dumped) == 1 else dumped, indent=2))
    typer.echo(f"plot: {plot(results, out / 'sim.png')}")
