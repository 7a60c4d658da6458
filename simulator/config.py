"""The simulated cluster's configuration: the live services' own files and settings.

* pools and models: the controller's bootstrap YAML (`models:`, `pools:`),
  validated by the admin API's `PoolCreate` / `ModelCreate`;
* routing: the router's routing document (`RoutingConfig`), or a preset;
* each pool's `worker_env` is read by `WorkerSettings`, as a worker would:
  SIM_PROFILE picks the performance profile (else the pool's gpu_type when a
  profile has that name), SIM_SPEEDUP, SIM_STARTUP_DELAY_S, MAX_RUNNING,
  MAX_BATCH_TOKENS, MAX_WAITING, BLOCK_SIZE;
* the router's P/D threshold and the controller's reconcile interval default
  to those services' defaults;
* `experts:` (simulator only) makes pools MoE, expert-parallel pools whose
  placement the controller's placement policy rebalances.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shared.config.services import ControllerSettings, RouterSettings, WorkerSettings
from shared.perfmodel import PROFILES, PerfProfile, get_profile
from shared.policies.routing import RoutingConfig
from shared.policies.routing import load_config as validate_routing
from shared.policies.scaling import make_policy
from shared.types.pools import ModelCreate, PoolCreate
from simulator.experts import ExpertSpec


def _default(settings: type[BaseModel], name: str) -> Any:
    return settings.model_fields[name].default


class SimConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[ModelCreate] = Field(min_length=1)
    pools: list[PoolCreate] = Field(min_length=1)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    pd_min_uncached_tokens: int = Field(default=_default(RouterSettings, "pd_min_uncached_tokens"), ge=0)
    reconcile_interval_s: float = Field(default=_default(ControllerSettings, "reconcile_interval_s"), gt=0)
    # MoE pools: expert-parallel shape and rebalancing, by pool name (simulator/experts.py).
    experts: dict[str, ExpertSpec] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> SimConfig:
        names = [p.name for p in self.pools]
        if len(set(names)) != len(names):
            raise ValueError(f"pool names repeat: {names}")
        models = {m.name for m in self.models}
        for pool in self.pools:
            if pool.model not in models:
                raise ValueError(f"pool {pool.name!r} serves unknown model {pool.model!r}")
            worker_settings(pool)  # refuses bad worker_env now, naming the pool
            make_policy(pool.scaling.policy, pool.scaling.params)
        unknown = set(self.experts) - set(names)
        if unknown:
            raise ValueError(f"experts: no pool named {', '.join(sorted(unknown))}")
        return self

    def model_pools(self, model: str | None = None) -> list[PoolCreate]:
        name = model or self.models[0].name
        pools = [p for p in self.pools if p.model == name]
        if not pools:
            raise ValueError(f"no pool serves model {name!r}")
        return pools


def worker_settings(pool: PoolCreate) -> WorkerSettings:
    """The settings a worker of this pool would run with (worker_env over the defaults, not the environment)."""
    values: dict[str, Any] = {key.lower(): value for key, value in pool.worker_env.items()}
    values.update(role=pool.role, pool=pool.name, engine="sim", gpu_type=pool.gpu_type, model_name=pool.model)
    try:
        return WorkerSettings.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ValueError(f"pool {pool.name!r} worker_env: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def pool_profile(pool: PoolCreate, settings: WorkerSettings) -> PerfProfile:
    if "SIM_PROFILE" in pool.worker_env:
        return get_profile(settings.sim_profile)
    return PROFILES.get(pool.gpu_type) or get_profile(settings.sim_profile)


def load_config(
    path: Path, routing: Path | None = None, mutate: Callable[[dict[str, Any]], None] | None = None
) -> SimConfig:
    """Read a bootstrap YAML (plus an optional routing YAML), let `mutate` edit it; ValueError names the bad field."""
    document = _yaml(path)
    if routing is not None:
        document["routing"] = _yaml(routing)
    if mutate is not None:
        mutate(document)
    return parse_config(document, str(path))


def parse_config(document: dict[str, Any], where: str = "config") -> SimConfig:
    try:
        config = SimConfig.model_validate(document)
    except ValidationError as exc:
        first = exc.errors()[0]
        location = ".".join(map(str, first["loc"]))
        raise ValueError(f"{where}: {location + ': ' if location else ''}{first['msg']}") from None
    try:
        validate_routing(config.routing.model_dump(exclude_none=True))  # builds every plugin
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    return config


def _yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    document = yaml.safe_load(path.read_text()) or {}
    if not isinstance(document, dict):
        raise ValueError(f"{path}: expected a mapping at the top")
    return document
