"""A KV-cache block as it is stored and moved: name, header, payload, and its checksum."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import google_crc32c

from shared.hashing import BlockHash


def checksum(data: bytes | bytearray | memoryview) -> int:
    """CRC-32C (Castagnoli) of a payload: the checksum of every block, wherever it is kept or moved.

    Computed by the CPU's CRC instruction through google-crc32c (over 20 GB/s here, where zlib's
    CRC-32 does 3.5): KV blocks are megabytes and every hop checks them. Its Python binding takes
    only `bytes`; a payload received in place (a bytearray) goes to the same C library through
    ctypes rather than being copied into bytes first.
    """
    if isinstance(data, bytes) or _crc32c_value is None:
        return int(google_crc32c.value(bytes(data)))
    try:
        buffer = (ctypes.c_char * len(data)).from_buffer(data)
    except TypeError:  # a read-only view
        return int(google_crc32c.value(bytes(data)))
    return int(_crc32c_value(ctypes.addressof(buffer), len(data)))


def _library_value() -> Callable[[int, int], int] | None:
    """google-crc32c's own C library (crc32c_value), when the wheel ships it."""
    libs = Path(google_crc32c.__file__).parent.with_name("google_crc32c.libs")
    found = sorted(libs.glob("libcrc32c*")) if libs.is_dir() else []
    if not found:
        return None
    function = ctypes.CDLL(str(found[0])).crc32c_value
    function.restype = ctypes.c_uint32
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return cast(Callable[[int, int], int], function)


_crc32c_value = _library_value()


@dataclass(frozen=True, slots=True)
class KVBlock:
    """One block: its chain name, the producer's header and the payload bytes."""

    hash: BlockHash
    header: bytes
    # bytes, or a bytearray a transfer filled in place (never changed afterwards).
    payload: bytes | bytearray
    # CRC-32C of the payload when already computed and verified (saves a pass).
    crc32c: int | None = field(default=None, compare=False)

    def checksum(self) -> int:
        return checksum(self.payload) if self.crc32c is None else self.crc32c
