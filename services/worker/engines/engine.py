"""The batching engine: a scheduler and an executor driven by one thread.

`BatchingEngine` implements the Engine Protocol for any `Executor` (the
PyTorch model, or the performance model of the sim engine). A dedicated
thread loops: take new requests and aborts, schedule a step, execute it,
advance the sequences, and hand each request's new tokens to the asyncio
loop that is streaming it. Work that must not overlap a step (reading KV for
export, switching the expert map) is queued with `call_between_steps` and
runs on the engine thread between two steps.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from contextlib import suppress
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np
from outlines_core import Index

from services.worker.engines.base import (
    EngineRequest,
    ExpertLoad,
    Finish,
    KVBlock,
    OutputSink,
    TokenLogprob,
    TokenOutput,
)
from services.worker.engines.blocks import BlockManager
from services.worker.engines.detokenize import Detokenizer, OutputText
from services.worker.engines.experts import ExpertMap
from services.worker.engines.grammar import Constraint, Grammars
from services.worker.engines.scheduler import Item, Scheduler, SchedulerConfig, Sequence, State
from services.worker.engines.stats import ExpertLoadWindow, QuantileWindow, RateWindow
from services.worker.engines.tokenizer import HFTokenizer
from shared.errors import FailedPrecondition, InvalidArgument, Overloaded, Unavailable
from shared.hashing import BlockHash, BlockHasher
from shared.telemetry.logging import get_logger
from shared.types.workers import WorkerLoad

log = get_logger("shoal.worker.engine")

T = TypeVar("T")


@dataclass
class StepResult:
    # One entry per scheduled item: the sampled token, or None (prompt chunk).
    tokens: list[int | None]
    # Routed tokens per [layer, expert] in this step, if the model has experts.
    expert_counts: np.ndarray | None = None
    # Items (by index) that failed; their requests end with this message.
    errors: dict[int, str] = field(default_factory=dict)
    # Items (by index) whose request asked for logprobs: the sampled token's.
    logprobs: dict[int, TokenLogprob] = field(default_factory=dict)


class Executor(Protocol):
    """Computes engine steps. Called only from the engine thread."""

    model_name: str
    max_context: int
    vocab_size: int
    num_layers: int
    num_experts: int
    eos_token_ids: tuple[int, ...]

    @property
    def tokenizer(self) -> Detokenizer:
        """Turns generated token ids into text."""

    def load(self) -> None:
        """Load weights (blocking); called once before the first step."""

    def allocate_kv(self, kv_cache_bytes: int, block_size: int) -> int:
        """Preallocate the KV cache within the byte budget; returns the block count."""

    def execute(self, items: list[Item]) -> StepResult:
        """Run one step over the scheduled items."""

    def read_block(self, block_id: int, block_hash: BlockHash) -> KVBlock:
        """Serialize one cached block (header + payload)."""

    def write_block(self, block_id: int, block: KVBlock) -> None:
        """Copy a validated imported block into the cache."""

    def validate_block(self, block: KVBlock) -> None:
        """Raise InvalidArgument if the block does not fit this model or is corrupt."""

    def map_version(self) -> int:
        """Version of the expert map the executor serves with."""

    def close(self) -> None:
        """Release what the executor holds beyond memory (e.g. the ranks it leads). Engine thread, last."""


@runtime_checkable
class MigratableExecutor(Protocol):
    """An executor spread over ranks whose expert map can change live (reference/parallel.py)."""

    world_size: int
    nodes: int
    expert_map: ExpertMap

    def stage(
        self, migration_id: str, target: ExpertMap, layers: list[int], from_peer: bool = False
    ) -> tuple[int, int]: ...

    def commit(self, migration_id: str, version: int) -> None: ...

    def release(self, migration_id: str, discard_staged: bool) -> tuple[int, int]: ...

    def check_joiner(self, ranks: int, master: str) -> None: ...

    def resize(self, ranks: int, master: str, blocks: list[int]) -> int: ...


@dataclass
class EngineLimits:
    block_size: int
    kv_cache_bytes: int
    max_running: int
    max_batch_tokens: int
    max_waiting: int


class _Stream:
    """The asyncio side of one request: where the engine thread hands its outputs."""

    __slots__ = ("loop", "sink")

    def __init__(self, loop: asyncio.AbstractEventLoop, sink: OutputSink) -> None:
        self.loop = loop
        self.sink = sink


class BatchingEngine:
    """Engine Protocol implementation over an Executor (see module doc)."""

    def __init__(self, executor: Executor, limits: EngineLimits, observer: EngineObserver | None = None) -> None:
        self.executor = executor
        self.limits = limits
        self.model_name = executor.model_name
        self.block_size = limits.block_size
        self.max_context = executor.max_context
        self.vocab_size = executor.vocab_size
        self.observer = observer or EngineObserver()
        self.hasher = BlockHasher(executor.model_name, limits.block_size)
        self._scheduler: Scheduler | None = None
        self._cv = threading.Condition()
        self._inbox: list[Sequence] = []
        self._aborts: list[str] = []
        self._calls: list[tuple[Callable[[], Any], Future[Any]]] = []
        self._streams: dict[str, _Stream] = {}
        self._seqs: dict[str, Sequence] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._failed: BaseException | None = None
        self.step_count = 0
        self.decode_rate = RateWindow()
        self.prefill_rate = RateWindow()
        self.ttft = QuantileWindow()
        self.tbt = QuantileWindow()
        self.expert_window = ExpertLoadWindow(max(executor.num_layers, 1), max(executor.num_experts, 1))
        self.requests_finished = 0
        self.prompt_tokens_total = 0
        self.generated_tokens_total = 0
        self.cached_tokens_total = 0
        self.draining = False
        self._grammars: Grammars | None = None

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Start the engine thread; it loads the model, then serves steps."""
        ready: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="engine", daemon=True)
        self._thread.start()
        await asyncio.wrap_future(ready)
        log.info("engine ready", model=self.model_name, kv_blocks=self.scheduler.blocks.num_blocks)

    def _prepare(self) -> None:
        self.executor.load()
        num_blocks = self.executor.allocate_kv(self.limits.kv_cache_bytes, self.limits.block_size)
        config = SchedulerConfig(
            max_running=self.limits.max_running,
            max_batch_tokens=self.limits.max_batch_tokens,
            max_waiting=self.limits.max_waiting,
            max_context=self.executor.max_context,
            eos_token_ids=self.executor.eos_token_ids,
        )
        blocks = BlockManager(num_blocks, self.limits.block_size)
        self._scheduler = Scheduler(config, blocks, self.hasher, self.executor.write_block)

    async def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)

    @property
    def scheduler(self) -> Scheduler:
        if self._scheduler is None:
            raise Unavailable("engine is not started")
        return self._scheduler

    # -- requests -------------------------------------------------------------

    def validate_imported(self, request: EngineRequest) -> None:
        expected = self.hasher.hashes(request.prompt)
        for index, block in enumerate(request.imported):
            if index >= len(expected) or block.hash != expected[index]:
                raise InvalidArgument(
                    f"imported KV block {index} does not belong to this prompt (hash chain mismatch)",
                    param="kv_source",
                )
            self.executor.validate_block(block)

    def submit(self, request: EngineRequest, sink: OutputSink) -> None:
        """Admit a request (raising InvalidArgument or Overloaded at once) and hand its outputs to
        `sink` on the calling loop's thread. Cheaper than `generate` per request: no task, no queue."""
        scheduler = self.scheduler
        if self._failed is not None:
            raise Unavailable(f"engine failed: {self._failed}")
        if self.draining:
            raise Unavailable("worker is draining and admits no new requests")
        if request.request_id in self._seqs:
            raise InvalidArgument(f"request id {request.request_id!r} is already running", param="request_id")
        if len(scheduler.waiting) + len(self._inbox) >= self.limits.max_waiting:
            raise Overloaded(f"{self.limits.max_waiting} requests already queued", retry_after_s=1.0)
        scheduler.check_fits(len(request.prompt) + len(request.resume), request.sampling.max_tokens)
        self.validate_imported(request)
        if not request.sampling.greedy and request.sampling.seed is None:
            # A fixed seed per request keeps its tokens identical across preemption.
            request.sampling = replace(request.sampling, seed=random.getrandbits(63))
        output = OutputText(
            self.executor.tokenizer, request.prompt, request.resume, request.sampling.stop, request.resume_text_chars
        )
        constraint = self._constraint(request)
        seq = scheduler.new_sequence(request, output)
        seq.constraint = constraint
        self._streams[request.request_id] = _Stream(asyncio.get_running_loop(), sink)
        self._seqs[request.request_id] = seq
        with self._cv:
            self._inbox.append(seq)
            self._cv.notify()

    async def compile_grammar(self, schema: str) -> Index:
        """The index of a JSON schema, for `EngineRequest.grammar` (InvalidArgument if it cannot be
        compiled in time)."""
        return await self._grammar_book().index(schema)

    def _grammar_book(self) -> Grammars:
        if self._grammars is None:
            tokenizer = self.executor.tokenizer
            if not isinstance(tokenizer, HFTokenizer) or not self.executor.eos_token_ids:
                raise InvalidArgument(
                    "this engine has no vocabulary and end-of-sequence token to constrain output with",
                    param="response_format",
                )
            self._grammars = Grammars(tokenizer.tokenizer, self.executor.eos_token_ids[0], self.executor.vocab_size)
        return self._grammars

    def _constraint(self, request: EngineRequest) -> Constraint | None:
        if not request.sampling.json_schema:
            return None
        if request.grammar is None:
            raise FailedPrecondition("a request with a JSON schema needs its compiled grammar (compile_grammar)")
        return self._grammar_book().constraint(request.grammar, request.resume)

    def generate(self, request: EngineRequest) -> AsyncIterator[TokenOutput]:
        queue: asyncio.Queue[TokenOutput | BaseException] = asyncio.Queue()
        self.submit(request, queue.put_nowait)
        return self._consume(request.request_id, queue)

    async def _consume(
        self, request_id: str, queue: asyncio.Queue[TokenOutput | BaseException]
    ) -> AsyncIterator[TokenOutput]:
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish is not None:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> bool:
        if request_id not in self._seqs:
            return False
        with self._cv:
            self._aborts.append(request_id)
            self._cv.notify()
        return True

    def call_between_steps(self, fn: Callable[[], T]) -> Future[T]:
        """Run `fn` on the engine thread between two steps."""
        future: Future[T] = Future()
        with self._cv:
            self._calls.append((fn, future))
            self._cv.notify()
        return future

    def expert_parallel(self) -> ExpertParallelControl | None:
        executor = self.executor
        return ExpertParallelControl(self, executor) if isinstance(executor, MigratableExecutor) else None

    async def export_kv(self, hashes: list[BlockHash]) -> list[KVBlock]:
        def read() -> list[KVBlock]:
            blocks = self.scheduler.blocks
            out: list[KVBlock] = []
            for block_hash in hashes:
                block_id = blocks.lookup(block_hash)
                if block_id is None:
                    break
                out.append(self.executor.read_block(block_id, block_hash))
            return out

        return await asyncio.wrap_future(self.call_between_steps(read))

    # -- reports --------------------------------------------------------------

    def load(self) -> WorkerLoad:
        scheduler = self._scheduler
        blocks = scheduler.blocks if scheduler else None
        return WorkerLoad(
            running_requests=len(scheduler.running) if scheduler else 0,
            waiting_requests=(len(scheduler.waiting) if scheduler else 0) + len(self._inbox),
            kv_blocks_used=blocks.num_used if blocks else 0,
            kv_blocks_total=blocks.num_blocks if blocks else 0,
            decode_tokens_per_s=self.decode_rate.rate(),
            prefill_tokens_per_s=self.prefill_rate.rate(),
            draining=self.draining,
            ttft_p90_s=self.ttft.quantile(0.9),
            tbt_p90_s=self.tbt.quantile(0.9),
            requests_finished=self.requests_finished,
            prompt_tokens_total=self.prompt_tokens_total,
            generated_tokens_total=self.generated_tokens_total,
            cached_tokens_total=self.cached_tokens_total,
            expert_map_version=self.executor.map_version(),
        )

    def expert_load(self, window_s: float) -> ExpertLoad:
        totals, span = self.expert_window.totals(window_s)
        return ExpertLoad(span, totals.tolist(), self.executor.map_version())

    def drain_kv_events(self) -> list[tuple[str, BlockHash]]:
        return self.scheduler.blocks.drain_events() if self._scheduler else []

    def cached_hashes(self) -> list[BlockHash]:
        return self.scheduler.blocks.cached_hashes() if self._scheduler else []

    @property
    def idle(self) -> bool:
        return not self._seqs

    async def wait_idle(self, timeout_s: float | None = None) -> bool:
        """Wait until no request runs or waits (or the timeout); returns `idle`."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        # The engine thread has no event to await; a short poll is cheap here.
        while not self.idle and (deadline is None or loop.time() < deadline):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        return self.idle

    # -- the engine thread ----------------------------------------------------

    def _run(self, ready: Future[None]) -> None:
        try:
            self._prepare()
        except BaseException as exc:
            ready.set_exception(exc)
            return
        ready.set_result(None)
        try:
            while self._next_step():
                pass
        except BaseException as exc:  # the engine is dead: fail every stream clearly
            log.exception("engine loop failed")
            self._failed = exc
            error = Unavailable(f"engine failed: {type(exc).__name__}: {exc}")
            for seq in list(self._seqs.values()):
                self._deliver([(seq, None)], error)
        finally:
            for seq in list(self._seqs.values()):
                if seq.state is not State.FINISHED:
                    self.scheduler.finish(seq, Finish.ABORT)
                    self._deliver([(seq, self._final_output(seq))])
            self.executor.close()

    def _next_step(self) -> bool:
        scheduler = self.scheduler
        with self._cv:
            while not (self._inbox or self._aborts or self._calls or scheduler.has_work or self._stopping):
                self._cv.wait()
            if self._stopping:
                return False
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, []
            calls, self._calls = self._calls, []
        for fn, future in calls:
            try:
                future.set_result(fn())
            except Exception as exc:
                future.set_exception(exc)
        for seq in inbox:
            scheduler.add(seq)
        outputs: list[tuple[Sequence, TokenOutput | None]] = []
        for request_id in aborts:
            aborted = self._seqs.get(request_id)
            if aborted is not None and aborted.state is not State.FINISHED:
                scheduler.finish(aborted, Finish.ABORT)
                outputs.append((aborted, self._final_output(aborted)))
        items = scheduler.schedule()
        if items:
            outputs.extend(self._step(items))
        elif scheduler.has_work and not outputs:
            # Everything waits on blocks held by requests being aborted; yield briefly.
            time.sleep(0.001)
        if outputs:
            self._deliver(outputs)
        return True

    def _step(self, items: list[Item]) -> list[tuple[Sequence, TokenOutput | None]]:
        scheduler = self.scheduler
        started = time.monotonic()
        result = self.executor.execute(items)
        now = time.monotonic()
        self.step_count += 1
        scheduler.complete(items, result.tokens, result.logprobs)
        prefill_tokens = sum(item.length for item in items if not item.sample or item.length > 1)
        decoded = sum(1 for token in result.tokens if token is not None)
        self.prefill_rate.add(prefill_tokens, now)
        self.decode_rate.add(decoded, now)
        if result.expert_counts is not None:
            self.expert_window.add(result.expert_counts, now)
        self.observer.on_step(now - started, len(items), prefill_tokens, decoded)
        outputs: list[tuple[Sequence, TokenOutput | None]] = []
        for index, message in result.errors.items():
            seq = items[index].seq
            if seq.state is not State.FINISHED:
                scheduler.finish(seq, Finish.ABORT)
                self._deliver([(seq, None)], Unavailable(message))
        for item, token in zip(items, result.tokens, strict=True):
            seq = item.seq
            if token is None or seq.state is State.FINISHED:
                continue
            if seq.first_token_at is None:
                seq.first_token_at = now
                self.ttft.add(now - seq.arrival)
                self.observer.on_first_token(now - seq.arrival)
            elif seq.last_token_at is not None:
                self.tbt.add(now - seq.last_token_at)
                self.observer.on_token_gap(now - seq.last_token_at)
            seq.last_token_at = now
            if seq.finish is not None:
                if seq.request.export_prompt_kv:
                    seq.exported = self._export_prompt(seq)
                scheduler.finish(seq)
                outputs.append((seq, self._final_output(seq)))
            else:
                token_ids, logprobs = self._take_pending(seq)
                outputs.append((seq, TokenOutput(token_ids, seq.output.take(final=False), logprobs=logprobs)))
        return outputs

    def _export_prompt(self, seq: Sequence) -> list[KVBlock]:
        full = len(seq.request.prompt) // self.block_size
        return [
            self.executor.read_block(seq.block_ids[index], seq.hashes[index])
            for index in range(min(full, len(seq.block_ids)))
        ]

    def _final_output(self, seq: Sequence) -> TokenOutput:
        self.requests_finished += 1
        self.prompt_tokens_total += seq.num_prompt
        self.cached_tokens_total += seq.num_cached
        generated = seq.num_generated - len(seq.request.resume)
        self.generated_tokens_total += generated
        self.observer.on_finish(seq.finish or Finish.ABORT, seq.num_prompt, generated, seq.num_cached)
        token_ids, logprobs = self._take_pending(seq)
        return TokenOutput(
            token_ids=token_ids,
            logprobs=logprobs,
            text=seq.output.take(final=not (seq.request.continues and seq.finish is Finish.LENGTH)),
            finish=seq.finish,
            prompt_tokens=seq.num_prompt,
            completion_tokens=seq.num_generated,
            cached_tokens=seq.num_cached,
            exported=seq.exported,
        )

    @staticmethod
    def _take_pending(seq: Sequence) -> tuple[list[int], list[TokenLogprob]]:
        taken = seq.pending, seq.pending_logprobs
        seq.pending, seq.pending_logprobs = [], []
        return taken

    def _deliver(self, outputs: list[tuple[Sequence, TokenOutput | None]], error: BaseException | None = None) -> None:
        """Hand outputs to the asyncio loops streaming them (from the engine thread)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, TokenOutput | BaseException]]] = {}
        for seq, output in outputs:
            request_id = seq.request_id
            stream = self._streams.get(request_id)
            item: TokenOutput | BaseException | None = error if error is not None else output
            if stream is None or item is None:
                continue
            if error is not None or (isinstance(item, TokenOutput) and item.finish is not None):
                self._streams.pop(request_id, None)
                self._seqs.pop(request_id, None)
            by_loop.setdefault(stream.loop, []).append((stream, item))
        for loop, batch in by_loop.items():
            with suppress(RuntimeError):  # a closed loop: its consumers are gone
                loop.call_soon_threadsafe(_put_all, batch)


