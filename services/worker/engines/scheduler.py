"""Continuous batching with chunked prefill and preemption (no tensors).

Each engine step the scheduler picks work under a token budget: first one
token for every running request that is decoding, and the next prompt chunk
of running requests still prefilling; then it admits waiting requests, in
arrival order, while the budget, the request cap and free KV blocks allow.
A request first reuses the longest cached prefix of its prompt (or KV
imported from elsewhere). When a running request needs a block and none is
free, the most recently admitted request is preempted: its blocks are
released (their named blocks stay cached) and it waits at the head of the
queue to be recomputed, keeping the tokens it already produced. Sampling is
seeded per position, so preemption never changes a request's tokens.

Shared by both engines; the executor does the compute. Single-threaded: only
the engine loop calls it.
"""

from __future__ import annotations

import enum
import itertools
import time
from collections import deque
from collections.abc import Callable, Mapping
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from services.worker.engines.base import EngineRequest, Finish, KVBlock, TokenLogprob
from services.worker.engines.blocks import BlockManager
from services.worker.engines.detokenize import OutputText
from services.worker.engines.grammar import Constraint
from shared.errors import InvalidArgument
from shared.hashing import BlockHash, BlockHasher


class State(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One request's state inside the engine."""

    request: EngineRequest
    tokens: list[int]
    num_prompt: int
    output: OutputText
    arrival: float
    hashes: list[BlockHash]
    state: State = State.WAITING
    block_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    num_cached: int = 0
    admitted: bool = False
    pending: list[int] = field(default_factory=list)  # tokens not yet handed out
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)  # theirs, when the request asked
    finish: Finish | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    exported: list[KVBlock] | None = None
    constraint: Constraint | None = None  # with a JSON schema: the tokens allowed next
    # Unique in this process (request ids may repeat): executors key what they keep per sequence by it.
    serial: int = field(default_factory=itertools.count().__next__)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_generated(self) -> int:
        """Output tokens so far, resumed ones included."""
        return len(self.tokens) - self.num_prompt


@dataclass(frozen=True, slots=True)
class Item:
    """Compute `length` tokens of `seq` from position `start`; sample the next if `sample`."""

    seq: Sequence
    start: int
    length: int
    sample: bool


