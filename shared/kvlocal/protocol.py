"""Messages on the kvstore's unix socket: a 4-byte length, then a JSON object.

    hello {"op": "hello", "staging": path}        -> {"ok": true}
    put   {"op": "put", "session": s, "pin_ttl": n,
           "blocks": [[offset, hash_hex, header_len, payload_len, payload_crc32c], ...]}
                                                  -> {"stored": n, "duplicates": m}
    touch {"op": "touch", "hits": [hash_hex, ...], "misses": n}   (no reply)

Any reply may instead be {"error": {"code": taxonomy code, "message": text}}.
The blocks of a put lie in the client's staging file, at `offset`: header then
payload. Bounded: a message is at most MAX_MESSAGE bytes.
"""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

LENGTH = struct.Struct("<I")
MAX_MESSAGE = 4 * 2**20


async def read_message(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next message, or None at end of stream."""
    try:
        (length,) = LENGTH.unpack(await reader.readexactly(LENGTH.size))
    except asyncio.IncompleteReadError:
        return None
    if length > MAX_MESSAGE:
        raise ValueError(f"message of {length} bytes exceeds {MAX_MESSAGE}")
    message = json.loads(await reader.readexactly(length))
    if not isinstance(message, dict):
        raise ValueError("a message must be a JSON object")
    return message


def encode(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return LENGTH.pack(len(body)) + body