def _put_all(batch: list[tuple[_Stream, TokenOutput | BaseException]]) -> None:
    for stream, item in batch:
        stream.sink(item)


class EngineObserver:
    """Hooks for metrics, called on the engine thread. The default does nothing."""

    def on_step(self, seconds: float, items: int, prefill_tokens: int, decode_tokens: int) -> None:
        """One engine step finished."""

    def on_first_token(self, seconds: float) -> None:
        """A request produced its first token, `seconds` after it arrived."""

    def on_token_gap(self, seconds: float) -> None:
        """A request produced a token `seconds` after its previous one."""

    def on_finish(self, finish: Finish, prompt_tokens: int, generated_tokens: int, cached_tokens: int) -> None:
        """A request finished."""


class ExpertParallelControl:
    """Live expert migration of an engine whose executor spans ranks: each call runs between two steps."""

    def __init__(self, engine: BatchingEngine, executor: MigratableExecutor) -> None:
        self._engine = engine
        self._executor = executor

    def expert_map(self) -> tuple[int, int, ExpertMap]:
        return self._executor.world_size, self._executor.nodes, self._executor.expert_map

    async def stage_experts(
        self, migration_id: str, target: ExpertMap, layers: list[int], from_peer: bool = False
    ) -> tuple[int, int]:
        executor = self._executor
        return await asyncio.wrap_future(
            self._engine.call_between_steps(lambda: executor.stage(migration_id, target, layers, from_peer))
        )

    async def commit_expert_map(self, migration_id: str, version: int) -> float:
        """Switch the map; returns how long serving stood still for it (seconds)."""

        def commit() -> float:
            started = time.perf_counter()
            self._executor.commit(migration_id, version)
            return time.perf_counter() - started

        return await asyncio.wrap_future(self._engine.call_between_steps(commit))

    async def release_experts(self, migration_id: str, discard_staged: bool) -> tuple[int, int]:
        executor = self._executor
        return await asyncio.wrap_future(
            self._engine.call_between_steps(lambda: executor.release(migration_id, discard_staged))
        )

    async def resize_experts(self, ranks: int, master: str) -> tuple[int, float]:
        """Regroup the instance into `ranks` ranks: (KV bytes sent to a joining rank, seconds serving paused)."""
        executor = self._executor
        await asyncio.to_thread(executor.check_joiner, ranks, master)  # a missing joiner must not pause serving

        def resize() -> tuple[int, float]:
            started = time.perf_counter()
            sent = executor.resize(ranks, master, self._engine.scheduler.blocks.in_use())
            return sent, time.perf_counter() - started

        return await asyncio.wrap_future(self._engine.call_between_steps(resize))
