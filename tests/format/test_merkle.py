"""exchange.format.merkle against published RFC 6962 test data, plus its refusals.

Data sources (values transcribed, no code copied):

- transparency-dev/merkle @ 417fb0c314750d94e53942e9f92e79b6d35915db
  - `testonly/constants.go`: the 8-leaf reference tree of RFC 6962 implementations (the leaf
    inputs of google/certificate-transparency's merkle tree tests), the hash of every complete
    perfect subtree by (level, index), and the root of every prefix size 0..8;
  - `cmd/proofgen/main.go`: the inclusion and consistency proofs for that tree (its leaf
    indexes are 1-based; they are converted to 0-based here);
  - `testdata/inclusion/single-entry/*.json`, `testdata/inclusion/additional/*.json` and
    `testdata/consistency/additional/*.json`: edge-case probes, transcribed below with the
    upstream expectation and ours where they differ;
  - the corrupted-probe categories of `testdata/{inclusion,consistency}/<n>/` (index +1, -1,
    XOR 2, size *2, /2, one bit flipped in each proof hash, a component removed or inserted,
    preceding and trailing garbage, wrong leaf, wrong or swapped roots) are regenerated here
    from the happy-path proofs rather than copied file by file.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable

import pytest

from exchange.errors import ProofError
from exchange.format import merkle
from exchange.format.merkle import (
    EMPTY_ROOT,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    nodes_completed_by_append,
    nodes_needed_for_append,
    nodes_needed_for_consistency,
    nodes_needed_for_inclusion,
    nodes_needed_for_root,
    root,
    root_at,
    verify_consistency,
    verify_inclusion,
)

h = bytes.fromhex

# transparency-dev/merkle testonly/constants.go LeafInputs().
LEAF_INPUTS = [
    h(""),
    h("00"),
    h("10"),
    h("2021"),
    h("3031"),
    h("40414243"),
    h("5051525354555657"),
    h("606162636465666768696a6b6c6d6e6f"),
]

# transparency-dev/merkle testonly/constants.go NodeHashes(): [level][index].
NODE_HASHES = [
    [
        h("6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"),
        h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
        h("0298d122906dcfc10892cb53a73992fc5b9f493ea4c9badb27b791b4127a7fe7"),
        h("07506a85fd9dd2f120eb694f86011e5bb4662e5c415a62917033d4a9624487e7"),
        h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
        h("4271a26be0d8a84f0bd54c8c302e7cb3a3b5d1fa6780a40bcce2873477dab658"),
        h("b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f"),
        h("46f6ffadd3d06a09ff3c5860d2755c8b9819db7df44251788c7d8e3180de8eb1"),
    ],
    [
        h("fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"),
        h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
        h("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
        h("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
    ],
    [
        h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
        h("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"),
    ],
    [
        h("5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"),
    ],
]

# transparency-dev/merkle testonly/constants.go RootHashes(): root of the first n leaves, n = 0..8.
ROOT_HASHES = [
    h("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
    h("6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"),
    h("fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"),
    h("aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77"),
    h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
    h("4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4"),
    h("76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef"),
    h("ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c"),
    h("5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"),
]

# transparency-dev/merkle cmd/proofgen/main.go inclusionProofs, as (0-based index, size, proof).
INCLUSION_PROOFS = [
    pytest.param(0, 1, [], id="leaf0-size1"),
    pytest.param(
        0,
        8,
        [
            h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
            h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            h("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"),
        ],
        id="leaf0-size8",
    ),
    pytest.param(
        5,
        8,
        [
            h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
            h("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
            h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
        ],
        id="leaf5-size8",
    ),
    pytest.param(
        2,
        3,
        [h("fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125")],
        id="leaf2-size3",
    ),
    pytest.param(
        1,
        5,
        [
            h("6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"),
            h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
        ],
        id="leaf1-size5",
    ),
]

# transparency-dev/merkle cmd/proofgen/main.go consistencyProofs, as (old size, new size, proof).
CONSISTENCY_PROOFS = [
    pytest.param(1, 1, [], id="1-1"),
    pytest.param(
        1,
        8,
        [
            h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
            h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            h("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"),
        ],
        id="1-8",
    ),
    pytest.param(
        6,
        8,
        [
            h("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
            h("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
            h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
        ],
        id="6-8",
    ),
    pytest.param(
        2,
        5,
        [
            h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
        ],
        id="2-5",
    ),
    pytest.param(
        6,
        7,
        [
            h("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
            h("b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f"),
            h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
        ],
        id="6-7",
    ),
]

# A hash that is in no tree here: transparency-dev/merkle cmd/proofgen/main.go sha256SomeHash.
SOME_HASH = h("abacaba000000000000000000000000000000000000000000060061e00123456")


def b64(s: str) -> bytes:
    return base64.b64decode(s, validate=True)


def stored_nodes() -> dict[tuple[int, int], bytes]:
    """The published perfect-subtree table of the 8-leaf tree, in the storage model's keys."""
    return {(level, index): value for level, row in enumerate(NODE_HASHES) for index, value in enumerate(row)}


