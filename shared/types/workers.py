"""What the cluster knows about a worker: its identity and its latest load."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from shared.config.services import EngineKind, WorkerRole


class WorkerInfo(BaseModel):
    """A worker's identity and capacity, written at registration."""

    model_config = ConfigDict(frozen=True)

    worker_id: str
    address: str = Field(description="host:port of the Worker gRPC service")
    role: WorkerRole
    pool: str
    model: str
    engine: EngineKind
    gpu_type: str = "cpu"
    block_size: int = 16
    kv_blocks_total: int = 0
    max_running: int = 0
    max_waiting: int = 0
    metrics_address: str = ""
    # host:port of the worker's data channels (the routers' request stream).
    data_address: str = ""
    # host:port of the worker's own OpenAI API (SHOAL_WORKER_HTTP_PORT), when it serves one.
    http_address: str = ""
    started_at: float = 0.0
    # The worker's registry lease: a reader may trust its last entry this long after `updated_at`.
    lease_ttl_s: float = 0.0


class WorkerLoad(BaseModel):
    """A worker's load report (mirror of shoal.v1.LoadReport)."""

    model_config = ConfigDict(frozen=True)

    running_requests: int = 0
    waiting_requests: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    decode_tokens_per_s: float = 0.0
    prefill_tokens_per_s: float = 0.0
    draining: bool = False
    ttft_p90_s: float = 0.0
    tbt_p90_s: float = 0.0
    requests_finished: int = 0
    prompt_tokens_total: int = 0
    generated_tokens_total: int = 0
    cached_tokens_total: int = 0
    expert_map_version: int = 0

    @property
    def kv_usage(self) -> float:
        """Fraction of KV blocks in use, in [0, 1]."""
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


class WorkerRecord(BaseModel):
    """A registry entry as read back: identity, load, and the controller's marks."""

    model_config = ConfigDict(frozen=True)

    info: WorkerInfo
    load: WorkerLoad
    updated_at: float
    cordoned: bool = False

    @property
    def worker_id(self) -> str:
        return self.info.worker_id

    @property
    def schedulable(self) -> bool:
        """May receive new requests: neither draining nor cordoned."""
        return not (self.load.draining or self.cordoned)
