"""C2SP tlog-tiles: paths from the spec's own examples, tiles against RFC 6962 hashes by hand."""

from __future__ import annotations

import hashlib

import pytest

from exchange.errors import ProofError
from exchange.format import merkle, tiles


def _leaf(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _mth(hashes: list[bytes]) -> bytes:
    # RFC 6962 2.1 by its definition, independent of exchange.format.merkle.
    if len(hashes) == 1:
        return hashes[0]
    k = 1
    while k * 2 < len(hashes):
        k *= 2
    return _node(_mth(hashes[:k]), _mth(hashes[k:]))


def test_index_encoding_from_the_spec() -> None:
    # "index 1234067 will be encoded as x001/x234/067"
    assert tiles.encode_index(1234067) == "x001/x234/067"
    assert tiles.decode_index("x001/x234/067") == 1234067
    assert tiles.encode_index(0) == "000"
    assert tiles.encode_index(999) == "999"
    assert tiles.encode_index(1000) == "x001/000"


def test_paths() -> None:
    assert tiles.tile_path(0, 1234067) == "tile/0/x001/x234/067"
    assert tiles.tile_path(2, 5, 17) == "tile/2/005.p/17"
    assert tiles.entries_path(1234067, 112) == "tile/entries/x001/x234/067.p/112"
    assert tiles.parse_path("0/x001/x234/067") == (0, 1234067, 256)
    assert tiles.parse_path("entries/005.p/17") == (None, 5, 17)
    assert tiles.parse_path("63/000") == (63, 0, 256)


@pytest.mark.parametrize(
    "path",
    [
        "64/000",
        "01/000",
        "0/1",
        "0/0001",
        "0/x000/001",
        "0/001/x002",
        "0/000.p/0",
        "0/000.p/256",
        "0/000.p/012",
        "0/x",
        "tiles/000",
        "0/000.p/",
        "0/-01",
        "0/x009/x223/x372/x036/x854/x775/808",
    ],
)
def test_non_canonical_paths_are_refused(path: str) -> None:
    with pytest.raises(ValueError):
        tiles.parse_path(path)


def test_widths_from_the_spec() -> None:
    # "a tree of size 70,000 will be represented by 273 full level 0 tiles, one partial level 0
    # tile of width 112, one full level 1 tile, one partial level 1 tile of width 17, and one
    # partial level 2 tile of width 1."
    size = 70_000
    assert [tiles.tile_width(0, n, size) for n in (0, 272, 273, 274)] == [256, 256, 112, 0]
    assert [tiles.tile_width(1, n, size) for n in (0, 1, 2)] == [256, 17, 0]
    assert [tiles.tile_width(2, n, size) for n in (0, 1)] == [1, 0]
    assert tiles.tile_width(3, 0, size) == 0
    # "a tree of size 256 will be represented by a full level 0 tile and a partial level 1 tile
    # of width 1."
    assert [tiles.tile_width(0, 0, 256), tiles.tile_width(0, 1, 256)] == [256, 0]
    assert [tiles.tile_width(1, 0, 256), tiles.tile_width(2, 0, 256)] == [1, 0]
    # Entry bundles are cut like level 0.
    assert tiles.tile_width(-1, 273, size) == 112


def test_bundles_are_uint16_length_prefixed() -> None:
    bundle = tiles.join_bundle([b"ab", b"", b"x" * 300])
    assert bundle == b"\x00\x02ab\x00\x00\x01\x2c" + b"x" * 300
    assert tiles.split_bundle(bundle) == [b"ab", b"", b"x" * 300]
    for truncated in (bundle[:1], bundle[:3], bundle[:-1]):
        with pytest.raises(ValueError):
            tiles.split_bundle(truncated)
    with pytest.raises(ValueError):
        tiles.join_bundle([b"x" * 65536])


def _tiles_of(leaves: list[bytes]) -> dict[tuple[int, int, int], bytes]:
    """Every tile of the tree of these leaves, from the spec's formula, with hashlib."""
    size = len(leaves)
    hashes = [_leaf(x) for x in leaves]
    out: dict[tuple[int, int, int], bytes] = {}
    for level in range(3):
        span = 256**level
        for n in range(size // (256 * span) + 1):
            row = []
            for i in range(256):
                lo, hi = (n * 256 + i) * span, (n * 256 + i + 1) * span
                if hi > size:
                    break
                row.append(_mth(hashes[lo:hi]))
            if row:
                out[level, n, len(row)] = b"".join(row)
    return out


@pytest.mark.parametrize("size", [1, 2, 3, 255, 256, 257, 600])
def test_tile_tree_matches_rfc6962(size: int) -> None:
    leaves = [f"leaf {i}".encode() for i in range(size)]
    served = _tiles_of(leaves)
    tree = tiles.TileTree(size, lambda level, n, w: served[level, n, w])
    hashes = [_leaf(x) for x in leaves]
    assert tree.root() == _mth(hashes)
    # Roots of every earlier size, and consistency proofs to them, come out of the same tiles.
    for old in sorted({1, size // 2, size - 1, size} - {0}):
        proof = merkle.consistency_proof(old, size, tree.get_node)
        merkle.verify_consistency(old, size, _mth(hashes[:old]), _mth(hashes), proof)
        assert merkle.root_at(old, tree.get_node) == _mth(hashes[:old])
    assert len(set(tree.fetched)) == len(tree.fetched)  # each tile once


def test_a_node_past_the_tree_or_a_missing_tile_is_refused() -> None:
    leaves = [bytes([i]) for i in range(10)]
    served = _tiles_of(leaves)
    tree = tiles.TileTree(10, lambda level, n, w: served[level, n, w])
    with pytest.raises(ProofError):
        tree.get_node(2, 2)  # leaves 8..11, not all in the tree
    with pytest.raises(ProofError):
        tree.tile(1, 0)  # a tree of 10 leaves has no level-1 tile
    short = tiles.TileTree(10, lambda level, n, w: served[level, n, w][:-1])
    with pytest.raises(ValueError):
        short.root()
