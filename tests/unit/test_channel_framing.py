"""Data-channel framing: whatever sizes the kernel hands reads in, frames come out whole and in order."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.rpc.channel import BIG_FRAME_BYTES, _Framer

pytestmark = pytest.mark.unit


class _Collector(_Framer):
    def __init__(self) -> None:
        super().__init__()
        self.frames: list[tuple[bytes, bool]] = []

    def on_frame(self, payload: memoryview | bytearray) -> None:
        self.frames.append((bytes(payload), isinstance(payload, bytearray)))


def _feed(framer: _Framer, stream: bytes, cuts: list[int]) -> None:
    """Hand `stream` to the framer as recv_into would, in reads of the given sizes."""
    position = 0
    for cut in [*cuts, len(stream)]:
        while position < len(stream):
            buffer = framer.get_buffer(-1)
            size = min(len(buffer), max(1, cut), len(stream) - position)
            buffer[:size] = stream[position : position + size]
            framer.buffer_updated(size)
            position += size
            if size >= cut:
                break


sizes = st.lists(
    st.one_of(st.integers(0, 300), st.integers(BIG_FRAME_BYTES - 2, BIG_FRAME_BYTES + 3000)), min_size=1, max_size=12
)


@settings(max_examples=60, deadline=None)
@given(sizes=sizes, cuts=st.lists(st.integers(1, 200_000), max_size=30))
def test_frames_survive_any_split_of_the_stream(sizes: list[int], cuts: list[int]) -> None:
    frames = [bytes([i % 251]) * size for i, size in enumerate(sizes)]
    stream = b"".join(struct.pack("<I", len(f)) + f for f in frames)
    framer = _Collector()
    _feed(framer, stream, cuts)
    assert [f for f, _ in framer.frames] == frames
    # Big frames arrive in buffers of their own (the receiver may keep them); small ones as views.
    assert [big for _, big in framer.frames] == [len(f) >= BIG_FRAME_BYTES for f in frames]


def test_a_frame_longer_than_the_limit_closes_the_connection() -> None:
    framer = _Collector()
    _feed(framer, struct.pack("<I", 2**31) + b"x" * 10, [])
    assert framer.is_closed
    assert framer.frames == []