def getter(nodes: dict[tuple[int, int], bytes], size: int) -> Callable[[int, int], bytes]:
    """A get_node over `nodes` that fails if asked for a node not yet complete at `size`."""

    def get_node(level: int, index: int) -> bytes:
        assert (index + 1) << level <= size, f"read node {(level, index)} incomplete at size {size}"
        return nodes[level, index]

    return get_node


# --- hashing ---------------------------------------------------------------------------------


def test_empty_root_is_sha256_of_nothing() -> None:
    assert EMPTY_ROOT == hashlib.sha256(b"").digest() == ROOT_HASHES[0]
    assert root([]) == EMPTY_ROOT


def test_leaf_hashes_match_published_level_zero() -> None:
    assert [leaf_hash(x) for x in LEAF_INPUTS] == NODE_HASHES[0]


def test_interior_nodes_match_published_table() -> None:
    for level in range(1, len(NODE_HASHES)):
        for index, value in enumerate(NODE_HASHES[level]):
            below = NODE_HASHES[level - 1]
            assert node_hash(below[2 * index], below[2 * index + 1]) == value


@pytest.mark.parametrize("size", range(9))
def test_reference_root_of_every_prefix(size: int) -> None:
    assert root([leaf_hash(x) for x in LEAF_INPUTS[:size]]) == ROOT_HASHES[size]


@pytest.mark.parametrize("size", range(9))
def test_root_at_from_published_nodes(size: int) -> None:
    assert root_at(size, getter(stored_nodes(), size)) == ROOT_HASHES[size]
    # One read per set bit of the size.
    assert len(nodes_needed_for_root(size)) == size.bit_count()


def test_domain_separation_leaf_is_not_a_node() -> None:
    # A 64-byte leaf that is two child hashes concatenated must not hash to their parent:
    # otherwise a leaf could stand in for a subtree (second preimage).
    left, right = NODE_HASHES[0][0], NODE_HASHES[0][1]
    parent = node_hash(left, right)
    assert parent == NODE_HASHES[1][0]
    assert leaf_hash(left + right) != parent
    assert leaf_hash(left + right) == hashlib.sha256(b"\x00" + left + right).digest()
    assert parent == hashlib.sha256(b"\x01" + left + right).digest()
    # And the tree of that one leaf is not the tree of the two leaves.
    assert root([leaf_hash(left + right)]) != root([left, right])


def test_node_hash_refuses_non_hash_children() -> None:
    with pytest.raises(ValueError):
        node_hash(b"\x00" * 31, b"\x00" * 32)
    with pytest.raises(ValueError):
        node_hash(b"\x00" * 32, b"\x00" * 33)


def test_root_refuses_non_hash_leaves() -> None:
    with pytest.raises(ValueError):
        root([b"short"])


# --- storage: append -------------------------------------------------------------------------


def test_appending_the_eight_leaves_stores_exactly_the_published_nodes() -> None:
    nodes: dict[tuple[int, int], bytes] = {}
    reads: list[tuple[int, int]] = []

    def get_node(level: int, index: int) -> bytes:
        reads.append((level, index))
        return nodes[level, index]

    for size, leaf in enumerate(LEAF_INPUTS):
        reads.clear()
        completed = nodes_completed_by_append(size, leaf_hash(leaf), get_node)
        # Only left siblings are read, one per completed parent.
        assert reads == nodes_needed_for_append(size)
        assert len(reads) == len(completed) - 1
        for level, index, value in completed:
            assert (level, index) not in nodes, "a stored node is never rewritten"
            nodes[level, index] = value
    assert nodes == stored_nodes()


def test_append_refuses_bad_input() -> None:
    with pytest.raises(ProofError):
        nodes_completed_by_append(-1, NODE_HASHES[0][0], getter(stored_nodes(), 8))
    with pytest.raises(ProofError, match="32-byte"):
        nodes_completed_by_append(0, b"leaf", getter(stored_nodes(), 8))


