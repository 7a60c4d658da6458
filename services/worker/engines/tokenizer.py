"""Detokenizing with a checkpoint's tokenizer.json (the `tokenizers` library)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from services.worker.engines.detokenize import Detokenizer


class HFTokenizer(Detokenizer):
    def __init__(self, path: Path) -> None:
        self._tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    def decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True))
