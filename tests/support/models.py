"""The tiny test checkpoints, built once per test session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from services.worker.tiny_model import VARIANTS, build_tiny_model

TINY_MODEL_NAME = "shoal-tiny-moe"
# The second model make run serves: 4 experts, another vocabulary.
TINY_MODEL_B_NAME = "shoal-tiny-moe-b"


def build(path: Path) -> Path:
    return build_tiny_model(path, seed=0)


def build_b(path: Path) -> Path:
    return build_tiny_model(path, seed=0, variant=VARIANTS["b"])


def transformers_model(path: Path) -> Any:
    """The checkpoint in transformers, as the reference the engine is checked against. Our requests
    ignore end-of-sequence, so the reference does too (min_new_tokens would instead forbid that token,
    changing the argmax)."""
    from transformers import MixtralForCausalLM

    model: Any = MixtralForCausalLM.from_pretrained(path)
    model.eval()
    model.generation_config.eos_token_id = None
    return model


def transformers_greedy(model: Any, prompt: list[int], tokens: int, **generate: Any) -> list[int]:
    """transformers' greedy continuation of `prompt`, at most `tokens` long; `generate` passes more
    options (logits processors, penalties) to `generate`."""
    import torch

    with torch.no_grad():
        generated = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=tokens,
            do_sample=False,
            pad_token_id=0,
            **generate,
        )
    return list(generated[0, len(prompt) :].tolist())
