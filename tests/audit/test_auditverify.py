"""The offline verifier's own pieces: canonical JSON without rfc8785, and what it imports."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import rfc8785

from exchange.auditverify import _CompactRange, canonical_json, parse_leaf
from exchange.format import merkle

VALUES = [
    {"b": 1, "a": [True, False, None], "c": {"z": "", "y": -5}},
    {"\U0001f600": 1, "\ue000": 2, "a": 3},  # UTF-16 order puts the emoji (surrogates) first
    {"s": 'quote " backslash \\ slash / tab \t nl \n cr \r bs \b ff \f nul \x00 us \x1f del \x7f'},
    {"unicode": "é ü 中文 \u2028 \u2029", "max": 2**53 - 1, "min": -(2**53 - 1), "zero": 0},
    [],
    {},
]


@pytest.mark.parametrize("value", VALUES)
def test_canonical_json_matches_rfc8785(value: object) -> None:
    assert canonical_json(value) == rfc8785.dumps(value)


@pytest.mark.parametrize(
    "leaf",
    [
        b'{"a":1.5}',  # a float
        b'{"a":1,"a":2}',  # a duplicate name
        b'{"b":1,"a":2}',  # out of order
        b'{"a": 1}',  # whitespace
        b'{"a":"\\u0041"}',  # an escape where none is needed
        b'{"a":9007199254740993}',  # beyond 2^53
        b"[1]",  # not an object
        b"\xff",  # not UTF-8
    ],
)
def test_parse_leaf_refuses_non_canonical_bytes(leaf: bytes) -> None:
    with pytest.raises(ValueError):
        parse_leaf(leaf)


def test_compact_range_root_matches_the_reference() -> None:
    hashes = [merkle.leaf_hash(json.dumps(i).encode()) for i in range(70)]
    tree = _CompactRange()
    assert tree.root() == merkle.EMPTY_ROOT
    for n, h in enumerate(hashes, start=1):
        tree.append(h)
        assert tree.root() == merkle.root(hashes[:n])


def test_the_verifier_needs_only_the_standard_library_and_pynacl() -> None:
    code = (
        "import sys, exchange.auditverify\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'aiohttp', 'asyncpg', 'aiosqlite', 'rfc8785', 'boto3', 'botocore', 'click', 'yarl'})\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
