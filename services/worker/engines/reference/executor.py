"""The reference engine's executor: one batched forward pass over a paged KV cache.

The KV cache is two preallocated tensors per layer (K and V) of
[kv_heads, num_blocks * block_size, head_dim]; block b holds slots
[b * block_size, (b + 1) * block_size). A step flattens the scheduled tokens
of every request into one batch for the projections and experts; attention
runs once for all decoding requests (over their contiguous rows, which
mirror the cache: decoderows.py; or, past the rows' memory, over their
contexts gathered from the cache by whole blocks into a reused buffer) and
once per prompt chunk (causal, offset by the chunk's start). The MoE layer
goes through an `ExpertRunner`: the grouped matmul here, the expert-parallel
dispatch when the model spans ranks.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from services.worker.engines.base import KVBlock, TokenLogprob
from services.worker.engines.blocks import cache_slots
from services.worker.engines.engine import StepResult
from services.worker.engines.kvformat import KVGeometry, check_block, encode_block
from services.worker.engines.reference.checkpoint import Checkpoint
from services.worker.engines.reference.decoderows import DecodeRows, attention, past_bias
from services.worker.engines.reference.model import LayerWeights, MoEModel, run_grouped_experts
from services.worker.engines.sampling import model_logprobs, sample, token_logprob
from services.worker.engines.scheduler import Item
from services.worker.engines.tokenizer import HFTokenizer
from shared.hashing import BlockHash

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

ExpertRunner = Callable[
    [int, LayerWeights, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]
]
"""(layer index, layer, hidden [T, H], expert ids [T, k], weights [T, k]) -> (output, per-expert counts)."""


def _default_threads(device: torch.device) -> int:
    if device.type != "cpu":
        return 1
    return max(1, min(8, len(os.sched_getaffinity(0))))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class _Segment:
    row: int  # first row of the chunk in the flattened batch
    length: int
    start: int  # position of its first token
    context_slots: torch.Tensor | None  # cache slots of positions [0, start + length) when start > 0


class ReferenceExecutor:
    """Executor Protocol implementation running the PyTorch model."""

    def __init__(
        self,
        model_path: Path,
        model_name: str,
        device: str = "auto",
        dtype: str = "float32",
        compute_threads: int = 0,
        decode_rows_bytes: int | None = None,
    ) -> None:
        """`decode_rows_bytes`: memory for decode rows (decoderows.py); None: as much as the KV cache on a CPU,
        none on a GPU."""
        self.checkpoint = Checkpoint(model_path)
        config = self.checkpoint.config
        self.config = config
        self.model_name = model_name
        self.max_context = config.max_context
        self.vocab_size = config.vocab_size
        self.num_layers = config.num_layers
        self.num_experts = config.num_experts
        self.eos_token_ids = config.eos_token_ids
        self.tokenizer = HFTokenizer(model_path)
        self.device = resolve_device(device)
        self.dtype = DTYPES[dtype]
        self.dtype_name = dtype
        self.model: MoEModel | None = None
        self.block_size = 0
        self.geometry: KVGeometry | None = None
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []
        self.expert_runner: ExpertRunner = self._local_experts
        # Experts this process holds per layer (None: all); expert parallelism sets it.
        self.experts_of_layer: dict[int, list[int]] | None = None
        self.compute_threads = compute_threads if compute_threads > 0 else _default_threads(self.device)
        self.decode_rows: DecodeRows | None = None
        self.decode_rows_bytes = decode_rows_bytes
        self._gather_buffers = [torch.empty(0), torch.empty(0)]
        self._map_version = 0

    # -- setup ----------------------------------------------------------------

    def load(self) -> None:
        # Intra-op threads for this (the engine) thread only. No other thread
        # of the worker runs parallel torch ops: two OpenMP teams in one
        # process make each other several times slower.
        torch.set_num_threads(self.compute_threads)
        with torch.inference_mode():
            self.model = MoEModel(self.checkpoint, self.dtype, self.device, self.experts_of_layer)

    def allocate_kv(self, kv_cache_bytes: int, block_size: int) -> int:
        num_blocks = max(1, kv_cache_bytes // self._geometry(block_size).payload_bytes)
        self.allocate_blocks(num_blocks, block_size)
        return num_blocks

    def allocate_blocks(self, num_blocks: int, block_size: int) -> None:
        config = self.config
        self.block_size = block_size
        self.geometry = self._geometry(block_size)
        shape = (config.num_kv_heads, num_blocks * block_size, config.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(config.num_layers)]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(config.num_layers)]
        budget = self.decode_rows_bytes
        if budget is None:  # as much as the KV cache on a CPU
            budget = num_blocks * self.geometry.payload_bytes if self.device.type == "cpu" else 0
        self.decode_rows = DecodeRows(
            config.num_layers, config.num_kv_heads, config.head_dim, block_size, self.dtype, self.device, budget
        )

    def _geometry(self, block_size: int) -> KVGeometry:
        config = self.config
        return KVGeometry(
            model=self.model_name,
            layers=config.num_layers,
            kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            block_size=block_size,
            dtype=self.dtype_name,
            itemsize=torch.empty((), dtype=self.dtype).element_size(),
        )

    def map_version(self) -> int:
        return self._map_version

    def close(self) -> None:
        pass  # nothing beyond memory

    # -- KV blocks ------------------------------------------------------------

    def read_block(self, block_id: int, block_hash: BlockHash) -> KVBlock:
        assert self.geometry is not None
        start, end = block_id * self.block_size, (block_id + 1) * self.block_size
        k = torch.stack([cache[:, start:end] for cache in self.k_cache])
        v = torch.stack([cache[:, start:end] for cache in self.v_cache])
        payload = torch.stack([k, v], dim=1).contiguous().cpu().view(torch.uint8).numpy().tobytes()
        return encode_block(self.geometry, block_hash, payload)

    def validate_block(self, block: KVBlock) -> None:
        assert self.geometry is not None
        check_block(self.geometry, block)

    def write_block(self, block_id: int, block: KVBlock) -> None:
        config = self.config
        data = torch.frombuffer(bytearray(block.payload), dtype=torch.uint8).view(self.dtype)
        data = data.view(config.num_layers, 2, config.num_kv_heads, self.block_size, config.head_dim)
        data = data.to(self.device)
        start, end = block_id * self.block_size, (block_id + 1) * self.block_size
        for layer in range(config.num_layers):
            self.k_cache[layer][:, start:end] = data[layer, 0]
            self.v_cache[layer][:, start:end] = data[layer, 1]

    # -- the step -------------------------------------------------------------

    def _slots(self, block_ids: list[int], start: int, end: int) -> list[int]:
        return cache_slots(block_ids, self.block_size, start, end)

    def _local_experts(
        self,
        layer_index: int,
        layer: LayerWeights,
        x: torch.Tensor,
        ids: torch.Tensor,
        weights: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if layer.grouped is None:  # only expert-parallel ranks hold a subset, and they install their own runner
            raise RuntimeError(f"layer {layer_index} holds a subset of the experts but has no expert-parallel runner")
        return run_grouped_experts(x, ids, weights, layer.grouped)

    def execute(self, items: list[Item]) -> StepResult:
        logits, expert_counts = self.forward(items)
        sampled: list[int | None] = [None] * len(items)
        logprobs: dict[int, TokenLogprob] = {}
        rows = [index for index, item in enumerate(items) if item.sample]  # item index of each logits row
        if rows:
            seqs = [items[index].seq for index in rows]
            asked = model_logprobs(logits, seqs)
            chosen = sample(logits, seqs, self.eos_token_ids)
            for row, token in enumerate(chosen):
                sampled[rows[row]] = token
            for row, row_logprobs in asked.items():
                top = seqs[row].request.sampling.logprobs or 0
                logprobs[rows[row]] = token_logprob(row_logprobs, chosen[row], top)
        return StepResult(sampled, expert_counts.cpu().numpy().astype(np.int64), logprobs=logprobs)

    def forward(self, items: list[Item], all_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the model over one step's items; write their KV into the cache.

        Returns float32 logits of the rows to sample (the last row of each
        item with `sample`, or every row with `all_logits`) and the routed
        tokens per [layer, expert].
        """
        return self._forward(items, all_logits)

    @torch.inference_mode()
    def _forward(self, items: list[Item], all_logits: bool) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        assert model is not None
        config = self.config
        device = self.device
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        decode_rows: list[int] = []
        decodes: list[tuple[int, int, list[int]]] = []  # (serial, position of the new token, block table)
        segments: list[_Segment] = []
        sample_rows: list[int] = []
        for item in items:
            seq = item.seq
            end = item.start + item.length
            row = len(ids)
            ids.extend(seq.tokens[item.start : end])
            positions.extend(range(item.start, end))
            slots.extend(self._slots(seq.block_ids, item.start, end))
            if item.length == 1:
                decode_rows.append(row)
                decodes.append((seq.serial, item.start, seq.block_ids))
            else:
                context = None
                if item.start > 0:
                    context = torch.tensor(self._slots(seq.block_ids, 0, end), device=device)
                segments.append(_Segment(row, item.length, item.start, context))
            if item.sample:
                sample_rows.append(row + item.length - 1)

        tokens_t = torch.tensor(ids, device=device)
        positions_t = torch.tensor(positions, device=device)
        slots_t = torch.tensor(slots, device=device)
        rows = self.decode_rows
        assert rows is not None
        plan = rows.plan(decodes) if decodes else None
        gather = self._gather_plan(decodes) if decodes and plan is None else None
        decode_rows_t = torch.tensor(decode_rows, device=device)
        total = len(ids)
        heads, kv_heads, head_dim = config.num_heads, config.num_kv_heads, config.head_dim

        rotation = model.rotation(positions_t)
        # Only decodes (the common step): their rows are the whole batch, in order, and need no picking.
        only_decodes = len(decode_rows) == total

        def decoding(t: torch.Tensor) -> torch.Tensor:
            return t if only_decodes else t[decode_rows_t]

        x = model.embed[tokens_t]
        counts: list[torch.Tensor] = []
        for index, layer in enumerate(model.layers):
            h = model.rms_norm(x, layer.input_norm)
            q = model.rope(F.linear(h, layer.wq, layer.bq).view(total, heads, head_dim), rotation)
            k = model.rope(F.linear(h, layer.wk, layer.bk).view(total, kv_heads, head_dim), rotation)
            v = F.linear(h, layer.wv, layer.bv).view(total, kv_heads, head_dim)
            k_cache, v_cache = self.k_cache[index], self.v_cache[index]
            k_cache[:, slots_t] = k.transpose(0, 1)
            v_cache[:, slots_t] = v.transpose(0, 1)
            if not decodes:
                attn = torch.empty_like(q)
            else:
                if plan is not None:
                    rows.write(index, plan, k_cache, v_cache, decoding(k), decoding(v))
                    decoded = rows.attend(index, plan, decoding(q))
                else:
                    assert gather is not None
                    decoded = self._gathered_attention(k_cache, v_cache, decoding(q), *gather)
                attn = decoded if only_decodes else torch.empty_like(q).index_put_((decode_rows_t,), decoded)
            for seg in segments:
                span = slice(seg.row, seg.row + seg.length)
                qs = q[span].transpose(0, 1).unsqueeze(0)
                if seg.context_slots is None:
                    ks = k[span].transpose(0, 1).unsqueeze(0)
                    vs = v[span].transpose(0, 1).unsqueeze(0)
                    out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
                else:
                    ks = k_cache[:, seg.context_slots].unsqueeze(0)
                    vs = v_cache[:, seg.context_slots].unsqueeze(0)
                    query_pos = torch.arange(seg.start, seg.start + seg.length, device=device)
                    causal = torch.arange(seg.start + seg.length, device=device)[None, :] <= query_pos[:, None]
                    out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=causal, enable_gqa=True)
                attn[span] = out.squeeze(0).transpose(0, 1)
            x = x + F.linear(attn.reshape(total, heads * head_dim), layer.wo)
            h = model.rms_norm(x, layer.post_norm)
            expert_ids, expert_weights = model.route(layer, h)
            moe, layer_counts = self.expert_runner(index, layer, h, expert_ids, expert_weights)
            shared = model.shared_output(layer, h)
            if shared is not None:
                moe = moe + shared
            x = x + moe
            counts.append(layer_counts)

        logit_rows = list(range(total)) if all_logits else sample_rows
        hidden = model.rms_norm(x[torch.tensor(logit_rows, dtype=torch.long, device=device)], model.norm)
        return F.linear(hidden, model.lm_head).float(), torch.stack(counts)

    def _gather_plan(self, decodes: list[tuple[int, int, list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Without decode rows: the decoding requests' block tables, padded, and the bias masking what is
        past each one's length.

        Whole blocks are gathered (index_select of contiguous blocks is far faster than gathering
        single slots); positions past a request's length are masked out."""
        width = max(len(table) for _, _, table in decodes)
        table_t = torch.tensor([table + [0] * (width - len(table)) for _, _, table in decodes], device=self.device)
        lengths_t = torch.tensor([start + 1 for _, start, _ in decodes], device=self.device)
        past = torch.arange(width * self.block_size, device=self.device)[None, :] >= lengths_t[:, None]
        return table_t, past_bias(past, self.dtype)[None, :, None, :]

    def _gathered_attention(
        self, k_cache: torch.Tensor, v_cache: torch.Tensor, q: torch.Tensor, table: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        """Attention of each decoding request's query [B, heads, head_dim] over its context gathered from
        the cache; the query heads of one KV head fold into the query axis (no K/V copy per query head)."""
        batch, heads, dim = q.shape
        kv_heads = k_cache.shape[0]
        qd = q.view(batch, kv_heads, heads // kv_heads, dim).transpose(0, 1)
        kd = self._gather_blocks(k_cache, table, 0)  # [KVH, B, C, D]
        vd = self._gather_blocks(v_cache, table, 1)
        return attention(qd, kd, vd, bias).transpose(0, 1).reshape(batch, heads, dim)

    def _gather_blocks(self, cache: torch.Tensor, table: torch.Tensor, buffer: int) -> torch.Tensor:
        """[kv_heads, B, width * block_size, head_dim] copy of the blocks in `table` [B, width].

        Copies into a reused buffer: a fresh multi-megabyte tensor per layer
        costs more in page faults than the copy itself.
        """
        heads, _, dim = cache.shape
        blocks = cache.view(heads, -1, self.block_size * dim)
        needed = heads * table.numel() * self.block_size * dim
        if self._gather_buffers[buffer].numel() < needed:
            self._gather_buffers[buffer] = torch.empty(needed, dtype=cache.dtype, device=cache.device)
        out = self._gather_buffers[buffer][:needed].view(heads, table.numel(), self.block_size * dim)
        torch.index_select(blocks, 1, table.flatten(), out=out)
        return out.view(heads, table.shape[0], -1, dim)
