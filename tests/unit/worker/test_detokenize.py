"""The detokenizer: whole characters out, stop strings never leaked, nothing sent twice across a hand-off."""

from __future__ import annotations

import pytest

from services.worker.engines.detokenize import OutputText
from services.worker.engines.sim.executor import ByteDetokenizer

pytestmark = pytest.mark.unit


def _bytes(text: str) -> list[int]:
    return [16 + b for b in text.encode()]


def test_multibyte_characters_come_out_whole_and_stops_are_never_leaked() -> None:
    out = OutputText(ByteDetokenizer(), prompt=[20], resume=[], stop=("STOP",))
    released = ""
    for token in _bytes("héllo ST"):
        out.add([token])
        released += out.take(final=False)
    assert released == "héllo "  # "ST" is held back: it may start "STOP"
    for token in _bytes("OP and more"):
        out.add([token])
    assert out.stopped
    assert released + out.take(final=True) == "héllo "


def test_resumed_text_is_not_released_again() -> None:
    out = OutputText(ByteDetokenizer(), prompt=[20], resume=_bytes("abc"), stop=(), resume_text_chars=3)
    out.add(_bytes("d"))
    assert out.take(final=True) == "d"


def test_a_character_split_across_a_hand_off_comes_out_whole() -> None:
    first, second = _bytes("é")  # two UTF-8 bytes: the first worker's text ends before the character
    out = OutputText(ByteDetokenizer(), prompt=[20], resume=[first], stop=(), resume_text_chars=0)
    out.add([second, *_bytes("x")])
    assert out.take(final=True) == "éx"


def test_text_held_back_for_a_possible_stop_is_sent_after_a_resume() -> None:
    first = OutputText(ByteDetokenizer(), prompt=[20], resume=[], stop=("STOP",))
    for token in _bytes("ab ST"):
        first.add([token])
    sent = first.take(final=False)
    assert sent == "ab "  # "ST" held back when the worker failed
    out = OutputText(
        ByteDetokenizer(), prompt=[20], resume=_bytes("ab ST"), stop=("STOP",), resume_text_chars=len(sent)
    )
    out.add(_bytes("AR"))
    assert sent + out.take(final=True) == "ab STAR"
