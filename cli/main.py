"""The `shoal` command line."""

from __future__ import annotations

from pathlib import Path

import typer

from cli.admin import COMMANDS
from cli.dashboards import dashboards
from cli.graphs import catalogue, graph_app
from cli.models import alias_app, model_app
from cli.security import audit, key_app, own_security, pki_app, redis_users
from cli.sim import sim

# Plain help, wrapped at the terminal's width up to 120 columns: Rich's option tables cut long words
# (paths, examples, variable names) with an ellipsis.
app = typer.Typer(
    help="Shoal: orchestration for MoE LLM inference clusters.",
    no_args_is_help=True,
    rich_markup_mode=None,
    context_settings={"max_content_width": 120},
)
for command in COMMANDS:
    app.command()(command)
app.command()(sim)
app.command()(catalogue)
app.command()(audit)
app.command()(dashboards)
app.command("redis-users")(redis_users)
app.add_typer(graph_app, name="graph")
app.add_typer(model_app, name="model")
app.add_typer(alias_app, name="alias")
app.add_typer(key_app, name="key")
app.add_typer(pki_app, name="pki")


@app.command()
def run(
    model: Path = typer.Option(Path(".cache/models/shoal-tiny-moe"), help="Checkpoint served by a P/D pair."),
    second: Path | None = typer.Option(None, help="A second checkpoint, served by one worker of its own."),
    routers: int = typer.Option(1, min=1, max=64, help="Router processes sharing the OpenAI port."),
) -> None:
    """Start the whole platform as local processes (what `make run` does)."""
    from cli.localstack import run_local_stack

    raise typer.Exit(run_local_stack(model, second, routers))


@app.command()
def probe(
    target: str = typer.Argument(..., help="http(s)://host:port/path (expects 200) or host:port (gRPC health)."),
    service: str = typer.Option("", help="gRPC health service name (empty: the whole server)."),
) -> None:
    """Exit 0 when a service is healthy, 1 when not: container and compose health checks.

    A gRPC probe runs inside the service's container and presents the service's own certificate
    (SHOAL_TLS_DIR), expecting the server to hold the same identity."""
    from cli.localstack import grpc_ready, http_ready

    if target.startswith(("http://", "https://")):
        raise typer.Exit(0 if http_ready(target) else 1)
    security = own_security()
    raise typer.Exit(0 if grpc_ready(target, service, security, security.role) else 1)


@app.command("tiny-model")
def tiny_model(
    out: Path = typer.Argument(Path(".cache/models/shoal-tiny-moe")),
    variant: str = typer.Option(
        "a", help="a: 8 experts; b: 4 experts and another vocabulary; top8: 16 experts, 8 per token."
    ),
    force: bool = False,
) -> None:
    """Build a tiny random-weight test checkpoint (no downloads)."""
    from services.worker.tiny_model import VARIANTS, build_tiny_model

    if variant not in VARIANTS:
        raise typer.BadParameter(f"variant must be one of {sorted(VARIANTS)}")
    if (out / "config.json").exists() and not force:
        typer.echo(f"{out} already holds a model")
        return
    build_tiny_model(out, variant=VARIANTS[variant])
    typer.echo(f"tiny model written to {out}")


if __name__ == "__main__":
    app()
