"""The `shoal` command line."""

from __future__ import annotations

from pathlib import Path

import typer

from cli.admin import COMMANDS
from cli.graphs import catalogue, graph_app
from cli.sim import sim

app = typer.Typer(help="Shoal: orchestration for MoE LLM inference clusters.", no_args_is_help=True)
for command in COMMANDS:
    app.command()(command)
app.command()(sim)
app.command()(catalogue)
app.add_typer(graph_app, name="graph")


@app.command()
def run(
    model: Path = typer.Option(Path(".cache/models/shoal-tiny-moe"), help="Checkpoint to serve."),
    routers: int = typer.Option(1, min=1, max=64, help="Router processes sharing the OpenAI port."),
) -> None:
    """Start the whole platform as local processes (what `make run` does)."""
    from cli.localstack import run_local_stack

    raise typer.Exit(run_local_stack(model, routers))


@app.command()
def probe(
    target: str = typer.Argument(..., help="http(s)://host:port/path (expects 200) or host:port (gRPC health)."),
    service: str = typer.Option("", help="gRPC health service name (empty: the whole server)."),
) -> None:
    """Exit 0 when a service is healthy, 1 when not: container and compose health checks."""
    from cli.localstack import grpc_ready, http_ready

    healthy = http_ready(target) if target.startswith(("http://", "https://")) else grpc_ready(target, service)
    raise typer.Exit(0 if healthy else 1)


@app.command("tiny-model")
def tiny_model(out: Path = typer.Argument(Path(".cache/models/shoal-tiny-moe")), force: bool = False) -> None:
    """Build the tiny random-weight test checkpoint (no downloads)."""
    from services.worker.tiny_model import build_tiny_model

    if (out / "config.json").exists() and not force:
        typer.echo(f"{out} already holds a model")
        return
    build_tiny_model(out)
    typer.echo(f"tiny model written to {out}")


if __name__ == "__main__":
    app()
