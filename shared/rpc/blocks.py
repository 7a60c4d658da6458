"""Streaming KV blocks over gRPC in chunks (kvstore Put/Get, worker FetchKV).

A block is sent as a `begin` (its BlockMeta: hash, size, CRC-32, header) then
`data` chunks of at most CHUNK_BYTES, so no message nears gRPC's size limit
however large a block is. `BlockAssembler` rebuilds blocks on the receiving
side and refuses anything malformed: data before a begin, a size mismatch, a
bad checksum, an oversized header.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from shared.errors import InvalidArgument
from shared.hashing import HASH_BYTES, BlockHash
from shared.rpc.shoal.v1 import common_pb2
from shared.types.kv import KVBlock, checksum

CHUNK_BYTES = 1 << 20
MAX_HEADER_BYTES = 4096


class CorruptBlock(InvalidArgument):
    """A block arrived malformed: wrong size, bad checksum, broken framing."""


def block_chunks(blocks: Iterable[KVBlock]) -> Iterator[common_pb2.BlockChunk]:
    for block in blocks:
        payload = block.payload
        meta = common_pb2.BlockMeta(hash=block.hash, size=len(payload), crc32c=block.checksum(), header=block.header)
        yield common_pb2.BlockChunk(begin=meta)
        view = memoryview(payload)
        for start in range(0, len(payload), CHUNK_BYTES):
            yield common_pb2.BlockChunk(data=bytes(view[start : start + CHUNK_BYTES]))


def missing_chunk(block_hash: BlockHash) -> common_pb2.BlockChunk:
    return common_pb2.BlockChunk(missing=block_hash)


class BlockAssembler:
    """Rebuilds blocks from chunks; `feed` returns each block once complete."""

    def __init__(self, max_block_bytes: int) -> None:
        self.max_block_bytes = max_block_bytes
        self._meta: common_pb2.BlockMeta | None = None
        self._parts: list[bytes] = []
        self._received = 0
        self.missing: list[BlockHash] = []

    def feed(self, chunk: common_pb2.BlockChunk) -> KVBlock | None:
        kind = chunk.WhichOneof("part")
        if kind == "begin":
            self._expect_no_open_block()
            meta = chunk.begin
            if len(meta.hash) != HASH_BYTES:
                raise InvalidArgument(f"block hash must be {HASH_BYTES} bytes, got {len(meta.hash)}", param="hash")
            if meta.size > self.max_block_bytes:
                raise InvalidArgument(
                    f"block of {meta.size} bytes exceeds the limit of {self.max_block_bytes}", param="size"
                )
            if len(meta.header) > MAX_HEADER_BYTES:
                raise InvalidArgument(
                    f"block header of {len(meta.header)} bytes exceeds {MAX_HEADER_BYTES}", param="header"
                )
            self._meta, self._parts, self._received = meta, [], 0
            return self._complete_if_done()
        if kind == "data":
            if self._meta is None:
                raise CorruptBlock("block data arrived before its begin", param="data")
            self._received += len(chunk.data)
            if self._received > self._meta.size:
                raise CorruptBlock(
                    f"block {self._meta.hash.hex()} sent more than its declared {self._meta.size} bytes",
                    param="data",
                )
            self._parts.append(chunk.data)
            return self._complete_if_done()
        if kind == "missing":
            self._expect_no_open_block()
            self.missing.append(chunk.missing)
            return None
        raise InvalidArgument("empty block chunk", param="part")

    def _complete_if_done(self) -> KVBlock | None:
        meta = self._meta
        if meta is None or self._received < meta.size:
            return None
        payload = b"".join(self._parts)
        self._meta, self._parts = None, []
        if checksum(payload) != meta.crc32c:
            raise CorruptBlock(f"block {meta.hash.hex()} is corrupt (CRC-32C mismatch)", param="crc32c")
        return KVBlock(meta.hash, meta.header, payload, meta.crc32c)

    def _expect_no_open_block(self) -> None:
        if self._meta is not None:
            raise CorruptBlock(
                f"block {self._meta.hash.hex()} ended after {self._received} of {self._meta.size} bytes",
                param="data",
            )

    def finish(self) -> None:
        """Call at the end of the stream: refuses a truncated last block."""
        self._expect_no_open_block()
