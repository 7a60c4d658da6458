"""What the OpenAI endpoints hand to a backend (a Job) and get back (Chunks)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from shared.hashing import BlockHash
from shared.rpc.shoal.v1 import common_pb2


@dataclass(frozen=True, slots=True)
class Hints:
    """What a client says of a request beside its body: its session, a preferred pool, a pin."""

    session: str = ""
    # A placement preference (an agent graph's plan): serve from this pool while it has a serving worker.
    pool: str = ""
    # Seconds to keep the prompt's prefix pinned in the kvstore for the session (an agent's tool call).
    pin_s: int = 0


@dataclass
class Job:
    """A tokenized request ready to run."""

    request_id: str
    model: str
    prompt: list[int]
    sampling: common_pb2.SamplingParams
    # The prompt's block-hash chain (routing by cached prefix), and the block size it was cut with.
    hashes: list[BlockHash] = field(default_factory=list)
    block_size: int = 16
    session_id: str = ""
    pool: str = ""
    pin_s: int = 0
    deadline_s: float = 600.0
    # The caller's W3C trace context, carried to the worker with the request.
    trace_context: dict[str, str] = field(default_factory=dict)
    # How often the worker needs to send the request's tokens (0: each as it comes, for a stream).
    coalesce_ms: int = 0


@dataclass(slots=True)
class Chunk:
    """New text of a request; the last one carries the finish reason and usage."""

    text: str
    tokens: int
    finish: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    # One per new token when the request asked for logprobs.
    logprobs: Sequence[common_pb2.TokenLogprob] = ()
    # The choice it belongs to (a request with n > 1 has n).
    index: int = 0
