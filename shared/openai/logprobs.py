"""OpenAI's `logprobs` objects, rendered from the workers' TokenLogprob entries.

Chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}],
"refusal": null}`. Completions: `{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}],
"text_offset"}`, where a token's offset counts the characters of the tokens before it in the
completion, across the chunks of a stream.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from shared.openai.tokens import TokenPieces
from shared.rpc.shoal.v1 import common_pb2

# OpenAI's stand-in for a probability too small for float32 (JSON has no -Infinity).
FLOOR = -9999.0


class LogprobsRenderer:
    """Renders one response's logprobs, chunk by chunk (it keeps the completion's text offset)."""

    def __init__(self, chat: bool, pieces: TokenPieces) -> None:
        self.chat = chat
        self.pieces = pieces
        self.offset = 0

    def render(self, entries: Iterable[common_pb2.TokenLogprob]) -> dict[str, Any]:
        return self._chat(entries) if self.chat else self._completion(entries)

    def _chat(self, entries: Iterable[common_pb2.TokenLogprob]) -> dict[str, Any]:
        content = []
        for entry in entries:
            item = self._item(entry.token_id, entry.logprob)
            item["top_logprobs"] = [
                self._item(token, logprob)
                for token, logprob in zip(entry.top_token_ids, entry.top_logprobs, strict=True)
            ]
            content.append(item)
        return {"content": content, "refusal": None}

    def _item(self, token_id: int, logprob: float) -> dict[str, Any]:
        text, raw = self.pieces.piece(token_id)
        return {"token": text, "logprob": max(logprob, FLOOR), "bytes": raw}

    def _completion(self, entries: Iterable[common_pb2.TokenLogprob]) -> dict[str, Any]:
        tokens: list[str] = []
        token_logprobs: list[float] = []
        top_logprobs: list[dict[str, float]] = []
        offsets: list[int] = []
        for entry in entries:
            text = self.pieces.piece(entry.token_id)[0]
            tokens.append(text)
            token_logprobs.append(max(entry.logprob, FLOOR))
            top_logprobs.append(
                {
                    self.pieces.piece(token)[0]: max(logprob, FLOOR)
                    for token, logprob in zip(entry.top_token_ids, entry.top_logprobs, strict=True)
                }
            )
            offsets.append(self.offset)
            self.offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": offsets,
        }