def test_corrupt_stored_node_is_reported() -> None:
    nodes = stored_nodes()
    nodes[1, 0] = b"truncated"
    with pytest.raises(ValueError, match=r"\(1, 0\)"):
        inclusion_proof(2, 8, getter(nodes, 8))


# --- inclusion ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("index", "size", "proof"), INCLUSION_PROOFS)
def test_inclusion_proof_matches_published(index: int, size: int, proof: list[bytes]) -> None:
    assert inclusion_proof(index, size, getter(stored_nodes(), size)) == proof
    verify_inclusion(leaf_hash(LEAF_INPUTS[index]), index, size, proof, ROOT_HASHES[size])


def inclusion_mutations(index: int, size: int, proof: list[bytes]) -> list[tuple[str, tuple[object, ...]]]:
    """The corrupted probes of transparency-dev/merkle testdata/inclusion/<n>/, regenerated."""
    leaf = leaf_hash(LEAF_INPUTS[index])
    good_root = ROOT_HASHES[size]
    cases: list[tuple[str, tuple[object, ...]]] = [
        ("wrong-leaf", (SOME_HASH, index, size, proof, good_root)),
        ("random-root", (leaf, index, size, proof, SOME_HASH)),
        ("empty-root", (leaf, index, size, proof, EMPTY_ROOT)),
        ("leafIdx-plus-1", (leaf, index + 1, size, proof, good_root)),
        ("leafIdx-XOR-2", (leaf, index ^ 2, size, proof, good_root)),
        ("treeSize-mul-2", (leaf, index, size * 2, proof, good_root)),
        ("treeSize-div-2", (leaf, index, size // 2, proof, good_root)),
        ("preceding-garbage", (leaf, index, size, [SOME_HASH, *proof], good_root)),
        ("trailing-garbage", (leaf, index, size, [*proof, SOME_HASH], good_root)),
        ("preceding-root", (leaf, index, size, [good_root, *proof], good_root)),
        ("trailing-root", (leaf, index, size, [*proof, good_root], good_root)),
    ]
    if index > 0:
        cases.append(("leafIdx-sub-1", (leaf, index - 1, size, proof, good_root)))
    for i in range(len(proof)):
        flipped = bytearray(proof[i])
        flipped[3] ^= 1
        cases.append(
            (
                f"modified-proof[{i}]-bit-3",
                (leaf, index, size, [*proof[:i], bytes(flipped), *proof[i + 1 :]], good_root),
            )
        )
        cases.append((f"removed-component-{i}", (leaf, index, size, proof[:i] + proof[i + 1 :], good_root)))
        cases.append(
            (f"inserted-component-{i}", (leaf, index, size, [*proof[:i], SOME_HASH, *proof[i:]], good_root))
        )
    return cases


@pytest.mark.parametrize(("index", "size", "proof"), INCLUSION_PROOFS)
def test_corrupted_inclusion_probes_fail(index: int, size: int, proof: list[bytes]) -> None:
    for name, args in inclusion_mutations(index, size, proof):
        try:
            verify_inclusion(*args)  # type: ignore[arg-type]
        except ProofError:
            continue
        pytest.fail(f"corrupted probe {name} verified")


# transparency-dev/merkle testdata/inclusion/single-entry/*.json and additional/*/*.json.
# "" stands for an empty byte string, which is how those probes spell a missing hash.
SINGLE = "DTrtAjFI/9KiWfvQzcf7PPl1ZYdg03dbgq9vkKrMLfw="
EMPTY_B64 = "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
RANDOM_LEAF = "q6yroAAAAAAAAAAAAAAAAAAAAAAAAAAAAGAGHgASNFY="
INCLUSION_PROBES: list[tuple[str, int, int, str, str, list[bytes], bool]] = [
    # (name, index, size, root, leaf hash, proof, upstream wantErr)
    ("single-entry/matching-root-and-leaf", 0, 1, SINGLE, SINGLE, [], False),
    ("single-entry/empty-leaf", 0, 1, SINGLE, "", [], True),
    ("single-entry/empty-root", 0, 1, "", SINGLE, [], True),
    ("single-entry/empty-root-and-leaf", 0, 1, "", "", [], True),
    ("additional/0/empty-root-and-random-leaf", 0, 0, EMPTY_B64, RANDOM_LEAF, [], True),
    ("additional/0/empty-root", 0, 0, EMPTY_B64, "", [], True),
    ("additional/0/random-leaf", 0, 0, "", RANDOM_LEAF, [], True),
    ("additional/1/empty-root-and-random-leaf", 0, 1, EMPTY_B64, RANDOM_LEAF, [], True),
    ("additional/1/empty-root", 0, 1, EMPTY_B64, "", [], True),
    ("additional/1/random-leaf", 0, 1, "", RANDOM_LEAF, [], True),
    ("additional/2/empty-root-and-random-leaf", 1, 0, EMPTY_B64, RANDOM_LEAF, [], True),
    ("additional/2/empty-root", 1, 0, EMPTY_B64, "", [], True),
    ("additional/2/random-leaf", 1, 0, "", RANDOM_LEAF, [], True),
    ("additional/3/empty-root-and-random-leaf", 2, 1, EMPTY_B64, RANDOM_LEAF, [], True),
    ("additional/3/empty-root", 2, 1, EMPTY_B64, "", [], True),
    ("additional/3/random-leaf", 2, 1, "", RANDOM_LEAF, [], True),
]


@pytest.mark.parametrize(
    ("index", "size", "root_b64", "leaf_b64", "proof", "want_error"),
    [pytest.param(*p[1:], id=str(p[0])) for p in INCLUSION_PROBES],
)
def test_published_inclusion_probes(
    index: int, size: int, root_b64: str, leaf_b64: str, proof: list[bytes], want_error: bool
) -> None:
    args = (b64(leaf_b64), index, size, proof, b64(root_b64))
    if want_error:
        with pytest.raises(ProofError):
            verify_inclusion(*args)
    else:
        verify_inclusion(*args)


# --- consistency -------------------------------------------------------------------------------


@pytest.mark.parametrize(("old", "new", "proof"), CONSISTENCY_PROOFS)
def test_consistency_proof_matches_published(old: int, new: int, proof: list[bytes]) -> None:
    assert consistency_proof(old, new, getter(stored_nodes(), new)) == proof
    verify_consistency(old, new, ROOT_HASHES[old], ROOT_HASHES[new], proof)


def consistency_mutations(old: int, new: int, proof: list[bytes]) -> list[tuple[str, tuple[object, ...]]]:
    """The corrupted probes of transparency-dev/merkle testdata/consistency/<n>/, regenerated."""
    r1, r2 = ROOT_HASHES[old], ROOT_HASHES[new]
    cases: list[tuple[str, tuple[object, ...]]] = [
        ("wrong-root1", (old, new, SOME_HASH, r2, proof)),
        ("wrong-root2", (old, new, r1, SOME_HASH, proof)),
        ("swapped-roots", (old, new, r2, r1, proof)),
        ("size1-plus-1", (old + 1, new, r1, r2, proof)),
        ("size1-sub-1", (old - 1, new, r1, r2, proof)),
        ("size1-XOR-2", (old ^ 2, new, r1, r2, proof)),
        ("size2-mul-2", (old, new * 2, r1, r2, proof)),
        ("size2-div-2", (old, new // 2, r1, r2, proof)),
        ("empty-proof", (old, new, r1, r2, [])),
        ("truncated-proof", (old, new, r1, r2, proof[:-1])),
        ("preceding-garbage", (old, new, r1, r2, [SOME_HASH, *proof])),
        ("trailing-garbage", (old, new, r1, r2, [*proof, SOME_HASH])),
        ("preceding-root1", (old, new, r1, r2, [r1, *proof])),
        ("preceding-root2", (old, new, r1, r2, [r2, *proof])),
        ("trailing-root1", (old, new, r1, r2, [*proof, r1])),
        ("trailing-root2", (old, new, r1, r2, [*proof, r2])),
        ("preceding-proof-0", (old, new, r1, r2, [proof[0], *proof])),
    ]
    for i in range(len(proof)):
        flipped = bytearray(proof[i])
        flipped[4] ^= 1
        cases.append(
            (f"modified-proof@{i}-bit-4", (old, new, r1, r2, [*proof[:i], bytes(flipped), *proof[i + 1 :]]))
        )
    return cases


@pytest.mark.parametrize(
    ("old", "new", "proof"), [p for p in CONSISTENCY_PROOFS if p.values[0] != p.values[1]]
)
def test_corrupted_consistency_probes_fail(old: int, new: int, proof: list[bytes]) -> None:
    for name, args in consistency_mutations(old, new, proof):
        o, n = args[0], args[1]
        assert isinstance(o, int) and isinstance(n, int)
        if (o, n) != (old, new) and 0 <= o <= n <= 8 and args[2:4] == (ROOT_HASHES[o], ROOT_HASHES[n]):
            continue  # a mutation that happens to name another honest pair of trees
        try:
            verify_consistency(*args)  # type: ignore[arg-type]
        except ProofError:
            continue
        pytest.fail(f"corrupted probe {name} verified")


DONT_CARE_1 = "ZG9uJ3QgY2FyZSAx"  # base64("don't care 1"): 12 bytes, not a hash
DONT_CARE_2 = "ZG9uJ3QgY2FyZSAy"
# transparency-dev/merkle testdata/consistency/additional/*.json:
# (name, old, new, root1, root2, proof, upstream wantErr, our error?). Ours differs where the
# upstream accepts 12-byte "don't care" roots: every hash here must be 32 bytes.
CONSISTENCY_PROBES = [
    (
        "consistency-check-on-empty-tree-size1-is-zero-is-useless",
        0,
        1,
        EMPTY_B64,
        EMPTY_B64,
        [EMPTY_B64],
        True,
        True,
    ),
    ("roots-do-not-match-and-sizes-are-zero", 0, 0, EMPTY_B64, DONT_CARE_2, [], True, True),
    ("roots-do-not-not-match-and-sizes-are-one", 1, 1, EMPTY_B64, DONT_CARE_2, [], True, True),
    ("size1-is-greater-than-size2-again", 2, 1, DONT_CARE_1, DONT_CARE_2, [], True, True),
    ("size1-is-greater-than-size2", 1, 0, DONT_CARE_1, DONT_CARE_2, [], True, True),
    ("size1-is-zero-and-does-not-equal-size2", 0, 1, DONT_CARE_1, DONT_CARE_2, [], True, True),
    ("size1-is-zero-and-size2-is-not-zero", 0, 1, EMPTY_B64, DONT_CARE_2, [], True, True),
    ("sizes-are-equal-one-and-proof-is-empty", 1, 1, DONT_CARE_2, DONT_CARE_2, [], False, True),
    ("sizes-are-equal-one-but-roots-are-not", 1, 1, DONT_CARE_1, DONT_CARE_2, [], True, True),
    ("sizes-are-equal-zero-and-proof-is-empty", 0, 0, DONT_CARE_1, DONT_CARE_1, [], True, True),
    ("sizes-are-equal-zero-but-roots-are-not", 0, 0, DONT_CARE_1, DONT_CARE_2, [], True, True),
    ("sizes-do-not-watch-and-proof-is-empty", 1, 2, DONT_CARE_1, DONT_CARE_2, [], True, True),
    (
        "sizes-match-but-proof-is-not-empty-and-sizes-are-one",
        1,
        1,
        EMPTY_B64,
        EMPTY_B64,
        [EMPTY_B64],
        True,
        True,
    ),
    (
        "sizes-match-but-proof-is-not-empty-and-sizes-are-zero",
        0,
        0,
        EMPTY_B64,
        EMPTY_B64,
        [EMPTY_B64],
        True,
        True,
    ),
]


@pytest.mark.parametrize(
    ("old", "new", "root1", "root2", "proof", "upstream_error", "our_error"),
    [pytest.param(*p[1:], id=str(p[0])) for p in CONSISTENCY_PROBES],
)
def test_published_consistency_probes(
    old: int, new: int, root1: str, root2: str, proof: list[str], upstream_error: bool, our_error: bool
) -> None:
    assert upstream_error or our_error  # we are never laxer than upstream
    args = (old, new, b64(root1), b64(root2), [b64(p) for p in proof])
    if our_error:
        with pytest.raises(ProofError):
            verify_consistency(*args)
    else:
        verify_consistency(*args)


def test_same_size_with_real_32_byte_roots() -> None:
    # The upstream "sizes are equal and proof is empty" case, with hashes of the right length.
    verify_consistency(5, 5, ROOT_HASHES[5], ROOT_HASHES[5], [])
    verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [])


def test_consistency_from_empty_tree() -> None:
    verify_consistency(0, 8, EMPTY_ROOT, ROOT_HASHES[8], [])
    assert consistency_proof(0, 8, getter(stored_nodes(), 8)) == []
    assert nodes_needed_for_consistency(0, 8) == []
    with pytest.raises(ProofError, match="from the empty tree must be empty"):
        verify_consistency(0, 8, EMPTY_ROOT, ROOT_HASHES[8], [ROOT_HASHES[8]])
    with pytest.raises(ProofError, match="old tree is empty"):
        verify_consistency(0, 8, ROOT_HASHES[1], ROOT_HASHES[8], [])


# --- refusals, each with its own message -----------------------------------------------------


def test_inclusion_refusals() -> None:
    leaf = leaf_hash(LEAF_INPUTS[0])
    good = INCLUSION_PROOFS[1].values[2]
    assert isinstance(good, list)
    cases: list[tuple[str, tuple[object, ...]]] = [
        ("empty tree", (leaf, 0, 0, [], EMPTY_ROOT)),
        ("not in a tree of 8", (leaf, 8, 8, good, ROOT_HASHES[8])),
        ("not in a tree of 8", (leaf, 9, 8, good, ROOT_HASHES[8])),
        ("must not be negative", (leaf, -1, 8, good, ROOT_HASHES[8])),
        ("must not be negative", (leaf, 0, -8, good, ROOT_HASHES[8])),
        ("must be an integer", (leaf, 0, True, good, ROOT_HASHES[8])),
        ("too long: 4 hashes where 3", (leaf, 0, 8, [*good, SOME_HASH], ROOT_HASHES[8])),
        ("too short: 2 hashes where 3", (leaf, 0, 8, good[:2], ROOT_HASHES[8])),
        ("too long: 1 hash where 0", (leaf, 0, 1, [SOME_HASH], leaf)),
        ("leaf hash must be a 32-byte", (leaf[:31], 0, 8, good, ROOT_HASHES[8])),
        ("root hash must be a 32-byte", (leaf, 0, 8, good, ROOT_HASHES[8] + b"\x00")),
        ("position 1 must be a 32-byte", (leaf, 0, 8, [good[0], good[1][:16], good[2]], ROOT_HASHES[8])),
        ("does not lead to the expected root", (leaf, 0, 8, good, ROOT_HASHES[7])),
    ]
    for message, args in cases:
        with pytest.raises(ProofError, match=message):
            verify_inclusion(*args)  # type: ignore[arg-type]


def test_consistency_refusals() -> None:
    good = CONSISTENCY_PROOFS[2].values[2]  # 6 -> 8
    assert isinstance(good, list)
    r6, r8 = ROOT_HASHES[6], ROOT_HASHES[8]
    cases: list[tuple[str, tuple[object, ...]]] = [
        ("larger than the new tree size", (8, 6, r8, r6, good)),
        ("must not be negative", (-1, 8, r6, r8, good)),
        ("same size must be empty", (6, 6, r6, r6, good)),
        ("the log forked", (6, 6, r6, r8, [])),
        ("too long: 4 hashes where 3", (6, 8, r6, r8, [*good, SOME_HASH])),
        ("too short: 2 hashes where 3", (6, 8, r6, r8, good[:2])),
        ("too short: 0 hashes where 3", (6, 8, r6, r8, [])),
        ("old root hash must be a 32-byte", (6, 8, r6[:1], r8, good)),
        ("new root hash must be a 32-byte", (6, 8, r6, b"", good)),
        ("does not lead to the old root", (6, 8, ROOT_HASHES[5], r8, good)),
        ("does not lead to the new root", (6, 8, r6, ROOT_HASHES[7], good)),
        ("new tree is empty", (0, 0, EMPTY_ROOT, SOME_HASH, [])),
    ]
    for message, args in cases:
        with pytest.raises(ProofError, match=message):
            verify_consistency(*args)  # type: ignore[arg-type]


def test_proof_generation_refusals() -> None:
    get = getter(stored_nodes(), 8)
    with pytest.raises(ProofError, match="empty tree"):
        inclusion_proof(0, 0, get)
    with pytest.raises(ProofError, match="not in a tree of 8"):
        inclusion_proof(8, 8, get)
    with pytest.raises(ProofError, match="not in a tree of 8"):
        nodes_needed_for_inclusion(8, 8)
    with pytest.raises(ProofError, match="larger than the new tree size"):
        consistency_proof(8, 7, get)
    with pytest.raises(ProofError, match="larger than the new tree size"):
        nodes_needed_for_consistency(8, 7)
    with pytest.raises(ProofError, match="must not be negative"):
        nodes_needed_for_root(-1)


def test_public_names() -> None:
    assert set(merkle.__all__) >= {
        "leaf_hash",
        "node_hash",
        "EMPTY_ROOT",
        "root",
        "root_at",
        "nodes_completed_by_append",
        "inclusion_proof",
        "consistency_proof",
        "nodes_needed_for_inclusion",
        "nodes_needed_for_consistency",
        "verify_inclusion",
        "verify_consistency",
    }
