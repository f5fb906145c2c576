"""c2sp.org/tlog-proof: the spec's own example parses, proofs round-trip, and every deviation fails."""

from __future__ import annotations

import base64
import os

import pytest

from exchange.errors import FormatError
from exchange.format import merkle
from exchange.format.checkpoint import Checkpoint
from exchange.format.note import Signer, sign_note
from exchange.format.tlogproof import HEADER, MAX_PROOF_HASHES, TlogProof

# The example of c2sp.org/tlog-proof, as the spec prints it (its signatures are abbreviated
# with "[...]", so the checkpoint is not a note that opens; the proof around it parses).
SPEC_EXAMPLE = """\
c2sp.org/tlog-proof@v1
extra YWdlLXYxLjIuMS1kYXJ3aW4tYXJtNjQudGFyLmd6kYXJ3aW4tYXJ
index 73894
gSKyXoYZUgZ6jduWYrkDOARinOMGJveXjgMkBTcdPlQ=
B95lDa8R83lS8n0eG+o0buTxRKQTYFi//1U8anccXmA=
EKNzoDWG8LGC0Yp9o+sv3qllpMP9uHQ9B20KNL+Q1zs=
RoopEkOdqkYqMB4MJXrbt/hMjOxsVn0IrWjpz1ZMMes=
AHCioX9nLjsrse6YhjRRmk1WUEirVOLLRoOQ6vfO5vk=

example.com/fancylog
109482
sFodV/vSp5O8n9a8QpW6PRY97tfOSW5bsc2Xl/EQi08=

\u2014 example.com/fancylog hI2DJw[...]1roloI=
\u2014 witness1.example mJirIklj[...]qY9v2B/5bg==
\u2014 witness2.example TnKKVHLX[...]xwYwrSjgow==
\u2014 witness3.example S4X82uH5[...]3oEcROGLFQ==
""".encode()


def test_the_specs_example_parses_and_prints_back_byte_for_byte() -> None:
    proof = TlogProof.parse(SPEC_EXAMPLE)
    assert proof.index == 73894
    assert proof.extra == base64.b64decode("YWdlLXYxLjIuMS1kYXJ3aW4tYXJtNjQudGFyLmd6kYXJ3aW4tYXJ")
    assert proof.extra.startswith(b"age-v1.2.1-darwin-arm64.tar.gz")
    assert len(proof.proof) == 5
    assert proof.proof[0] == base64.b64decode("gSKyXoYZUgZ6jduWYrkDOARinOMGJveXjgMkBTcdPlQ=")
    assert proof.checkpoint.startswith(b"example.com/fancylog\n109482\n")
    assert proof.checkpoint.endswith(b"3oEcROGLFQ==\n")
    assert proof.to_bytes() == SPEC_EXAMPLE


def _real_proof(extra: bytes | None = b'{"event":1}', size: int = 11, index: int = 6) -> TlogProof:
    leaves = [b"leaf %d" % i for i in range(size)]
    hashes = [merkle.leaf_hash(leaf) for leaf in leaves]
    nodes: dict[tuple[int, int], bytes] = {}
    for n, h in enumerate(hashes):
        for level, i, node in merkle.nodes_completed_by_append(n, h, lambda level, i: nodes[level, i]):
            nodes[level, i] = node
    proof = merkle.inclusion_proof(index, size, lambda level, i: nodes[level, i])
    signer = Signer("example.com/log", os.urandom(32))
    note = sign_note(Checkpoint("example.com/log", size, merkle.root(hashes)).to_text(), [signer])
    return TlogProof(index=index, proof=tuple(proof), checkpoint=note, extra=extra)


@pytest.mark.parametrize("extra", [b'{"event":1}', None, bytes(range(256))], ids=["json", "none", "binary"])
def test_round_trip(extra: bytes | None) -> None:
    proof = _real_proof(extra)
    data = proof.to_bytes()
    assert data.startswith((HEADER + "\n").encode())
    assert (b"\nextra " in data) is (extra is not None)
    assert TlogProof.parse(data) == proof


