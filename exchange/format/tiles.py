"""C2SP tlog-tiles: tile paths, tile and entry-bundle contents, and a tree read from tiles.

A tiled log (c2sp.org/tlog-tiles) serves its Merkle tree as static "tiles": the n-th tile at
level l holds, for i from 0 to 255, MTH(D[(n * 256 + i) * 256**l : (n * 256 + i + 1) * 256**l]),
concatenated as 32-byte hashes. In the storage model of `exchange.format.merkle` those are the
perfect nodes at tree level 8l with indexes n * 256 .. n * 256 + 255: a level-l tile is a row of
stored nodes at level 8l, and the levels in between are rebuilt by hashing (`TileTree`).

Paths, relative to the log's prefix:

    tile/<L>/<N>[.p/<W>]          L decimal 0..63, no leading zeros
    tile/entries/<N>[.p/<W>]      the leaves themselves ("entry bundles")

where N is written in zero-padded groups of three digits, every group but the last prefixed
with "x" (1234067 is `x001/x234/067`), and `.p/<W>` marks a partial tile of W hashes (1..255).
The partial tile at level l of a tree of size s has floor(s / 256**l) mod 256 hashes; an empty
tile does not exist. An entry bundle is its entries, each as a big-endian uint16 length and the
bytes, so an entry is at most 65,535 bytes (the log's leaves are at most 64 KiB, which fits).

What this module deliberately does not do: no I/O (a `TileTree` is given a function that returns
a tile's bytes), no HTTP, no caching policy, no signature checks (`exchange.format.checkpoint`),
and no decision about which tiles to trust: a wrong tile yields a wrong root or a proof that
fails verification, which is what the verifier checks.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from exchange.errors import ProofError
from exchange.format import merkle

__all__ = [
    "MAX_ENTRY_BYTES",
    "MAX_LEVEL",
    "TILE_HEIGHT",
    "TILE_WIDTH",
    "FetchTile",
    "TileTree",
    "decode_index",
    "encode_index",
    "entries_path",
    "join_bundle",
    "parse_path",
    "split_bundle",
    "split_tile",
    "tile_path",
    "tile_width",
]

TILE_HEIGHT = 8
"""Tree levels one tile spans: a tile's hashes are the leaves of a subtree of height 8."""

TILE_WIDTH = 1 << TILE_HEIGHT
"""Hashes in a full tile (256; 8,192 bytes)."""

MAX_LEVEL = 63
"""Highest tile level a path may name."""

MAX_ENTRY_BYTES = 0xFFFF
"""Largest entry an entry bundle can hold: its length is a uint16."""

FetchTile = Callable[[int, int, int], bytes]
"""Returns tile (level, index) of width W (256 for a full tile); level -1 means the entry bundle."""

_GROUP = re.compile(r"x[0-9]{3}")
_LAST = re.compile(r"[0-9]{3}")
_DECIMAL = re.compile(r"0|[1-9][0-9]*")
# An index of a tree whose size fits in 63 bits: 63 bits / 8 bits a level, never more groups.
_MAX_INDEX = 2**63 - 1