@dataclass
class SchedulerConfig:
    max_running: int
    max_batch_tokens: int
    max_waiting: int
    max_context: int
    eos_token_ids: tuple[int, ...]


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        blocks: BlockManager,
        hasher: BlockHasher,
        write_block: Callable[[int, KVBlock], None],
    ) -> None:
        self.config = config
        self.blocks = blocks
        self.hasher = hasher
        self._write_block = write_block
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    @property
    def block_size(self) -> int:
        return self.blocks.block_size

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def check_fits(self, prompt_len: int, max_tokens: int) -> None:
        """Refuse a request that could never run on this engine."""
        if prompt_len >= self.config.max_context:
            raise InvalidArgument(
                f"prompt has {prompt_len} tokens; this model's context holds {self.config.max_context}",
                param="prompt",
            )
        total = min(prompt_len + max_tokens, self.config.max_context)
        if self.blocks_for(total) > self.blocks.num_blocks:
            raise InvalidArgument(
                f"request needs {self.blocks_for(total)} KV blocks; the worker holds {self.blocks.num_blocks}",
                param="max_tokens",
            )

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- scheduling -----------------------------------------------------------

    def schedule(self) -> list[Item]:
        """Pick this step's work (see module doc)."""
        budget = self.config.max_batch_tokens
        items: list[Item] = []
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            length = min(len(seq.tokens) - seq.num_computed, budget)
            if not self._reserve(seq, seq.num_computed + length):
                continue  # seq itself was preempted; the list shrank
            items.append(Item(seq, seq.num_computed, length, seq.num_computed + length == len(seq.tokens)))
            budget -= length
            index += 1
        while self.waiting and budget > 0 and len(self.running) < self.config.max_running:
            item = self._admit(self.waiting[0], budget)
            if item is None:
                break
            self.waiting.popleft()
            self.running.append(item.seq)
            items.append(item)
            budget -= item.length
        return items

    def _reserve(self, seq: Sequence, upto: int) -> bool:
        """Hold blocks for positions < upto, preempting later requests if needed."""
        while len(seq.block_ids) < self.blocks_for(upto):
            block = self.blocks.allocate()
            if block is not None:
                seq.block_ids.append(block)
                continue
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    def _admit(self, seq: Sequence, budget: int) -> Item | None:
        if not seq.admitted:
            self._import(seq)
        if seq.num_computed == 0:
            self._reuse_prefix(seq)
        length = min(len(seq.tokens) - seq.num_computed, budget)
        need = self.blocks_for(seq.num_computed + length) - len(seq.block_ids)
        # Keep a block per running request in reserve so an admission does not
        # force a preemption at their next block boundary; a request alone on
        # the engine only needs its own blocks.
        if need + len(self.running) > self.blocks.num_available and (self.running or need > self.blocks.num_available):
            # A request that waits holds nothing: the cached prefix it found stays evictable for the
            # requests ahead of it, and it looks again at its next turn.
            self._let_go(seq)
            return None
        for _ in range(need):
            block = self.blocks.allocate()
            assert block is not None
            seq.block_ids.append(block)
        seq.state = State.RUNNING
        seq.admitted = True
        return Item(seq, seq.num_computed, length, seq.num_computed + length == len(seq.tokens))

    def _let_go(self, seq: Sequence) -> None:
        self.blocks.release(seq.block_ids)
        seq.block_ids = []
        seq.num_computed = 0

    def _cacheable_blocks(self, seq: Sequence) -> int:
        # At least one token is always computed, to produce the next token's logits.
        return (len(seq.tokens) - 1) // self.block_size

    def _reuse_prefix(self, seq: Sequence) -> None:
        matched = self.blocks.match_prefix(seq.hashes[: self._cacheable_blocks(seq)])
        self.blocks.hold(matched)
        seq.block_ids = list(matched)
        seq.num_computed = len(matched) * self.block_size
        if not seq.admitted:
            seq.num_cached = seq.num_computed

    def _import(self, seq: Sequence) -> None:
        """Copy imported KV blocks into the cache and name them (first admission only)."""
        usable = seq.request.imported[: self._cacheable_blocks(seq)]
        for block in usable:
            if self.blocks.lookup(block.hash) is not None:
                continue
            block_id = self.blocks.allocate()
            if block_id is None:
                break  # no room: the rest is recomputed
            self._write_block(block_id, block)
            self.blocks.register(block_id, block.hash)
            self.blocks.release([block_id])
        seq.request.imported = []

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._let_go(seq)
        seq.state = State.WAITING
        self.waiting.appendleft(seq)
        self.preemptions += 1

    # -- after the step -------------------------------------------------------

    def complete(
        self, items: Seq[Item], sampled: Seq[int | None], logprobs: Mapping[int, TokenLogprob] | None = None
    ) -> None:
        """Advance each item's sequence by its computed chunk and sampled token (and that token's
        log-probability, from `logprobs` by item index, where the request asked)."""
        for index, (item, token) in enumerate(zip(items, sampled, strict=True)):
            seq = item.seq
            if seq.state is not State.RUNNING:
                continue
            seq.num_computed = item.start + item.length
            self._register_full_blocks(seq)
            if token is None:
                continue
            seq.tokens.append(token)
            seq.pending.append(token)
            if logprobs and index in logprobs:
                seq.pending_logprobs.append(logprobs[index])
            if seq.constraint is not None:
                seq.constraint.advance(token)
            if len(seq.tokens) % self.block_size == 0:
                parent = seq.hashes[-1] if seq.hashes else self.hasher.seed
                seq.hashes.extend(self.hasher.extend(parent, seq.tokens[-self.block_size :]))
            seq.output.add([token])
            self._check_finish(seq, token)

    def _register_full_blocks(self, seq: Sequence) -> None:
        full = min(seq.num_computed // self.block_size, len(seq.hashes))
        for index in range(full):
            self.blocks.register(seq.block_ids[index], seq.hashes[index])

    def _check_finish(self, seq: Sequence, token: int) -> None:
        sampling = seq.request.sampling
        if (
            (not sampling.ignore_eos and token in self.config.eos_token_ids)
            or token in sampling.stop_token_ids
            or seq.output.stopped
            or (seq.constraint is not None and seq.constraint.complete)
        ):
            seq.finish = Finish.STOP
        elif seq.num_generated >= sampling.max_tokens or len(seq.tokens) >= self.config.max_context:
            seq.finish = Finish.LENGTH

    def finish(self, seq: Sequence, reason: Finish | None = None) -> None:
        """Remove a finished (or aborted) sequence and release its blocks."""
        if reason is not None:
            seq.finish = reason
        if seq.state is State.RUNNING:
            self.running.remove(seq)
            self.blocks.release(seq.block_ids)
        elif seq.state is State.WAITING:
            self.waiting.remove(seq)
            if seq.block_ids:
                self.blocks.release(seq.block_ids)
        seq.block_ids = []
        seq.state = State.FINISHED

    def new_sequence(self, request: EngineRequest, output: OutputText, now: float | None = None) -> Sequence:
        tokens = list(request.prompt) + list(request.resume)
        return Sequence(
            request=request,
            tokens=tokens,
            num_prompt=len(request.prompt),
            output=output,
            arrival=time.monotonic() if now is None else now,
            hashes=self.hasher.hashes(tokens),
        )
