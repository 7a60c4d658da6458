"""`shoal key create | list | revoke` (OpenAI API keys) and `shoal audit` (the admin API's audit log)."""

from __future__ import annotations

import datetime

import typer

from cli.admin import Admin, Token, Url, console, print_table

key_app = typer.Typer(help="OpenAI API keys: each with an optional rate and token quota.", no_args_is_help=True)


def _when(at: float | None) -> str:
    return "" if at is None else datetime.datetime.fromtimestamp(at).strftime("%Y-%m-%d %H:%M:%S")


@key_app.command("create")
def create_key(
    name: str = typer.Argument(..., help="Who or what uses the key."),
    rps: float | None = typer.Option(None, min=0.001, help="Requests per second (one second's burst)."),
    tpm: int | None = typer.Option(None, min=1, help="Prompt plus completion tokens per minute."),
    url: str = Url,
    token: str = Token,
) -> None:
    """Make a key; its secret is printed this once (Redis keeps a digest)."""
    made = Admin(url, token).call("POST", "/v1/keys", json={"name": name, "requests_per_s": rps, "tokens_per_min": tpm})
    console.print(f"{made['id']} ({name}): {made['key']}")
    console.print("Send it as `Authorization: Bearer <key>`; it is not shown again.")


@key_app.command("list")
def list_keys(url: str = Url, token: str = Token) -> None:
    """Every key: its id, the start of its secret, its limits, and when it was revoked."""
    rows = [
        [k["id"], k["name"], k["shown"] + "…", k["requests_per_s"] or "-", k["tokens_per_min"] or "-",
         _when(k["created_at"]), _when(k["revoked_at"])]
        for k in Admin(url, token).call("GET", "/v1/keys")
    ]  # fmt: skip
    print_table("API keys", ["id", "name", "key", "req/s", "tokens/min", "created", "revoked"], rows)


@key_app.command("revoke")
def revoke_key(
    key_id: str = typer.Argument(..., help="The key's id (key-...)."), url: str = Url, token: str = Token
) -> None:
    """Revoke a key: routers refuse it within about a second."""
    Admin(url, token).call("DELETE", f"/v1/keys/{key_id}")
    console.print(f"{key_id}: revoked")


def audit(
    limit: int = typer.Option(50, min=1, max=10_000, help="How many entries, newest first."),
    url: str = Url,
    token: str = Token,
) -> None:
    """The admin API's audit log: every write, who made it, and what came of it."""
    rows = [
        [_when(e["at"]), e["who"], e["method"], e["path"], e["status"], e["body"][:60]]
        for e in Admin(url, token).call("GET", "/v1/audit", params={"limit": limit})
    ]
    print_table("audit log", ["when", "who", "method", "path", "status", "body"], rows)