def test_a_proof_of_the_only_leaf_has_no_hashes() -> None:
    proof = _real_proof(size=1, index=0)
    assert proof.proof == ()
    assert b"index 0\n\n" in proof.to_bytes()
    assert TlogProof.parse(proof.to_bytes()) == proof


def _swap(data: bytes, old: bytes, new: bytes) -> bytes:
    assert data.count(old) >= 1
    return data.replace(old, new, 1)


GOOD = _real_proof().to_bytes()
_HASH = GOOD.split(b"\n")[3]


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(_swap(GOOD, b"@v1", b"@v2"), id="other version"),
        pytest.param(b"\n" + GOOD, id="empty first line"),
        pytest.param(_swap(GOOD, b"index 6", b"index 06"), id="leading zero"),
        pytest.param(_swap(GOOD, b"index 6", b"index -6"), id="negative index"),
        pytest.param(_swap(GOOD, b"index 6", b"index 9223372036854775807"), id="index beyond any tree"),
        pytest.param(_swap(GOOD, b"index 6", b"index  6"), id="two spaces"),
        pytest.param(_swap(GOOD, b"index 6\n", b""), id="no index"),
        pytest.param(_swap(GOOD, b"extra ", b"extra  "), id="extra with a stray space"),
        pytest.param(_swap(GOOD, b"extra eyJldmVudCI6MX0=", b"extra "), id="empty extra"),
        pytest.param(_swap(GOOD, b"extra eyJldmVudCI6MX0=", b"extra eyJldmVudCI6MX1="), id="stray bits"),
        pytest.param(_swap(GOOD, b"extra eyJldmVudCI6MX0=", b"extra eyJldmVudCI6MX0"), id="unpadded"),
        pytest.param(_swap(GOOD, b"index 6\n", b"index 6\nextra eyJldmVudCI6MX0=\n"), id="extra after index"),
        pytest.param(_swap(GOOD, _HASH, _HASH[:-4] + b"===="), id="bad hash"),
        pytest.param(_swap(GOOD, _HASH, base64.b64encode(bytes(31))), id="short hash"),
        pytest.param(_swap(GOOD, _HASH + b"\n", _HASH + b"\r\n"), id="CRLF"),
        pytest.param(GOOD.replace(b"\n\n", b"\n", 1), id="no empty line before the checkpoint"),
        pytest.param(GOOD[: GOOD.index(b"\n\n") + 2], id="no checkpoint"),
        pytest.param(GOOD[:-1], id="checkpoint without final newline"),
        pytest.param(_swap(GOOD, b"\n\n", b"\n\n\n"), id="two empty lines"),
        pytest.param(_swap(GOOD, _HASH, "\u00e9".encode()), id="not ASCII"),
        pytest.param(
            _swap(GOOD, _HASH + b"\n", (_HASH + b"\n") * (MAX_PROOF_HASHES + 1)), id="too many hashes"
        ),
    ],
)
def test_deviations_are_refused(bad: bytes) -> None:
    with pytest.raises(FormatError) as refused:
        TlogProof.parse(bad)
    assert refused.value.code == "bad-tlog-proof"


def test_nothing_unprintable_is_built() -> None:
    good = _real_proof()
    for kwargs in (
        {"index": -1},
        {"index": 2**63 - 1},
        {"proof": (bytes(31),)},
        {"proof": (bytes(32),) * (MAX_PROOF_HASHES + 1)},
        {"extra": b""},
        {"checkpoint": good.checkpoint[:-1]},
        {"checkpoint": b"\n" + good.checkpoint},
    ):
        fields = {
            "index": good.index,
            "proof": good.proof,
            "checkpoint": good.checkpoint,
            "extra": good.extra,
        }
        with pytest.raises(FormatError):
            TlogProof(**(fields | kwargs))  # type: ignore[arg-type]
