"""`shoal model list | add | delete` and `shoal alias list | set | delete`: the models behind the endpoint."""

from __future__ import annotations

import typer

from cli.admin import Admin, Token, Url, console, print_table

model_app = typer.Typer(help="Models served behind the one OpenAI endpoint.", no_args_is_help=True)
alias_app = typer.Typer(help="Aliases: stable names pointing at a model version.", no_args_is_help=True)


@model_app.command("list")
def list_models(url: str = Url, token: str = Token) -> None:
    """Registered models, their state and the pools serving them."""
    admin = Admin(url, token)
    pools = admin.call("GET", "/v1/pools")
    rows = [
        [
            m["name"],
            m["state"],
            m.get("context_length") or "checkpoint",
            ", ".join(p["name"] for p in pools if p["model"] == m["name"]),
            m["path"],
        ]
        for m in admin.call("GET", "/v1/models")
    ]
    print_table("models", ["name", "state", "context", "pools", "path"], rows)


@model_app.command("add")
def add_model(
    name: str = typer.Argument(..., help="The name clients ask for."),
    path: str = typer.Argument(..., help="Checkpoint folder (on the workers' and routers' hosts)."),
    engine: str = typer.Option("reference", help="Engine of its pool's workers: reference or sim."),
    role: str = typer.Option("mixed", help="Role of its pool: mixed, or prefill/decode for one side of P/D."),
    replicas: int = typer.Option(1, min=0, help="Workers to start (0: the first request starts one)."),
    max_replicas: int = typer.Option(4, min=0, help="How far the autoscaler may grow the pool."),
    context_length: int | None = typer.Option(None, help="Tokens a request may span (default: the checkpoint's)."),
    url: str = Url,
    token: str = Token,
) -> None:
    """Register a model and create a pool (named as the model) that serves it; routers pick it up at once."""
    admin = Admin(url, token)
    body: dict[str, str | int] = {"name": name, "path": path}
    if context_length is not None:
        body["context_length"] = context_length
    admin.call("POST", "/v1/models", json=body)
    pool = {
        "name": name,
        "model": name,
        "role": role,
        "engine": engine,
        "min_replicas": replicas,
        "max_replicas": max(replicas, max_replicas),
    }
    admin.call("POST", "/v1/pools", json=pool)
    console.print(f"{name}: registered; pool {name} starting {replicas} worker(s)")


@model_app.command("delete")
def delete_model(name: str = typer.Argument(..., help="Model name."), url: str = Url, token: str = Token) -> None:
    """Delete a model: routers stop admitting it, its pools drain (requests in flight finish), then it goes."""
    deleting = Admin(url, token).call("DELETE", f"/v1/models/{name}")
    console.print(f"{name}: {'draining its pools, then deleted' if deleting else 'deleted'}")


@alias_app.command("list")
def list_aliases(url: str = Url, token: str = Token) -> None:
    """Aliases and the model each points at."""
    rows = [[a["name"], a["model"], a["version"]] for a in Admin(url, token).call("GET", "/v1/aliases")]
    print_table("aliases", ["alias", "model", "version"], rows)


@alias_app.command("set")
def set_alias(
    name: str = typer.Argument(..., help="Alias name."),
    model: str = typer.Argument(..., help="The model it points at from now on."),
    url: str = Url,
    token: str = Token,
) -> None:
    """Point an alias at a model (roll out, or roll back): new requests go there, running ones finish."""
    Admin(url, token).call("PUT", f"/v1/aliases/{name}", json={"model": model})
    console.print(f"{name} -> {model}")


@alias_app.command("delete")
def delete_alias(name: str = typer.Argument(..., help="Alias name."), url: str = Url, token: str = Token) -> None:
    """Remove an alias (the model stays)."""
    Admin(url, token).call("DELETE", f"/v1/aliases/{name}")
    console.print(f"{name}: deleted")