def encode_index(index: int) -> str:
    """N in groups of three digits, all but the last with an "x": 1234067 -> "x001/x234/067"."""
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= _MAX_INDEX:
        raise ValueError("a tile index is an integer from 0 to 2^63 - 1")
    digits = str(index)
    digits = digits.zfill(-(-len(digits) // 3) * 3)
    groups = [digits[i : i + 3] for i in range(0, len(digits), 3)]
    return "/".join([*("x" + g for g in groups[:-1]), groups[-1]])


def decode_index(text: str) -> int:
    """The inverse of `encode_index`, strictly: ValueError for any other spelling.

    Leading all-zero groups ("x000/001") are refused, so that each index has one path.
    """
    parts = text.split("/")
    if not _LAST.fullmatch(parts[-1]) or not all(_GROUP.fullmatch(p) for p in parts[:-1]):
        raise ValueError(f"{text!r} is not a tile index")
    if len(parts) > 1 and parts[0] == "x000":
        raise ValueError(f"{text!r} has a leading zero group")
    value = int("".join(p.lstrip("x") for p in parts))
    if value > _MAX_INDEX:
        raise ValueError(f"{text!r} is beyond 2^63 - 1")
    return value


def _suffix(width: int) -> str:
    if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= TILE_WIDTH:
        raise ValueError(f"a tile's width is from 1 to {TILE_WIDTH}")
    return "" if width == TILE_WIDTH else f".p/{width}"


def tile_path(level: int, index: int, width: int = TILE_WIDTH) -> str:
    """`tile/<L>/<N>[.p/<W>]`, relative to the log's prefix."""
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= MAX_LEVEL:
        raise ValueError(f"a tile level is from 0 to {MAX_LEVEL}")
    return f"tile/{level}/{encode_index(index)}{_suffix(width)}"


def entries_path(index: int, width: int = TILE_WIDTH) -> str:
    """`tile/entries/<N>[.p/<W>]`, relative to the log's prefix."""
    return f"tile/entries/{encode_index(index)}{_suffix(width)}"


def parse_path(path: str) -> tuple[int | None, int, int]:
    """(level, index, width) of a path below `tile/` ("0/x001/234.p/5", "entries/000");
    level None for an entry bundle. ValueError for anything that is not a canonical tile path."""
    head, _, rest = path.partition("/")
    if head == "entries":
        level = None
    elif _DECIMAL.fullmatch(head) and len(head) <= 2 and int(head) <= MAX_LEVEL:
        level = int(head)
    else:
        raise ValueError(f"{head!r} is not a tile level")
    width = TILE_WIDTH
    if ".p/" in rest:
        rest, _, w = rest.partition(".p/")
        if not _DECIMAL.fullmatch(w) or not 1 <= int(w) < TILE_WIDTH:
            raise ValueError(f"{w!r} is not a partial tile's width (1 to {TILE_WIDTH - 1})")
        width = int(w)
    return level, decode_index(rest), width


def tile_width(level: int, index: int, size: int) -> int:
    """The width of tile (level, index) in the tree of `size` leaves: 256 if full, else the partial
    width; 0 if that tree has no such tile. Level -1 is the entry bundles (they follow level 0)."""
    per_hash = 1 << (TILE_HEIGHT * max(level, 0))
    full_tiles = size // (per_hash * TILE_WIDTH)
    if index < full_tiles:
        return TILE_WIDTH
    if index == full_tiles:
        return (size // per_hash) % TILE_WIDTH
    return 0


def split_tile(data: bytes, width: int) -> list[bytes]:
    """The hashes of a tile of `width` hashes; ValueError unless it is exactly 32 * width bytes."""
    if len(data) != merkle.HASH_SIZE * width:
        raise ValueError(f"a tile of width {width} is {merkle.HASH_SIZE * width} bytes, not {len(data)}")
    return [data[i : i + merkle.HASH_SIZE] for i in range(0, len(data), merkle.HASH_SIZE)]


def join_bundle(entries: Iterable[bytes]) -> bytes:
    """An entry bundle: each entry as a big-endian uint16 length and its bytes."""
    out = bytearray()
    for entry in entries:
        if len(entry) > MAX_ENTRY_BYTES:
            raise ValueError(f"an entry in a bundle is at most {MAX_ENTRY_BYTES} bytes")
        out += len(entry).to_bytes(2, "big") + entry
    return bytes(out)


def split_bundle(data: bytes) -> list[bytes]:
    """The entries of a bundle; ValueError on a truncated entry (a bundle has no other framing)."""
    entries, pos = [], 0
    while pos < len(data):
        if pos + 2 > len(data):
            raise ValueError("the entry bundle ends inside a length prefix")
        length = int.from_bytes(data[pos : pos + 2], "big")
        if pos + 2 + length > len(data):
            raise ValueError("the entry bundle ends inside an entry")
        entries.append(data[pos + 2 : pos + 2 + length])
        pos += 2 + length
    return entries


class TileTree:
    """The tree of `size` leaves read from its tiles: any complete node, hence roots and proofs.

    `get_node(level, index)` is a `merkle.GetNode`, so `merkle.root_at`, `consistency_proof` and
    `inclusion_proof` run over tiles unchanged. A node at tree level k = 8l + r is the fold of
    2^r consecutive hashes of one level-l tile (the tile the tree of `size` has there: full, or
    the partial one at the right edge). Each tile is fetched once (`fetched` lists them, in order).
    """

    def __init__(self, size: int, fetch: FetchTile) -> None:
        self.size = size
        self._fetch = fetch
        self._tiles: dict[tuple[int, int], list[bytes]] = {}
        self.fetched: list[tuple[int, int, int]] = []

    def tile(self, level: int, index: int) -> list[bytes]:
        """The hashes of tile (level, index) of this tree; ProofError if the tree has no such tile."""
        key = (level, index)
        if key not in self._tiles:
            width = tile_width(level, index, self.size)
            if width == 0:
                raise ProofError(f"the tree of {self.size} leaves has no tile {level}/{index}")
            self.fetched.append((level, index, width))
            self._tiles[key] = split_tile(self._fetch(level, index, width), width)
        return self._tiles[key]

    def get_node(self, level: int, index: int) -> bytes:
        if (index + 1) << level > self.size:
            raise ProofError(f"node {level}/{index} is not complete in the tree of {self.size} leaves")
        tile_level, rise = divmod(level, TILE_HEIGHT)
        first = index << rise  # the first hash at tree level 8 * tile_level under this node
        hashes = self.tile(tile_level, first // TILE_WIDTH)
        offset = first % TILE_WIDTH
        row = hashes[offset : offset + (1 << rise)]
        while len(row) > 1:
            row = [merkle.node_hash(row[i], row[i + 1]) for i in range(0, len(row), 2)]
        return row[0]

    def root(self) -> bytes:
        return merkle.root_at(self.size, self.get_node)
