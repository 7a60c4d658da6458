"""`shoal key create | list | revoke` (OpenAI API keys), `shoal audit` (the admin API's audit log),
`shoal pki init` (certificates of the internal channels) and `shoal redis-users` (each service's Redis user)."""

from __future__ import annotations

import datetime
from pathlib import Path

import typer

from cli.admin import Admin, Token, Url, console, print_table
from shared.config.base import CommonSettings, load_settings
from shared.rpc.security import Role, RpcSecurity, TLSFiles

key_app = typer.Typer(help="OpenAI API keys: each with an optional rate and token quota.", no_args_is_help=True)
pki_app = typer.Typer(help="Certificates of the internal channels (mutual TLS).", no_args_is_help=True)


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


def own_security() -> RpcSecurity:
    """This container's credentials, as its service reads them (the role its certificate names)."""
    settings = load_settings(CommonSettings)
    if settings.rpc_plaintext or settings.tls_dir is None:
        return RpcSecurity(Role.WORKER, None, settings.internal_token)
    files = TLSFiles.load(settings.tls_dir)
    roles = sorted(files.roles)
    if len(roles) != 1:
        raise typer.BadParameter(f"the certificate in {settings.tls_dir} names {len(roles)} Shoal services, not one")
    return RpcSecurity.for_role(roles[0], files, settings.internal_token)


@pki_app.command("init")
def pki_init(
    folder: Path = typer.Argument(..., help="Where to write ca.crt, ca.key and one folder per service."),
    days: int = typer.Option(365, min=1, help="Validity of the CA and the certificates."),
    force: bool = typer.Option(False, help="Make new ones even when a complete, valid set is there."),
) -> None:
    """A throwaway CA and one certificate per service (router, controller, worker, kvstore): point each
    service's SHOAL_TLS_DIR at FOLDER/<service>. Keeps a complete set that is valid for 30 more days."""
    from shared.rpc.pki import init_pki

    written = init_pki(folder, days=days, force=force)
    typer.echo(f"{'wrote' if written else 'kept'} the certificates in {folder}")


def redis_users() -> None:
    """Print the redis.conf `user` lines of every service (shared/state/acl.py), with
    ${SHOAL_REDIS_PASSWORD_<USER>} where each password goes: what deploy/helm/shoal/files/redis-users.conf holds."""
    from shared.state.acl import users_template

    typer.echo(users_template(), nl=False)
