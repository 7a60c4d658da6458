"""The sim engine's executor: no tensors, step times from the performance model.

It behaves like the reference engine to everything around it — the same
scheduler, paged blocks, prefix cache, KV export/import (with small stand-in
payloads) and load reports — but a step sleeps for the time the performance
profile predicts instead of computing. Tokens are pseudo-random printable
bytes, deterministic per (request, position), so greedy requests repeat.
It also produces skewed, drifting expert-load statistics and can inject
failures (fail some requests, die, or stall) for control-plane tests.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass

import numpy as np

from services.worker.engines.base import KVBlock, TokenLogprob
from services.worker.engines.detokenize import Detokenizer
from services.worker.engines.engine import StepResult
from services.worker.engines.kvformat import KVGeometry, check_block, encode_block
from services.worker.engines.scheduler import Item
from services.worker.engines.seeds import position_seed
from shared.expertload import ExpertLoadModel
from shared.hashing import BlockHash
from shared.perfmodel import PerfProfile

# Printable ASCII in the tiny model's byte-level vocabulary (ids 16 + byte).
_FIRST_TOKEN = 16 + ord(" ")
_TOKEN_SPAN = ord("~") - ord(" ") + 1
# Stand-in KV payload per block: enough bytes to exercise transfers and checksums.
_SIM_HEAD_DIM = 16


class ByteDetokenizer:
    """Text of token ids in the byte-level vocabulary (ids 16 + byte)."""

    def decode(self, ids: list[int]) -> str:
        return bytes(i - 16 for i in ids if 16 <= i < 272).decode("utf-8", errors="replace")


@dataclass
class FailureInjection:
    fail_rate: float = 0.0
    die_after: int = 0
    stall_after: int = 0
    seed: int = 0


class SimExecutor:
    """Executor Protocol implementation driven by a PerfProfile (see module doc)."""

    def __init__(
        self,
        profile: PerfProfile,
        model_name: str,
        speedup: float = 1.0,
        startup_delay_s: float = 0.0,
        failures: FailureInjection | None = None,
        tokenizer: Detokenizer | None = None,
        num_layers: int = 4,
        num_experts: int = 8,
        max_context: int = 4096,
    ) -> None:
        self.profile = profile
        self.model_name = model_name
        self.speedup = speedup
        self.startup_delay_s = startup_delay_s
        self.failures = failures or FailureInjection()
        self.tokenizer: Detokenizer = tokenizer or ByteDetokenizer()
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.max_context = max_context
        self.vocab_size = 320
        self.eos_token_ids: tuple[int, ...] = (2,)
        self.experts = ExpertLoadModel(num_layers, num_experts, top_k=2, seed=self.failures.seed)
        self.geometry: KVGeometry | None = None
        self._payloads: dict[int, bytes | bytearray] = {}
        self._seen: set[str] = set()
        self._rng = np.random.default_rng(self.failures.seed)
        self._stalled = False

    def load(self) -> None:
        time.sleep(self.startup_delay_s)

    def allocate_kv(self, kv_cache_bytes: int, block_size: int) -> int:
        self.geometry = KVGeometry(
            model=self.model_name,
            layers=self.num_layers,
            kv_heads=1,
            head_dim=_SIM_HEAD_DIM,
            block_size=1,
            dtype="sim",
            itemsize=2,
        )
        capacity = min(kv_cache_bytes, self.profile.kv_capacity_bytes)
        return max(1, capacity // (self.profile.kv_bytes_per_token * block_size))

    def map_version(self) -> int:
        return 0

    def close(self) -> None:
        pass  # nothing beyond memory

    def read_block(self, block_id: int, block_hash: BlockHash) -> KVBlock:
        assert self.geometry is not None
        size = self.geometry.payload_bytes
        payload = self._payloads.get(block_id)
        if payload is None:
            payload = (hashlib.blake2b(block_hash).digest() * (size // 64 + 1))[:size]
        return encode_block(self.geometry, block_hash, payload)

    def validate_block(self, block: KVBlock) -> None:
        assert self.geometry is not None
        check_block(self.geometry, block)

    def write_block(self, block_id: int, block: KVBlock) -> None:
        self._payloads[block_id] = block.payload

    def execute(self, items: list[Item]) -> StepResult:
        started = time.monotonic()
        errors = self._inject(items)
        prefill_tokens = prefill_context = decode_seqs = decode_context = 0
        for item in items:
            if item.length == 1 and item.sample:
                decode_seqs += 1
                decode_context += item.start + 1
            else:
                prefill_tokens += item.length
                prefill_context += item.length * item.start + item.length * (item.length + 1) // 2
        modelled = self.profile.step_time(prefill_tokens, prefill_context, decode_seqs, decode_context)
        remaining = modelled / self.speedup - (time.monotonic() - started)
        if remaining > 0:
            time.sleep(remaining)
        tokens: list[int | None] = [self._token(item) if item.sample else None for item in items]
        counts = self.experts.step_counts(prefill_tokens + decode_seqs, time.monotonic())
        return StepResult(tokens, counts, errors, self._logprobs(items, tokens))

    @staticmethod
    def _logprobs(items: list[Item], tokens: list[int | None]) -> dict[int, TokenLogprob]:
        """The stand-in model picks each token for certain: log-probability 0, and no other candidate."""
        out: dict[int, TokenLogprob] = {}
        for index, (item, token) in enumerate(zip(items, tokens, strict=True)):
            top = item.seq.request.sampling.logprobs
            if token is not None and top is not None:
                out[index] = TokenLogprob(token, 0.0, ((token, 0.0),) if top else ())
        return out

    def _token(self, item: Item) -> int:
        seq = item.seq
        sampling = seq.request.sampling
        position = len(seq.tokens)
        if sampling.greedy:
            key = hashlib.blake2b(str(seq.tokens[: seq.num_prompt]).encode(), digest_size=8).digest()
            seed = int.from_bytes(key, "little")
        else:
            seed = sampling.seed or 0
        drawn = position_seed(seed, position)
        if seq.constraint is not None:  # a grammar: a stand-in choice among the tokens it allows
            return seq.constraint.allowed[drawn % len(seq.constraint.allowed)]
        return _FIRST_TOKEN + drawn % _TOKEN_SPAN

    def _inject(self, items: list[Item]) -> dict[int, str]:
        errors: dict[int, str] = {}
        fail = self.failures
        for index, item in enumerate(items):
            request_id = item.seq.request_id
            if request_id in self._seen:
                continue
            self._seen.add(request_id)
            if fail.die_after and len(self._seen) > fail.die_after:
                os._exit(3)  # a crash, on purpose: no cleanup, no deregistration
            if fail.stall_after and len(self._seen) > fail.stall_after:
                self._stalled = True
            if fail.fail_rate and self._rng.random() < fail.fail_rate:
                errors[index] = "injected failure (sim engine fail_rate)"
        while self._stalled:
            time.sleep(3600)  # a hung engine, on purpose: never answers again
        return errors
