"""Turning OpenAI requests into token ids: the model's chat template and tokenizer.

The chat template comes from the checkpoint's tokenizer_config.json and is
rendered in a sandboxed Jinja environment, as `transformers` does, with
`bos_token`, `eos_token`, `add_generation_prompt` and `raise_exception`.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, NoReturn

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from shared.errors import FailedPrecondition, InvalidArgument
from shared.openai.tokens import TokenPieces


def _raise(message: str) -> NoReturn:
    raise InvalidArgument(f"chat template refused the messages: {message}", param="messages")


class PromptBuilder:
    def __init__(self, model_path: Path) -> None:
        tokenizer_file = model_path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FailedPrecondition(
                f"{model_path} has no tokenizer.json: a model's path must be its checkpoint folder, with its tokenizer"
            )
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        config_file = model_path / "tokenizer_config.json"
        config: dict[str, Any] = json.loads(config_file.read_text()) if config_file.is_file() else {}
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        template = config.get("chat_template")
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        environment.globals["raise_exception"] = _raise
        self._template = environment.from_string(template) if isinstance(template, str) else None

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def chat(self, messages: list[dict[str, str]]) -> list[int]:
        if self._template is None:
            raise InvalidArgument("this model has no chat template; use /v1/completions", param="messages")
        try:
            text = self._template.render(
                messages=messages, add_generation_prompt=True, bos_token=self.bos_token, eos_token=self.eos_token
            )
        except TemplateError as exc:
            raise InvalidArgument(f"chat template failed on these messages: {exc}", param="messages") from None
        return self.encode(text)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    @functools.cached_property
    def pieces(self) -> TokenPieces:
        """Each token id's text and bytes, for logprobs."""
        return TokenPieces(self.tokenizer)

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size())


def _token_text(token: object) -> str:
    if isinstance(token, dict):
        return str(token.get("content", ""))
    return str(token or "")
