"""The agent graphs' docs retriever: BM25 over the project's own documentation."""

from __future__ import annotations

import pytest

from services.controller.agents.tools import PASSAGE_CHARS, docs

pytestmark = pytest.mark.unit


def test_rare_words_decide_not_common_ones() -> None:
    found = docs("the the the and how does the expert migration roll back", 3)
    assert len(found) == 3 and all(len(p) <= PASSAGE_CHARS for p in found)
    # Every passage is about the rare words (a migration, a roll-back), none is there for "the".
    assert all("migrat" in p.lower() or "roll" in p.lower() for p in found), found


def test_a_query_of_unknown_words_finds_nothing() -> None:
    assert docs("zzzq qqqx", 5) == []
