"""Reading a Hugging Face-format MoE checkpoint from a local folder.

Supported: Mixtral (`MixtralForCausalLM`) and Qwen-MoE (`Qwen2MoeForCausalLM`,
with its shared expert). Anything else is refused with the architectures that
are supported. Weights are read from `*.safetensors` files (sharded or not)
lazily, so one expert can be loaded on its own during a live migration.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from shared.errors import FailedPrecondition

SUPPORTED = {"MixtralForCausalLM": "mixtral", "Qwen2MoeForCausalLM": "qwen2_moe"}


class CheckpointError(FailedPrecondition):
    """The folder does not hold a checkpoint this engine can serve."""


@dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    num_experts: int
    top_k: int
    norm_topk_prob: bool
    rms_norm_eps: float
    rope_theta: float
    max_context: int
    eos_token_ids: tuple[int, ...]
    attention_bias: bool
    shared_expert_size: int

    @classmethod
    def from_folder(cls, path: Path) -> ModelConfig:
        config_file = path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{path} holds no config.json; point SHOAL_WORKER_MODEL_PATH at a checkpoint")
        raw = json.loads(config_file.read_text())
        architectures = raw.get("architectures") or [raw.get("model_type", "unknown")]
        family = next((SUPPORTED[a] for a in architectures if a in SUPPORTED), None)
        if family is None:
            raise CheckpointError(
                f"unsupported architecture {architectures[0]!r} in {config_file}; "
                f"the reference engine serves {', '.join(sorted(SUPPORTED))}"
            )
        heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        max_context = int(raw.get("max_position_embeddings", 4096))
        _refuse_unsupported_attention(raw, config_file, max_context)
        rope = raw.get("rope_parameters") or {}
        eos = raw.get("eos_token_id")
        generation = path / "generation_config.json"
        if generation.is_file():
            eos = json.loads(generation.read_text()).get("eos_token_id", eos)
        eos_ids = tuple(eos) if isinstance(eos, list) else ((int(eos),) if eos is not None else ())
        if family == "mixtral":
            experts, top_k, intermediate = (
                raw["num_local_experts"],
                raw["num_experts_per_tok"],
                raw["intermediate_size"],
            )
            norm_topk, shared, bias = True, 0, False
        else:
            experts, top_k = raw["num_experts"], raw["num_experts_per_tok"]
            intermediate = raw["moe_intermediate_size"]
            norm_topk = bool(raw.get("norm_topk_prob", False))
            shared = int(raw.get("shared_expert_intermediate_size", 0))
            bias = bool(raw.get("qkv_bias", True))
            if raw.get("mlp_only_layers") or int(raw.get("decoder_sparse_step", 1)) != 1:
                raise CheckpointError(
                    f"{config_file}: Qwen-MoE checkpoints with dense layers (mlp_only_layers, "
                    "decoder_sparse_step) are not supported; every layer must be an MoE layer"
                )
        return cls(
            family=family,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            intermediate_size=int(intermediate),
            num_experts=int(experts),
            top_k=int(top_k),
            norm_topk_prob=norm_topk,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
            max_context=max_context,
            eos_token_ids=eos_ids,
            attention_bias=bias,
            shared_expert_size=shared,
        )


def _refuse_unsupported_attention(raw: dict[str, Any], config_file: Path, max_context: int) -> None:
    """Sliding-window attention and scaled RoPE change every output token; until the engine implements
    them, such a checkpoint is refused at load rather than served wrong."""
    window = raw.get("sliding_window")
    if raw.get("use_sliding_window", "sliding_window" in raw) and window is not None and int(window) < max_context:
        raise CheckpointError(
            f"{config_file}: sliding-window attention (sliding_window={window} < max_position_embeddings="
            f"{max_context}) is not supported by the reference engine yet"
        )
    for key in ("rope_scaling", "rope_parameters"):
        rope = raw.get(key) or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise CheckpointError(
                f"{config_file}: RoPE scaling ({key}.rope_type={kind!r}) is not supported by the reference engine "
                "yet; only unscaled RoPE is"
            )


class Checkpoint:
    """Lazy access to the tensors of a safetensors checkpoint folder."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.config = ModelConfig.from_folder(path)
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path} holds no *.safetensors weights")
        self._file_of: dict[str, Path] = {}
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    self._file_of[name] = file

    def tensor(self, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        file = self._file_of.get(name)
        if file is None:
            raise CheckpointError(f"{self.path} lacks tensor {name!r}")
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            tensor: torch.Tensor = handle.get_tensor(name)
            return tensor.to(device=device, dtype=dtype)

    def has(self, name: str) -> bool:
        return name in self._file_of

    def layer_prefix(self, layer: int) -> str:
        return f"model.layers.{layer}."

    def expert_names(self, layer: int, expert: int) -> tuple[str, str, str]:
        """(gate, up, down) tensor names of one expert."""
        prefix = self.layer_prefix(layer)
        if self.config.family == "mixtral":
            base = f"{prefix}block_sparse_moe.experts.{expert}."
            return base + "w1.weight", base + "w3.weight", base + "w2.weight"
        base = f"{prefix}mlp.experts.{expert}."
        return base + "gate_proj.weight", base + "up_proj.weight", base + "down_proj.weight"

    def router_name(self, layer: int) -> str:
        prefix = self.layer_prefix(layer)
        return prefix + ("block_sparse_moe.gate.weight" if self.config.family == "mixtral" else "mlp.gate.weight")
