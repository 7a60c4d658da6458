"""The reference MoE decoder's weights and building blocks (PyTorch).

RMSNorm, rotary position embeddings, grouped-query attention projections and
top-k softmax-routed SwiGLU experts, matching `transformers`' Mixtral and
Qwen-MoE numerically. Experts are held per layer in a dict keyed by logical
expert id, so a rank can hold any subset (expert parallelism) and gain or lose
copies while serving (live migration).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from services.worker.engines.reference.checkpoint import Checkpoint, ModelConfig


@dataclass
class ExpertWeights:
    """One SwiGLU expert: gate and up projections fused, then down."""

    w13: torch.Tensor  # [2 * intermediate, hidden]
    w2: torch.Tensor  # [hidden, intermediate]

    @property
    def nbytes(self) -> int:
        return self.w13.numel() * self.w13.element_size() + self.w2.numel() * self.w2.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.w13).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.w2)


@dataclass
class GroupedExperts:
    """All of a layer's experts stacked, so each projection is one grouped matmul over every expert."""

    w13: torch.Tensor  # [experts, 2 * intermediate, hidden]
    w2: torch.Tensor  # [experts, hidden, intermediate]


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    wq: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    wo: torch.Tensor
    bq: torch.Tensor | None
    bk: torch.Tensor | None
    bv: torch.Tensor | None
    router: torch.Tensor  # [experts, hidden]
    # Logical expert id -> weights, for the experts this rank holds.
    experts: dict[int, ExpertWeights] = field(default_factory=dict)
    shared_expert: ExpertWeights | None = None
    shared_gate: torch.Tensor | None = None
    # When this process holds every expert: the same weights stacked (`experts` then holds views of them).
    grouped: GroupedExperts | None = None


def load_expert(ckpt: Checkpoint, layer: int, expert: int, dtype: torch.dtype, device: torch.device) -> ExpertWeights:
    gate, up, down = ckpt.expert_names(layer, expert)
    w13 = torch.cat([ckpt.tensor(gate, dtype, device), ckpt.tensor(up, dtype, device)], dim=0)
    return ExpertWeights(w13.contiguous(), ckpt.tensor(down, dtype, device))


class MoEModel:
    """Weights of the whole decoder plus its rotary tables."""

    def __init__(
        self,
        ckpt: Checkpoint,
        dtype: torch.dtype,
        device: torch.device,
        experts_of_layer: Mapping[int, Iterable[int]] | None = None,
    ) -> None:
        """Load every weight; `experts_of_layer` limits which experts each layer holds."""
        config = ckpt.config
        self.config: ModelConfig = config
        self.checkpoint = ckpt
        self.dtype = dtype
        self.device = device

        def get(name: str) -> torch.Tensor:
            return ckpt.tensor(name, dtype, device)

        def maybe(name: str) -> torch.Tensor | None:
            return get(name) if ckpt.has(name) else None

        self.embed = get("model.embed_tokens.weight")
        self.norm = get("model.norm.weight")
        self.lm_head = get("lm_head.weight") if ckpt.has("lm_head.weight") else self.embed
        self.layers: list[LayerWeights] = []
        for index in range(config.num_layers):
            prefix = ckpt.layer_prefix(index)
            attn = prefix + "self_attn."
            layer = LayerWeights(
                input_norm=get(prefix + "input_layernorm.weight"),
                post_norm=get(prefix + "post_attention_layernorm.weight"),
                wq=get(attn + "q_proj.weight"),
                wk=get(attn + "k_proj.weight"),
                wv=get(attn + "v_proj.weight"),
                wo=get(attn + "o_proj.weight"),
                bq=maybe(attn + "q_proj.bias"),
                bk=maybe(attn + "k_proj.bias"),
                bv=maybe(attn + "v_proj.bias"),
                router=get(ckpt.router_name(index)),
            )
            held = range(config.num_experts) if experts_of_layer is None else experts_of_layer.get(index, ())
            for expert in held:
                layer.experts[expert] = load_expert(ckpt, index, expert, dtype, device)
            if experts_of_layer is None:
                layer.grouped = stack_experts(layer.experts)
            if config.shared_expert_size:
                shared = prefix + "mlp.shared_expert."
                w13 = torch.cat([get(shared + "gate_proj.weight"), get(shared + "up_proj.weight")], dim=0)
                layer.shared_expert = ExpertWeights(w13.contiguous(), get(shared + "down_proj.weight"))
                layer.shared_gate = get(prefix + "mlp.shared_expert_gate.weight")
            self.layers.append(layer)
        inv_freq = 1.0 / (
            config.rope_theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim)
        )
        positions = torch.arange(config.max_context, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos = emb.cos().to(device=device, dtype=dtype)
        self.sin = emb.sin().to(device=device, dtype=dtype)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        normed = x.float() * torch.rsqrt(variance + self.config.rms_norm_eps)
        return weight * normed.to(x.dtype)

    def rotation(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary tables at each token's position ([tokens, 1, head_dim] cos and sin), once per step."""
        return self.cos[positions][:, None, :], self.sin[positions][:, None, :]

    @staticmethod
    def rope(x: torch.Tensor, rotation: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Rotate [tokens, heads, head_dim] by each token's position."""
        cos, sin = rotation
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def route(self, layer: LayerWeights, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k experts per token and their weights: ([tokens, k] ids, [tokens, k] weights)."""
        logits = F.linear(x, layer.router)
        probs = torch.softmax(logits.float(), dim=-1)
        weights, ids = torch.topk(probs, self.config.top_k, dim=-1)
        if self.config.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return ids, weights.to(x.dtype)

    def shared_output(self, layer: LayerWeights, x: torch.Tensor) -> torch.Tensor | None:
        if layer.shared_expert is None or layer.shared_gate is None:
            return None
        return torch.sigmoid(F.linear(x, layer.shared_gate)) * layer.shared_expert(x)


def stack_experts(experts: dict[int, ExpertWeights]) -> GroupedExperts:
    """Stack the experts (ids 0..n-1) and make each one's weights views of the stack: no second copy."""
    grouped = GroupedExperts(
        torch.stack([experts[e].w13 for e in range(len(experts))]),
        torch.stack([experts[e].w2 for e in range(len(experts))]),
    )
    for expert in range(len(experts)):
        experts[expert] = ExpertWeights(grouped.w13[expert], grouped.w2[expert])
    return grouped


def run_grouped_experts(
    x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, grouped: GroupedExperts
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply every expert to its routed tokens, for a process holding every expert: two grouped matmuls
    per layer. Returns the weighted sum per token and the routed-token count of every expert.

    Routed rows are sorted by expert, and `grouped_mm` multiplies each expert's run of rows by its
    own weights in one call: no Python loop over experts, and no padding of every expert to the
    busiest one's rows (a padded `bmm` did up to 3x the work under skewed routing). Each group is
    bit-for-bit one `F.linear`. Rows are summed into their tokens in expert order, as
    `transformers` does.
    """
    num_experts = grouped.w13.shape[0]
    flat = ids.flatten()
    counts = torch.bincount(flat, minlength=num_experts)
    ends = torch.cumsum(counts, 0, dtype=torch.int32)
    order = torch.argsort(flat, stable=True)
    token_of = order // ids.shape[1]
    gate, up = F.grouped_mm(x[token_of], grouped.w13.transpose(1, 2), offs=ends).chunk(2, dim=-1)
    y = F.grouped_mm(F.silu(gate) * up, grouped.w2.transpose(1, 2), offs=ends)
    rows = y * weights.flatten()[order, None]
    return torch.zeros_like(x).index_add_(0, token_of, rows), counts
