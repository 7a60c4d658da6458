"""One settings class per service, read from `SHOAL_<SERVICE>_*` variables.

These classes are the single source of each service's configuration: the
docker-compose file and the Helm chart are checked against them by tests.
"""

from __future__ import annotations

import enum
import json
import os
import re
import socket
import tempfile
import uuid
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from shared.config.base import CommonSettings, env_name
from shared.policies.eviction import POLICIES
from shared.policies.routing import PRESETS


class WorkerRole(enum.StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"
    MIXED = "mixed"


class EngineKind(enum.StrEnum):
    REFERENCE = "reference"
    SIM = "sim"


def _split_list(value: object) -> object:
    """Accept a list variable as JSON (`["a","b"]`) or comma-separated (`a,b`)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


def _default_shm() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class GrpcServiceSettings(CommonSettings):
    """Listening address of a gRPC service and its Prometheus endpoint."""

    host: str = Field(default="127.0.0.1", description="Interface the gRPC server binds to.")
    grpc_port: int = Field(default=0, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    data_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Port of the data channels (a worker's request stream from routers, the kvstore's KV bytes); "
        "0 picks a free one. Control calls stay on the gRPC port.",
    )
    advertise_host: str | None = Field(
        default=None,
        description="Host other services use to reach this one (the pod IP in Kubernetes). Default: host.",
    )
    metrics_port: int = Field(
        default=0, ge=0, le=65535, description="Port of the Prometheus /metrics endpoint; 0 picks a free one."
    )
    shutdown_grace_s: float = Field(
        default=10.0, gt=0, description="Seconds in-flight calls get to finish after SIGTERM."
    )

    def advertised(self, port: int) -> str:
        return f"{self.advertise_host or self.host}:{port}"


class WorkerSettings(GrpcServiceSettings):
    """The GPU (or CPU) worker: one engine behind the Worker gRPC service."""

    model_config = SettingsConfigDict(env_prefix="SHOAL_WORKER_", extra="ignore", frozen=True)

    worker_id: str = Field(
        default_factory=_default_worker_id, description="Unique id in the registry; default host-pid-random."
    )
    role: WorkerRole = Field(default=WorkerRole.MIXED, description="prefill, decode or mixed.")
    pool: str = Field(default="default", min_length=1, description="Pool this worker belongs to.")
    engine: EngineKind = Field(default=EngineKind.REFERENCE, description="reference (PyTorch) or sim.")
    http_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="Also serve the OpenAI API on this port, straight to this worker's engine (direct access for "
        "benchmarks and debugging, without the router). Unset: off.",
    )
    model_path: Path | None = Field(
        default=None, description="Hugging Face-format checkpoint folder (reference engine)."
    )
    model_name: str = Field(default="shoal-tiny-moe", min_length=1, description="Name the model is served as.")
    device: str = Field(default="auto", description="cpu, cuda, cuda:N, or auto (cuda when present).")
    dtype: str = Field(default="float32", description="float32, bfloat16 or float16.")
    compute_threads: int = Field(
        default=0,
        ge=0,
        description="CPU threads of the engine's math (0: every core). Give each worker on a host its share.",
    )
    ep_size: int = Field(
        default=1, ge=1, le=1024, description="Ranks (processes) one model instance spans: expert parallelism."
    )
    ep_rank: int = Field(default=0, ge=0, description="This process's rank; rank 0 serves, the others follow it.")
    ep_master: str = Field(
        default="127.0.0.1:29511", description="host:port where the ranks of one instance meet (rank 0's host)."
    )
    ep_local_followers: bool = Field(
        default=False,
        description=(
            "Rank 0 starts ranks 1..ep_size-1 itself, as child processes beside it (one container per instance; "
            "on CUDA, rank r uses GPU r), and exits if one of them fails."
        ),
    )
    ep_redundant_slots: int = Field(
        default=0,
        ge=0,
        le=1024,
        description=(
            "Expert slots per rank beyond its share, for copies of hot experts (SGLang's redundant experts): "
            "filled at start with copies spread over the ranks, then moved onto the hottest experts by the "
            "controller's rebalancing."
        ),
    )
    node_name: str = Field(
        default="",
        description=(
            "The machine this rank runs on, for the instance's topology (the chart passes the Kubernetes node's "
            "name); empty: this host's name."
        ),
    )
    ep_join: bool = Field(
        default=False,
        description=(
            "Join a running instance as its new last rank (ep_rank = ep_size - 1): wait at ep_master, on this "
            "process's host, until the instance's ResizeExperts call regroups its ranks with this one."
        ),
    )
    block_size: int = Field(default=16, ge=1, le=1024, description="Tokens per KV-cache block.")
    kv_cache_bytes: int = Field(default=256 * 2**20, ge=2**20, description="Bytes preallocated for the paged KV cache.")
    decode_rows_bytes: int | None = Field(
        default=None,
        ge=0,
        description=(
            "Reference engine: memory for decoding requests' contexts kept in contiguous rows between steps, "
            "so a step does not copy them out of the KV cache again (docs/architecture.md). Default: as much as "
            "the KV cache on a CPU, none on a GPU."
        ),
    )
    max_running: int = Field(default=128, ge=1, description="Most requests decoded together in one step.")
    max_batch_tokens: int = Field(
        default=2048, ge=16, description="Token budget of one engine step (chunked prefill + decode)."
    )
    max_waiting: int = Field(
        default=1024,
        ge=1,
        description="Most requests queued before new ones are refused (RESOURCE_EXHAUSTED).",
    )
    heartbeat_interval_s: float = Field(default=1.0, gt=0, description="Seconds between lease renewals.")
    lease_ttl_s: float = Field(default=5.0, gt=0, description="Registry lease; lapses unless renewed.")
    gpu_type: str = Field(default="cpu", description="Hardware label reported to the controller (e.g. h100).")
    sim_profile: str = Field(default="cpu-reference", description="sim engine: performance profile name.")
    sim_speedup: float = Field(
        default=1.0, gt=0, description="sim engine: divide modelled step times by this (fast tests)."
    )
    sim_startup_delay_s: float = Field(default=0.0, ge=0, description="sim engine: simulated cold start.")
    sim_fail_rate: float = Field(
        default=0.0, ge=0, le=1, description="sim engine: fraction of requests failed on purpose."
    )
    sim_die_after: int = Field(
        default=0, ge=0, description="sim engine: exit the process after this many requests (0 = never)."
    )
    sim_stall_after: int = Field(
        default=0, ge=0, description="sim engine: stop making progress after this many requests (0 = never)."
    )

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value: str) -> str:
        if value not in {"float32", "bfloat16", "float16"}:
            raise ValueError("must be float32, bfloat16 or float16")
        return value

    @model_validator(mode="after")
    def _rank_in_group(self) -> WorkerSettings:
        if self.ep_rank >= self.ep_size:
            raise ValueError(f"ep_rank ({self.ep_rank}) must be below ep_size ({self.ep_size})")
        if self.ep_size > 1 and self.engine is not EngineKind.REFERENCE:
            raise ValueError("expert parallelism (ep_size > 1) needs the reference engine")
        if self.ep_redundant_slots and self.ep_size == 1:
            raise ValueError("ep_redundant_slots is for expert-parallel instances (ep_size > 1)")
        if self.ep_local_followers and (self.ep_rank or self.ep_size == 1 or self.ep_join):
            raise ValueError("ep_local_followers is for rank 0 of an instance of ep_size > 1 ranks")
        if self.ep_join and not 0 < self.ep_rank == self.ep_size - 1:
            raise ValueError("a joining rank (ep_join) is the new last rank: 0 < ep_rank = ep_size - 1")
        return self

    @model_validator(mode="after")
    def _lease_outlives_heartbeat(self) -> WorkerSettings:
        if self.lease_ttl_s <= 2 * self.heartbeat_interval_s:
            raise ValueError(
                f"lease_ttl_s ({self.lease_ttl_s}) must exceed twice heartbeat_interval_s "
                f"({self.heartbeat_interval_s}) so one late heartbeat does not drop the worker"
            )
        return self


class KVStoreSettings(GrpcServiceSettings):
    """The KV-cache block store."""

    model_config = SettingsConfigDict(env_prefix="SHOAL_KVSTORE_", extra="ignore", frozen=True)

    store_id: str = Field(default="kvstore-0", min_length=1, description="Publisher id in the KV event stream.")
    memory_bytes: int = Field(default=1 * 2**30, ge=2**20, description="Byte budget of the memory tier.")
    memory_path: Path = Field(
        default_factory=_default_shm,
        description="Folder (tmpfs) of the memory tier's shared-memory arena, which same-host clients read directly.",
    )
    local_access: bool = Field(
        default=True,
        description="Let same-host clients read the arena and write through a unix socket (else gRPC only).",
    )
    disk_path: Path | None = Field(
        default=None, description="Folder of the disk tier; unset disables it (evicted blocks are dropped)."
    )
    disk_bytes: int = Field(default=8 * 2**30, ge=0, description="Byte budget of the disk tier.")
    eviction: str = Field(default="lru", description="Eviction policy (shared/policies/eviction.py): lru, session-lru.")
    max_block_bytes: int = Field(
        default=16 * 2**20, ge=1024, description="Largest block accepted; larger ones get INVALID_ARGUMENT."
    )

    @field_validator("eviction")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        if value not in POLICIES:
            raise ValueError(f"must be one of {', '.join(POLICIES)}")
        return value

    @model_validator(mode="after")
    def _block_fits_memory(self) -> KVStoreSettings:
        if self.max_block_bytes > self.memory_bytes:
            raise ValueError(
                f"max_block_bytes ({self.max_block_bytes}) must not exceed memory_bytes ({self.memory_bytes}): "
                "every block passes through the memory tier"
            )
        return self


class RouterSettings(CommonSettings):
    """The OpenAI-compatible front."""

    model_config = SettingsConfigDict(env_prefix="SHOAL_ROUTER_", extra="ignore", frozen=True)

    host: str = Field(default="127.0.0.1", description="Interface the HTTP server binds to.")
    http_port: int = Field(default=8000, ge=0, le=65535, description="Port of the OpenAI API.")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "Static API keys without limits, for internal callers such as agent graphs (JSON list or "
            "comma-separated); users' keys, with limits, are made through the admin API."
        ),
    )
    routing_preset: str = Field(
        default="default",
        description=(
            "Routing profile by name: default, prefix-aware, hit-fraction, least-load, session-affinity, round-robin."
        ),
    )
    routing_config: Path | None = Field(
        default=None, description="YAML routing document (filters, scorers, picker); overrides routing_preset."
    )
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "Models served even when the admin API holds none (a router without a controller), as "
            "NAME=CHECKPOINT_FOLDER items (JSON list or comma-separated); the admin API's models are served besides."
        ),
    )
    block_size: int = Field(default=16, ge=1, le=1024, description="Tokens per KV block of those models' workers.")
    kvstore_address: str | None = Field(
        default=None, description="kvstore host:port for P/D hand-off and shared prefixes; unset disables both."
    )
    kvstore_id: str = Field(default="kvstore-0", min_length=1, description="The kvstore's publisher id in KV events.")
    pd_min_uncached_tokens: int = Field(
        default=256, ge=0, description="Prompts with at least this many uncached tokens go through prefill."
    )
    max_inflight: int = Field(
        default=4096, ge=1, description="Requests in flight before new ones get 429 with Retry-After."
    )
    request_timeout_s: float = Field(default=600.0, gt=0, description="Deadline of one request end to end.")
    kv_transfer_timeout_s: float = Field(
        default=10.0, gt=0, description="Deadline of a P/D KV hand-off before falling back to recompute."
    )
    stall_s: float = Field(
        default=10.0,
        gt=0,
        description=(
            "A worker holding requests in its engine that makes no progress (no engine step) for this long is "
            "stalled: its requests resume on other workers. Keep it above the longest engine step."
        ),
    )
    reuse_port: bool = Field(
        default=False,
        description="Share the HTTP port with other router processes on this host (SO_REUSEPORT): "
        "the kernel spreads connections over them.",
    )

    @classmethod
    def secret_fields(cls) -> tuple[str, ...]:
        return (*super().secret_fields(), "api_keys")

    @field_validator("routing_preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        if value not in PRESETS:
            raise ValueError(f"must be one of {', '.join(sorted(PRESETS))}")
        return value

    _split_keys = field_validator("api_keys", "models", mode="before")(_split_list)

    @field_validator("models")
    @classmethod
    def _named_folders(cls, value: list[str]) -> list[str]:
        for item in value:
            name, _, folder = item.partition("=")
            if not re.match(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$", name) or not folder:
                raise ValueError(f"models item {item!r} is not NAME=CHECKPOINT_FOLDER with a DNS-label NAME")
        return value

    def model_folders(self) -> list[tuple[str, Path]]:
        return [(item.partition("=")[0], Path(item.partition("=")[2])) for item in self.models]


class ControllerSettings(CommonSettings):
    """The controller: admin API, reconcile loop and Celery jobs."""

    model_config = SettingsConfigDict(env_prefix="SHOAL_CONTROLLER_", extra="ignore", frozen=True)

    host: str = Field(default="127.0.0.1", description="Interface the admin API binds to.")
    http_port: int = Field(default=8080, ge=0, le=65535, description="Port of the admin REST API.")
    admin_tokens: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Bearer tokens as token:role (role viewer, operator or admin), JSON list or comma-separated.",
    )
    reconcile_interval_s: float = Field(default=2.0, gt=0, description="Seconds between reconcile ticks.")
    actuator: str = Field(default="local", description="local (processes on this machine) or kubernetes.")
    celery_broker_url: str | None = Field(
        default=None,
        description="Celery broker and result backend (redis://...). Default: SHOAL_REDIS_URL with the next db number.",
    )
    bootstrap: Path | None = Field(
        default=None, description="YAML of models and pools to create at start when they do not exist yet."
    )
    kubernetes_namespace: str = Field(default="default", description="Namespace of the worker Deployments.")
    kubeconfig: Path | None = Field(
        default=None,
        description="kubeconfig file for a controller outside the cluster. Unset: the pod's service account.",
    )
    deployment_prefix: str = Field(
        default="shoal-worker-", description="Worker Deployment name = prefix + pool name (kubernetes actuator)."
    )
    job_lease_s: float = Field(
        default=30.0,
        gt=0,
        description="A job's runner holds it under a lease this long, renewed every third of it; a job whose "
        "lease lapsed (its Celery worker died) is resubmitted.",
    )
    expert_stats_interval_s: float = Field(
        default=15.0, gt=0, description="Seconds between samples of each expert-parallel instance's balance."
    )
    expert_rebalance_interval_s: float = Field(
        default=0.0,
        ge=0,
        description="Rebalance each expert-parallel instance at most this often (0: only when asked).",
    )
    expert_rebalance_min_gain: float = Field(
        default=0.02, ge=0, description="A scheduled rebalance runs only if it lowers mean balance by this much."
    )
    router_url: str | None = Field(
        default=None,
        description="The router's base URL (http://host:port) that agent graphs' LLM steps call. Unset: they fail.",
    )
    router_api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="The router's API keys (JSON list or comma-separated); graphs' LLM steps present the first.",
    )
    tool_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "Hosts agent graphs' HTTP tools may post to (JSON list or comma-separated): names, *.wildcards, "
            "addresses or networks. Empty: no HTTP tool runs. Internal addresses need an address entry."
        ),
    )
    rendezvous_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "Hosts besides an instance's own where a joining expert-parallel rank may wait (JSON list or "
            "comma-separated): the `master` of a resize must be one of them."
        ),
    )
    local_max_workers: int = Field(
        default=8,
        ge=0,
        description="local actuator: most worker processes on this host; pools asking for more wait for room.",
    )
    local_worker_tls_dir: Path | None = Field(
        default=None,
        description=(
            "local actuator: the worker certificate folder (SHOAL_TLS_DIR) of the workers it starts. Unset: the "
            "workers get none, so they start only with SHOAL_RPC_PLAINTEXT."
        ),
    )
    local_worker_redis_password: str | None = Field(
        default=None,
        description=(
            "local actuator: the password of the Redis user `worker`, which the workers it starts authenticate "
            "as. Unset: they use the controller's own Redis credentials."
        ),
    )

    @field_validator("actuator")
    @classmethod
    def _known_actuator(cls, value: str) -> str:
        if value not in {"local", "kubernetes"}:
            raise ValueError("must be local or kubernetes")
        return value

    @property
    def celery_url(self) -> str:
        if self.celery_broker_url:
            return self.celery_broker_url
        # The next database of the same server, with the same credentials and TLS options (the query).
        parts = urlsplit(self.redis_url)
        db = parts.path.strip("/") or "0"
        if parts.scheme in ("redis", "rediss") and db.isdigit():
            return urlunsplit(parts._replace(path=f"/{(int(db) + 1) % 16}"))
        return self.redis_url

    @classmethod
    def secret_fields(cls) -> tuple[str, ...]:
        return (*super().secret_fields(), "admin_tokens", "router_api_keys", "local_worker_redis_password")

    _split_tokens = field_validator("admin_tokens", "router_api_keys", "tool_hosts", "rendezvous_hosts", mode="before")(
        _split_list
    )

    @field_validator("admin_tokens")
    @classmethod
    def _roles(cls, value: list[str]) -> list[str]:
        for item in value:
            token, _, role = item.rpartition(":")
            if not token or role not in {"viewer", "operator", "admin"}:
                raise ValueError(
                    "each token must be written token:role with role viewer, operator or admin (e.g. s3cr3t:admin)"
                )
        return value


# Which settings class each runnable module reads: deployment files are checked against it.
SERVICE_SETTINGS: dict[str, type[CommonSettings]] = {
    "services.worker": WorkerSettings,
    "services.kvstore": KVStoreSettings,
    "services.router": RouterSettings,
    "services.controller": ControllerSettings,
    "services.controller.jobs": ControllerSettings,
}


def env_names(cls: type[CommonSettings]) -> set[str]:
    """Every environment variable `cls` reads."""
    return {env_name(cls, field) for field in cls.model_fields}
