"""A model as the OpenAI endpoints see it: its name, context length, tokenizer and chat template."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.openai.prompts import PromptBuilder

DEFAULT_CONTEXT = 4096


@dataclass(frozen=True)
class ServedModel:
    name: str
    max_context: int
    prompts: PromptBuilder
    # Tokens per KV block its workers use (the router names prompt blocks with it).
    block_size: int = 16
    # What `/v1/models` shows as its id's `root`: the model an alias points at, or the model itself.
    root: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def listing(self) -> dict[str, Any]:
        """The model's entry in `/v1/models`."""
        return {
            "id": self.name,
            "object": "model",
            "created": self.created,
            "owned_by": "shoal",
            "root": self.root or self.name,
            "context_length": self.max_context,
        }


def checkpoint_context(model_path: Path) -> int:
    """The context length a checkpoint declares (`max_position_embeddings`), or DEFAULT_CONTEXT."""
    config = model_path / "config.json"
    if config.is_file():
        return int(json.loads(config.read_text()).get("max_position_embeddings", DEFAULT_CONTEXT))
    return DEFAULT_CONTEXT


def load_model(name: str, model_path: Path, block_size: int = 16, context_length: int | None = None) -> ServedModel:
    """The model in the checkpoint folder `model_path` (reads its tokenizer: call off the event loop)."""
    context = context_length or checkpoint_context(model_path)
    return ServedModel(name, context, PromptBuilder(model_path), block_size)
