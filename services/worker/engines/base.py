"""The Engine contract the worker serves, and the records that cross it.

An engine turns requests (token ids + sampling parameters, optionally with
imported KV blocks) into streams of tokens, continuously batching them. Two
engines implement it: `reference` (PyTorch) and `sim` (a performance model).
Production engines (vLLM, SGLang) would be adapters behind the same Protocol,
so nothing here assumes the reference engine's internals.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from services.worker.engines.experts import ExpertMap
from shared.hashing import BlockHash
from shared.types.kv import KVBlock
from shared.types.workers import WorkerLoad

if TYPE_CHECKING:
    from outlines_core import Index

__all__ = ["KVBlock"]


class Finish(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass(frozen=True, slots=True)
class Sampling:
    """Validated sampling parameters (see shoal.v1.SamplingParams)."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logit_bias: tuple[tuple[int, float], ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    # Report each new token's log-probability with this many alternatives (None: do not).
    logprobs: int | None = None
    # Constrain the output to JSON matching this JSON Schema ("": no constraint).
    json_schema: str = ""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def shapes_logits(self) -> bool:
        """Whether the logits are changed before the choice (bias, penalties, a floor on length)."""
        return bool(
            self.logit_bias
            or self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.min_tokens
        )


@dataclass(slots=True)
class EngineRequest:
    request_id: str
    prompt: list[int]
    sampling: Sampling
    # Tokens produced earlier (by a prefill worker, or before a failover);
    # generation continues after them and they are not streamed again.
    resume: list[int] = field(default_factory=list)
    # KV of the prompt's leading full blocks, computed elsewhere.
    imported: list[KVBlock] = field(default_factory=list)
    # Return the prompt's full blocks with the final output (prefill for P/D).
    export_prompt_kv: bool = False
    # Characters of the resumed tokens' text the client already has (see OutputText).
    resume_text_chars: int = 0
    # sampling.json_schema compiled (Engine.compile_grammar); required when it is set.
    grammar: Index | None = None
    # Ending at its length, the request goes on elsewhere (a P/D prefill): text that may still change
    # with the next token (an incomplete character, a possible stop string) is left to the next worker.
    continues: bool = False


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A generated token's log-probability and the most likely (token, log-probability) at its position."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(slots=True)
class TokenOutput:
    """New tokens of one request since its previous output."""

    token_ids: list[int]
    text: str
    finish: Finish | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    # With export_prompt_kv, on the final output: the prompt's full blocks.
    exported: list[KVBlock] | None = None
    # One per token id when the request asked for logprobs.
    logprobs: list[TokenLogprob] = field(default_factory=list)


OutputSink = Callable[[TokenOutput | BaseException], None]
"""Receives one request's outputs in order, on the thread of the loop that submitted it; the last
call carries an output with `finish` set, or an exception."""


@dataclass(frozen=True, slots=True)
class ExpertLoad:
    """Routed tokens per (layer, logical expert) over `window_s` seconds."""

    window_s: float
    counts: list[list[int]]  # [layer][expert]
    map_version: int


class Engine(Protocol):
    """What the worker service needs from an inference engine.

    All methods are called from the worker's asyncio loop. `generate` returns
    an async iterator that ends after the output carrying `finish`.
    Implementations batch internally and are safe to call concurrently.
    """

    model_name: str
    block_size: int
    max_context: int
    vocab_size: int
    # Set to stop admitting new requests (running ones finish).
    draining: bool
    # Engine steps completed; it stops advancing when the engine stalls.
    step_count: int

    @property
    def idle(self) -> bool:
        """No request is running or waiting."""

    async def wait_idle(self, timeout_s: float | None = None) -> bool:
        """Wait until nothing runs or waits (or the timeout); returns whether idle."""

    async def start(self) -> None:
        """Load weights / allocate caches; return when ready to serve."""

    async def stop(self) -> None:
        """Abort everything still running and release resources."""

    def generate(self, request: EngineRequest) -> AsyncIterator[TokenOutput]:
        """Admit a request (raising InvalidArgument or Overloaded at once) and stream it."""

    async def compile_grammar(self, schema: str) -> Index:
        """Compile a JSON schema for requests' `grammar` (cached; InvalidArgument if it cannot be)."""

    def submit(self, request: EngineRequest, sink: OutputSink) -> None:
        """Admit a request as `generate` does, and hand its outputs to `sink` instead (no task or
        queue per request: the multiplexed Serve stream's path). Abort it with `abort`."""

    def abort(self, request_id: str) -> bool:
        """Stop a request; its stream ends with Finish.ABORT. False if unknown."""

    async def export_kv(self, hashes: list[BlockHash]) -> list[KVBlock]:
        """The leading blocks of `hashes` held in the prefix cache (stops at the first miss)."""

    def validate_imported(self, request: EngineRequest) -> None:
        """Raise InvalidArgument if imported blocks do not fit this model and prompt."""

    def load(self) -> WorkerLoad:
        """Current load (cheap; called on every heartbeat)."""

    def expert_load(self, window_s: float) -> ExpertLoad:
        """Per-layer, per-expert token counts over the recent window."""

    def drain_kv_events(self) -> list[tuple[str, BlockHash]]:
        """Prefix-cache events since the last call: ("add" | "remove", hash)."""

    def cached_hashes(self) -> list[BlockHash]:
        """Every block hash in the prefix cache now (for event-stream snapshots)."""

    def expert_parallel(self) -> ExpertParallel | None:
        """The live-migration side of an expert-parallel instance; None when one process holds every expert."""


class ExpertParallel(Protocol):
    """What an expert-parallel instance adds: its expert map, and changing it live. Each call that changes
    the instance runs between two engine steps, on every rank."""

    def expert_map(self) -> tuple[int, int, ExpertMap]:
        """(ranks, the nodes they span, the map served now)."""

    async def stage_experts(
        self, migration_id: str, target: ExpertMap, layers: list[int], from_peer: bool = False
    ) -> tuple[int, int]:
        """Load the copies the target map adds, beside the served ones: (copies, bytes) over all ranks."""

    async def commit_expert_map(self, migration_id: str, version: int) -> float:
        """Switch every rank to the staged map at one step boundary; returns the stall in seconds."""

    async def release_experts(self, migration_id: str, discard_staged: bool) -> tuple[int, int]:
        """Free copies no longer mapped, or discard an uncommitted migration's staged ones."""

    async def resize_experts(self, ranks: int, master: str) -> tuple[int, float]:
        """Regroup the ranks into one more (waiting at `master`) or one fewer: (KV bytes synced, stall seconds)."""
