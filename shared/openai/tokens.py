"""What one token id is as text and as bytes, for logprobs.

OpenAI's logprobs give every token's text and its exact UTF-8 bytes; a token
that holds only part of a character (byte-level vocabularies split them) has
no text of its own, and shows as `bytes:\\xNN...` with its bytes alongside, as
OpenAI's API shows it.
"""

from __future__ import annotations

import re

from tokenizers import Tokenizer, decoders

# SentencePiece's byte-fallback pieces: "<0x0A>".
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
# SentencePiece's word-boundary mark, a space in the text.
_METASPACE = "\u2581"


def byte_level_chars() -> dict[int, str]:
    """The GPT-2 byte-to-character table that byte-level tokenizers spell their pieces with."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(ch) for byte, ch in zip(printable, chars, strict=True)}


_BYTE_OF_CHAR = {char: byte for byte, char in byte_level_chars().items()}


class TokenPieces:
    """Each token id's (text, bytes), cached: at most one entry per id of the vocabulary."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._byte_level = isinstance(tokenizer.decoder, decoders.ByteLevel)
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def piece(self, token_id: int) -> tuple[str, list[int]]:
        cached = self._cache.get(token_id)
        if cached is None:
            raw = self._bytes(token_id)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{byte:02x}" for byte in raw)
            cached = self._cache[token_id] = (text, list(raw))
        return cached

    def _bytes(self, token_id: int) -> bytes:
        piece = self._tokenizer.id_to_token(token_id)
        if piece is None:
            return b""
        if self._byte_level and all(char in _BYTE_OF_CHAR for char in piece):
            return bytes(_BYTE_OF_CHAR[char] for char in piece)
        match = _BYTE_PIECE.fullmatch(piece)
        if match is not None:
            return bytes([int(match[1], 16)])
        if _METASPACE in piece:
            return piece.replace(_METASPACE, " ").encode()
        return str(self._tokenizer.decode([token_id], skip_special_tokens=False)).encode()
