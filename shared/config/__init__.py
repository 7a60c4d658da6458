"""Typed settings of every service (pydantic-settings, `SHOAL_` prefix)."""

from shared.config.base import CommonSettings, Environment, LogFormat, SettingsError, env_name, load_settings
from shared.config.services import (
    SERVICE_SETTINGS,
    ControllerSettings,
    EngineKind,
    GrpcServiceSettings,
    KVStoreSettings,
    RouterSettings,
    WorkerRole,
    WorkerSettings,
    env_names,
)

__all__ = [
    "SERVICE_SETTINGS",
    "CommonSettings",
    "ControllerSettings",
    "EngineKind",
    "Environment",
    "GrpcServiceSettings",
    "KVStoreSettings",
    "LogFormat",
    "RouterSettings",
    "SettingsError",
    "WorkerRole",
    "WorkerSettings",
    "env_name",
    "env_names",
    "load_settings",
]
