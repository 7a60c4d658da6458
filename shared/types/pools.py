"""The desired state an operator declares: models and pools of workers.

These pydantic models are the admin API's bodies (`PoolCreate`, `PoolUpdate`,
`PoolPublic`) and what the controller stores in Redis as versioned documents.
"""

from __future__ import annotations

import enum
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.config.services import EngineKind, WorkerRole

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def _check_name(value: str) -> str:
    if not _NAME.match(value):
        raise ValueError("must be a DNS label: lowercase letters, digits and '-', 1-63 characters")
    return value


def _check_env(value: dict[str, str] | None) -> dict[str, str] | None:
    for key in value or {}:
        if not re.match(r"^[A-Z][A-Z0-9_]{0,63}$", key):
            raise ValueError(f"worker_env key {key!r} must be an upper-case settings name like SIM_SPEEDUP")
    return value


class SLO(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ttft_p90_s: float = Field(default=2.0, gt=0, le=600, description="Time to first token, 90th percentile.")
    tbt_p90_s: float = Field(default=0.2, gt=0, le=60, description="Time between tokens, 90th percentile.")


class Capacity(BaseModel):
    """What one replica sustains within the SLO: a prior until measured."""

    model_config = ConfigDict(extra="forbid")

    prefill_tokens_per_s: float = Field(default=2000.0, gt=0, description="Prompt tokens per second per replica.")
    decode_tokens_per_s: float = Field(default=400.0, gt=0, description="Generated tokens per second per replica.")


class ScalingSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    policy: str = Field(default="predictive", description="predictive, reactive or fixed (shared/policies/scaling.py).")
    params: dict[str, Any] = Field(default_factory=dict, description="The policy's parameters.")


class ModelBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(default="", max_length=4096, description="Checkpoint folder on the workers' and routers' hosts.")
    block_size: int = Field(default=16, ge=1, le=1024)
    context_length: int | None = Field(
        default=None, ge=16, le=10_000_000, description="Tokens a request may span; unset: the checkpoint's own."
    )


class ModelCreate(ModelBase):
    name: str = Field(min_length=1, max_length=63, description="The name clients ask for.")

    _name = field_validator("name")(_check_name)


class ModelUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(default=None, max_length=4096)
    block_size: int | None = Field(default=None, ge=1, le=1024)
    context_length: int | None = Field(default=None, ge=16, le=10_000_000)


class ModelState(enum.StrEnum):
    SERVING = "serving"
    # Deleted through the API: routers stop admitting it, then its pools drain and go, then it goes.
    DELETING = "deleting"


class ModelPublic(ModelCreate):
    version: int = 0
    state: ModelState = ModelState.SERVING
    # When it entered DELETING (epoch seconds).
    deleting_since: float | None = None


class AliasSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=63, description="The model the alias points at.")


class AliasPublic(AliasSpec):
    name: str
    version: int = 0


class PoolBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=63, description="Model the pool's workers serve.")
    role: WorkerRole = WorkerRole.MIXED
    engine: EngineKind = EngineKind.REFERENCE
    gpu_type: str = Field(default="cpu", min_length=1, max_length=63)
    cost_per_hour: float = Field(default=0.0, ge=0, le=10_000)
    min_replicas: int = Field(default=1, ge=0, le=10_000)
    max_replicas: int = Field(default=4, ge=0, le=10_000)
    slo: SLO = Field(default_factory=SLO)
    capacity: Capacity = Field(default_factory=Capacity)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    # Extra SHOAL_WORKER_* settings for the pool's workers (e.g. SIM_SPEEDUP).
    worker_env: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _bounds(self) -> PoolBase:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        return self

    _worker_env = field_validator("worker_env")(_check_env)


class PoolCreate(PoolBase):
    name: str = Field(min_length=1, max_length=63)

    _name = field_validator("name")(_check_name)


class PoolUpdate(BaseModel):
    """A partial update; omitted fields keep their values."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int | None = Field(default=None, ge=0, le=10_000)
    max_replicas: int | None = Field(default=None, ge=0, le=10_000)
    gpu_type: str | None = Field(default=None, min_length=1, max_length=63)
    cost_per_hour: float | None = Field(default=None, ge=0, le=10_000)
    slo: SLO | None = None
    capacity: Capacity | None = None
    scaling: ScalingSpec | None = None
    worker_env: dict[str, str] | None = None

    _worker_env = field_validator("worker_env")(_check_env)


class PoolPublic(PoolCreate):
    version: int = 0
    # A manual override of the scaling policy (None: the policy decides).
    replicas_override: int | None = None
