"""Redis users, one per service: each may touch only the keys of schema.py it reads or writes.

A stolen worker password then cannot rewrite the model catalog, mint API
keys, read sessions or wipe the cluster: the worker user reaches the
registry and the KV event stream, nothing else. No service user may run
@admin or @dangerous commands (CONFIG, FLUSHALL, KEYS, DEBUG, ...); that is
left to the `default` user (SHOAL_REDIS_PASSWORD on the server), which no
service is given. The controller (its API, reconcile loop and Celery jobs,
whose broker keys share the server) reaches every key.

Patterns follow Redis 7 ACL syntax: `~p` read and write, `%R~p` read only.
The chart and docker-compose render the same rules from
deploy/helm/shoal/files/redis-users.conf, which `shoal redis users` writes
and tests/unit/test_redis_acl.py keeps equal to this table.

Standard library only: `make compose-env` reads the user names from here with the
system's python3, before any virtualenv exists.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from shared.state import schema


@dataclass(frozen=True)
class RedisUser:
    name: str
    writes: tuple[str, ...]
    reads: tuple[str, ...] = ()
    all_keys: bool = False

    def rules(self) -> str:
        """The user's ACL rules after its password: keys, channels, commands."""
        if self.all_keys:
            keys = ["allkeys", "allchannels"]
        else:
            keys = ["resetchannels", *(f"~{schema.PREFIX}{p}" for p in self.writes)]
            keys += [f"%R~{schema.PREFIX}{p}" for p in self.reads]
        return " ".join([*keys, "+@all", "-@admin", "-@dangerous"])


# Key patterns relative to schema.PREFIX, from the "written by" column of schema.py and each
# service's reads. Routers also drop stale ids from `workers` (the registry's prune).
USERS: tuple[RedisUser, ...] = (
    RedisUser(
        "router",
        writes=("session:*", "bucket:*", "metrics:router", "workers"),
        reads=(
            "worker:*",
            "left:*",
            "cordoned",
            "cluster",
            "doc:*",
            "catalog:changes",
            "apikeys:changes",
            "kv:events",
            "kv:snapshot:*",
        ),
    ),
    RedisUser(
        "worker",
        writes=("workers", "worker:*", "left:*", "cordoned", "kv:events", "kv:snapshot:*"),
        reads=("doc:pool:*",),
    ),
    RedisUser("kvstore", writes=("kv:events", "kv:snapshot:*")),
    RedisUser("controller", writes=(), all_keys=True),
)
USER_NAMES: tuple[str, ...] = tuple(user.name for user in USERS)


def password_variable(name: str) -> str:
    """The environment variable holding user `name`'s password where Redis starts (chart, compose)."""
    return f"SHOAL_REDIS_PASSWORD_{name.upper()}"


def users_config(password: Callable[[str], str]) -> str:
    """redis.conf `user` lines for every service; `password(name)` gives what follows `>`."""
    return "".join(f"user {user.name} on >{password(user.name)} {user.rules()}\n" for user in USERS)


def users_template() -> str:
    """The lines with `${SHOAL_REDIS_PASSWORD_<USER>}` where the passwords go, for a shell to expand."""
    return users_config(lambda name: "${" + password_variable(name) + "}")


def users_with(passwords: Mapping[str, str]) -> str:
    return users_config(lambda name: passwords[name])
