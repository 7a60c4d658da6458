"""Settings every service shares, and the loader that refuses bad values.

Each service has one settings class (shared/config/services.py) read from
environment variables. Fields common to all services are read from `SHOAL_*`
(`SHOAL_REDIS_URL`, `SHOAL_OTLP_ENDPOINT`, ...); a service's own fields from
`SHOAL_<SERVICE>_*` (`SHOAL_WORKER_ROLE`, ...). Every field has a description;
a bad value stops the service at start with the variable, the value, what is
wrong and how to fix it.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_PLACEHOLDER_SECRETS = {"changeme", "change-me", "secret", "password", "token", "admin"}


class Environment(enum.StrEnum):
    DEV = "dev"
    PROD = "prod"


class LogFormat(enum.StrEnum):
    TEXT = "text"
    JSON = "json"


def common(env: str, **kwargs: Any) -> Any:
    """A field read from the unprefixed variable `env` (shared by all services)."""
    return Field(validation_alias=AliasChoices(env), **kwargs)


class CommonSettings(BaseSettings):
    """Fields every Shoal service reads, from unprefixed `SHOAL_*` variables."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    env: Environment = common(
        "SHOAL_ENV",
        default=Environment.PROD,
        description=(
            "`prod` (the default): placeholder secrets are refused and the OpenAI API needs a key. `dev`, an "
            "explicit development setting that each service warns about at start: the OpenAI API admits any caller."
        ),
    )
    redis_url: str = common(
        "SHOAL_REDIS_URL",
        default="redis://127.0.0.1:6379/0",
        description="Redis holding cluster state (registry, desired state, events), as a redis:// or rediss:// URL.",
    )
    redis_username: str | None = common(
        "SHOAL_REDIS_USERNAME",
        default=None,
        description=(
            "Redis ACL user this service authenticates as (router, worker, kvstore, controller: each reaches "
            "only its own keys, see shared/state/acl.py). Unset: the `default` user."
        ),
    )
    redis_password: str | None = common(
        "SHOAL_REDIS_PASSWORD",
        default=None,
        description=(
            "Redis password (AUTH) of SHOAL_REDIS_USERNAME, put into SHOAL_REDIS_URL when that carries none "
            "(from a Secret)."
        ),
    )
    otlp_endpoint: str | None = common(
        "SHOAL_OTLP_ENDPOINT",
        default=None,
        description="OTLP/gRPC collector (e.g. http://otel-collector:4317). Unset: traces are not exported.",
    )
    log_level: str = common(
        "SHOAL_LOG_LEVEL", default="INFO", description="Python logging level: DEBUG, INFO, WARNING, ERROR."
    )
    log_format: LogFormat = common(
        "SHOAL_LOG_FORMAT", default=LogFormat.TEXT, description="`text` for people, `json` for collectors."
    )
    internal_token: str | None = common(
        "SHOAL_INTERNAL_TOKEN",
        default=None,
        description="Shared bearer token required on internal gRPC calls. Unset: no token is checked.",
    )
    tls_dir: Path | None = common(
        "SHOAL_TLS_DIR",
        default=None,
        description=(
            "Folder with this service's certificate for internal gRPC and data channels (mutual TLS): ca.crt, "
            "tls.crt, tls.key, the layout of a cert-manager Secret or of `shoal pki init`. Required unless "
            "SHOAL_RPC_PLAINTEXT is set."
        ),
    )
    rpc_plaintext: bool = common(
        "SHOAL_RPC_PLAINTEXT",
        default=False,
        description=(
            "Development setting: internal gRPC and data channels without TLS (no service identity is checked). "
            "Each service warns about it at start."
        ),
    )
    health_port: int | None = common(
        "SHOAL_HEALTH_PORT",
        default=None,
        ge=0,
        le=65535,
        description=(
            "Services serving gRPC (worker, kvstore): a plaintext port serving only gRPC health, for the kubelet's "
            "gRPC probes (they cannot present a client certificate). Unset: none (health is on the mutual-TLS port "
            "too)."
        ),
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix:// (e.g. redis://127.0.0.1:6379/0)")
        return value

    @model_validator(mode="after")
    def _redis_credentials(self) -> CommonSettings:
        if self.redis_password:
            # Frozen settings: the one effective URL is what every client and Celery connect with.
            url = with_password(self.redis_url, self.redis_password, self.redis_username)
            object.__setattr__(self, "redis_url", url)
        return self

    @property
    def redis_has_password(self) -> bool:
        return self.redis_url.startswith("unix://") or urlsplit(self.redis_url).password is not None

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return level

    @model_validator(mode="after")
    def _no_placeholder_secrets(self) -> CommonSettings:
        if self.env is Environment.PROD:
            for name in self.secret_fields():
                value = getattr(self, name)
                values = value if isinstance(value, list | tuple) else [value]
                for item in values:
                    if isinstance(item, str) and item.split(":")[0].lower() in _PLACEHOLDER_SECRETS:
                        raise ValueError(
                            f"{name} holds a placeholder secret in SHOAL_ENV=prod; "
                            "set a long random value from a Kubernetes Secret"
                        )
        return self

    @classmethod
    def secret_fields(cls) -> tuple[str, ...]:
        """Fields holding secrets: never logged, refused as placeholders in prod."""
        return ("internal_token", "redis_password")

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict with secrets masked, for start-up logs."""
        data = self.model_dump(mode="json")
        for name in self.secret_fields():
            if data.get(name):
                data[name] = "***"
        data["redis_url"] = redacted_url(self.redis_url)
        return data


def with_password(url: str, password: str, username: str | None = None) -> str:
    """A redis:// or rediss:// `url` carrying `password` (and `username`, an ACL user), unless it carries a
    password already (or none is given)."""
    parts = urlsplit(url)
    if not password or parts.scheme not in ("redis", "rediss") or parts.password is not None:
        return url
    host = parts.hostname or ""
    user = quote(username or parts.username or "", safe="")
    netloc = f"{user}:{quote(password, safe='')}@{f'[{host}]' if ':' in host else host}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def without_credentials(url: str) -> str:
    """`url` with no user or password."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def redacted_url(url: str) -> str:
    """`url` with its password, if any, masked (for logs and banners)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")))


class SettingsError(Exception):
    """Raised when the environment holds a value a service cannot start with."""


S = TypeVar("S", bound=CommonSettings)


def env_name(cls: type[CommonSettings], field: str) -> str:
    """The environment variable a field is read from."""
    info = cls.model_fields[field]
    alias = info.validation_alias
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    prefix = cls.model_config.get("env_prefix", "")
    return f"{prefix}{field}".upper()


def load_settings(cls: type[S], **overrides: Any) -> S:
    """Read `cls` from the environment (overrides win), or raise SettingsError.

    The error names each bad variable, its value, what is wrong with it and
    the field's description, so the fix is in the message.
    """
    try:
        return cls(**overrides)
    except ValidationError as exc:
        by_var = {env_name(cls, name).upper(): name for name in cls.model_fields}
        lines = [f"invalid {cls.__name__}:"]
        for err in exc.errors():
            loc = [str(part) for part in err["loc"]]
            field = by_var.get(loc[0].upper(), loc[0]) if loc else ""
            problem = err["msg"].removeprefix("Value error, ")
            if field in cls.model_fields:
                var = env_name(cls, field)
                description = (cls.model_fields[field].description or "").rstrip(".")
                lines.append(
                    f"  {var}={err.get('input')!r}: {problem}. Fix: set {var} to a valid value ({description})"
                )
            else:
                lines.append(f"  {problem}")
        raise SettingsError("\n".join(lines)) from None
