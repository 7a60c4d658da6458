"""Incremental detokenization with stop strings.

Tokens arrive one step at a time; their text is the difference between
decoding a short window with and without them, so multi-byte characters split
across tokens come out whole (a trailing U+FFFD means "wait for more", until the last token). Stop
strings are searched in the accumulated text; text that might be the start of
a stop string is held back until it is known not to be, so a client never
sees any part of a stop string.
"""

from __future__ import annotations

from typing import Protocol

# Prompt tokens kept as decoding context: enough for tokenizers whose
# decoding of a token depends on its neighbours (leading spaces).
_CONTEXT_TOKENS = 5


class Detokenizer(Protocol):
    def decode(self, ids: list[int]) -> str:
        """Text of `ids`, special tokens skipped."""


class OutputText:
    """The text of one request's output, released in safe increments."""

    def __init__(
        self,
        tokenizer: Detokenizer,
        prompt: list[int],
        resume: list[int],
        stop: tuple[str, ...],
        resume_text_chars: int = 0,
    ) -> None:
        self._tokenizer = tokenizer
        self._ids = prompt[-_CONTEXT_TOKENS:]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stop = tuple(s for s in stop if s)
        self._holdback = max((len(s) for s in self._stop), default=1) - 1
        self.text = ""
        self._searched = 0
        self.stopped = False
        # Tokens generated elsewhere are replayed one by one, as their first worker added them, so the text
        # (and what of it is still pending) is the same; the client already has `resume_text_chars` of it.
        for token in resume:
            self.add([token])
        self._emitted = min(resume_text_chars, len(self.text))

    def add(self, token_ids: list[int]) -> None:
        """Append generated tokens; sets `stopped` if a stop string appeared."""
        if self.stopped:
            return
        self._ids.extend(token_ids)
        self._release(final=False)

    def _release(self, final: bool) -> None:
        """Move the pending tokens' text into `text`: while streaming, not while it ends in an incomplete
        character (the next token may complete it); at the end, whatever it is, so the whole text is the
        decoding of every token, replacement characters included."""
        decode = self._tokenizer.decode
        prefix = decode(self._ids[self._prefix_offset : self._read_offset])
        full = decode(self._ids[self._prefix_offset :])
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and not final):
            return
        self.text += full[len(prefix) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        if self._stop:
            start = max(0, self._searched - self._holdback)
            hits = [i for i in (self.text.find(s, start) for s in self._stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
            self._searched = len(self.text)

    def _partial_stop(self) -> int:
        """Length of the longest text suffix that begins a stop string."""
        for size in range(min(self._holdback, len(self.text)), 0, -1):
            tail = self.text[-size:]
            if any(stop.startswith(tail) for stop in self._stop):
                return size
        return 0

    def take(self, final: bool) -> str:
        """Text not yet released; on `final`, everything left."""
        if final and not self.stopped:
            self._release(final=True)
        end = len(self.text) if final or self.stopped else max(self._emitted, len(self.text) - self._partial_stop())
        delta = self.text[self._emitted : end]
        self._emitted = end
        return delta
