from __future__ import annotations

import pytest

from shared.hashing import HASH_BYTES, BlockHasher, from_hex, to_hex

pytestmark = pytest.mark.unit


def test_blocks_name_their_whole_prefix() -> None:
    hasher = BlockHasher("m", 4)
    a = hasher.hashes([1, 2, 3, 4, 5, 6, 7, 8, 9])
    b = hasher.hashes([1, 2, 3, 4, 5, 6, 7, 0])
    assert len(a) == 2  # the partial tail block is not named
    assert a[0] == b[0]
    assert a[1] != b[1]
    assert all(len(h) == HASH_BYTES for h in a)
    # Same tokens in a later block after a different prefix get another name.
    c = hasher.hashes([9, 9, 9, 9, 5, 6, 7, 8])
    assert c[1] != a[1]


def test_extend_continues_a_chain() -> None:
    hasher = BlockHasher("m", 2)
    tokens = list(range(10))
    whole = hasher.hashes(tokens)
    assert hasher.extend(whole[1], tokens[4:]) == whole[2:]


@pytest.mark.parametrize(
    ("left", "right"),
    [(BlockHasher("a", 4), BlockHasher("b", 4)), (BlockHasher("a", 4), BlockHasher("a", 2))],
    ids=["model", "block-size"],
)
def test_chains_of_different_models_or_sizes_never_meet(left: BlockHasher, right: BlockHasher) -> None:
    tokens = list(range(16))
    assert not set(left.hashes(tokens)) & set(right.hashes(tokens))


def test_hex_round_trip_and_refusal() -> None:
    h = BlockHasher("m", 1).hashes([7])[0]
    assert from_hex(to_hex(h)) == h
    with pytest.raises(ValueError, match="16 bytes"):
        from_hex("abcd")


def test_block_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        BlockHasher("m", 0)
