"""exchange.format.merkle against a naive RFC 9162 reference, exhaustively, and its read bounds.

The reference below is written straight from the recursive definitions of RFC 9162 section 2.1
(MTH, PATH in 2.1.3.1, SUBPROOF/PROOF in 2.1.4.1) over lists of leaf hashes. It shares nothing
with the module under test but `leaf_hash` / `node_hash`, whose outputs the published vectors in
test_merkle.py pin down.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence

import pytest

from exchange.errors import ProofError
from exchange.format.merkle import (
    EMPTY_ROOT,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    nodes_completed_by_append,
    nodes_needed_for_consistency,
    nodes_needed_for_inclusion,
    nodes_needed_for_root,
    root_at,
    verify_consistency,
    verify_inclusion,
)

MAX_LEAVES = 70


# --- the reference: RFC 9162 2.1, recursively, with list slices -------------------------------


def ref_mth(d: Sequence[bytes]) -> bytes:
    n = len(d)
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return d[0]
    k = 1
    while k * 2 < n:
        k *= 2
    return node_hash(ref_mth(d[:k]), ref_mth(d[k:]))


def ref_path(m: int, d: Sequence[bytes]) -> list[bytes]:
    n = len(d)
    if n == 1:
        return []
    k = 1
    while k * 2 < n:
        k *= 2
    if m < k:
        return [*ref_path(m, d[:k]), ref_mth(d[k:])]
    return [*ref_path(m - k, d[k:]), ref_mth(d[:k])]


def ref_subproof(m: int, d: Sequence[bytes], b: bool) -> list[bytes]:
    n = len(d)
    if m == n:
        return [] if b else [ref_mth(d)]
    k = 1
    while k * 2 < n:
        k *= 2
    if m <= k:
        return [*ref_subproof(m, d[:k], b), ref_mth(d[k:])]
    return [*ref_subproof(m - k, d[k:], False), ref_mth(d[:k])]


def ref_proof(m: int, d: Sequence[bytes]) -> list[bytes]:
    return ref_subproof(m, d, True)


# --- a tree of MAX_LEAVES leaves, stored through nodes_completed_by_append -------------------

LEAVES = [leaf_hash(b"leaf %d" % i) for i in range(MAX_LEAVES)]


def build_store(leaves: Sequence[bytes]) -> dict[tuple[int, int], bytes]:
    nodes: dict[tuple[int, int], bytes] = {}
    for size, leaf in enumerate(leaves):
        for level, index, value in nodes_completed_by_append(size, leaf, lambda lv, ix: nodes[lv, ix]):
            nodes[level, index] = value
    return nodes


STORE = build_store(LEAVES)


class CountingStore:
    """get_node over a store, as it would be at tree size `size`: counts reads, refuses incomplete nodes."""

    def __init__(self, get: Callable[[int, int], bytes], size: int) -> None:
        self.get = get
        self.size = size
        self.reads: list[tuple[int, int]] = []

    def __call__(self, level: int, index: int) -> bytes:
        # The database only holds complete perfect subtrees of the tree as it is now.
        assert (index + 1) << level <= self.size, (
            f"read of node {(level, index)}, incomplete at size {self.size}"
        )
        self.reads.append((level, index))
        return self.get(level, index)


def flipped(proof: list[bytes], i: int) -> list[bytes]:
    bad = bytearray(proof[i])
    bad[i % 32] ^= 0x80
    return [*proof[:i], bytes(bad), *proof[i + 1 :]]


def test_store_holds_exactly_the_complete_perfect_subtrees() -> None:
    expected = {}
    for level in range(MAX_LEAVES.bit_length()):
        width = 1 << level
        for index in range(MAX_LEAVES // width):
            expected[level, index] = ref_mth(LEAVES[index * width : (index + 1) * width])
    assert expected == STORE


def test_root_at_every_size() -> None:
    for size in range(MAX_LEAVES + 1):
        get = CountingStore(lambda lv, ix: STORE[lv, ix], size)
        assert root_at(size, get) == ref_mth(LEAVES[:size])
        assert get.reads == nodes_needed_for_root(size)
        assert len(get.reads) == size.bit_count()


def inclusion_cases() -> Iterator[tuple[int, int]]:
    for size in range(1, MAX_LEAVES + 1):
        for index in range(size):
            yield index, size


def test_every_inclusion_proof_up_to_70_leaves() -> None:
    for index, size in inclusion_cases():
        get = CountingStore(lambda lv, ix: STORE[lv, ix], size)
        proof = inclusion_proof(index, size, get)
        assert proof == ref_path(index, LEAVES[:size]), (index, size)
        assert get.reads == nodes_needed_for_inclusion(index, size)
        r = ref_mth(LEAVES[:size])
        verify_inclusion(LEAVES[index], index, size, proof, r)

        # Every proof with one hash flipped fails.
        for i in range(len(proof)):
            with pytest.raises(ProofError):
                verify_inclusion(LEAVES[index], index, size, flipped(proof, i), r)
        # Truncated and extended proofs fail.
        if proof:
            with pytest.raises(ProofError, match="too short"):
                verify_inclusion(LEAVES[index], index, size, proof[:-1], r)
        with pytest.raises(ProofError, match="too long"):
            verify_inclusion(LEAVES[index], index, size, [*proof, r], r)
        # The proof is for this leaf at this position only.
        if size > 1:
            other = (index + 1) % size
            with pytest.raises(ProofError):
                verify_inclusion(LEAVES[other], index, size, proof, r)
            with pytest.raises(ProofError):
                verify_inclusion(LEAVES[index], other, size, proof, r)


def consistency_cases() -> Iterator[tuple[int, int]]:
    for new in range(0, MAX_LEAVES + 1):
        for old in range(0, new + 1):
            yield old, new


def test_every_consistency_proof_up_to_70_leaves() -> None:
    for old, new in consistency_cases():
        get = CountingStore(lambda lv, ix: STORE[lv, ix], new)
        proof = consistency_proof(old, new, get)
        expected = [] if old in (0, new) else ref_proof(old, LEAVES[:new])
        assert proof == expected, (old, new)
        assert get.reads == nodes_needed_for_consistency(old, new)
        r1, r2 = ref_mth(LEAVES[:old]), ref_mth(LEAVES[:new])
        verify_consistency(old, new, r1, r2, proof)

        for i in range(len(proof)):
            with pytest.raises(ProofError):
                verify_consistency(old, new, r1, r2, flipped(proof, i))
        if proof:
            with pytest.raises(ProofError, match=r"too short|must be empty"):
                verify_consistency(old, new, r1, r2, proof[:-1])
        with pytest.raises(ProofError, match=r"too long|must be empty"):
            verify_consistency(old, new, r1, r2, [*proof, r2])
        if old != new:
            # Swapped roots fail.
            with pytest.raises(ProofError):
                verify_consistency(old, new, r2, r1, proof)
        if 0 < old < new:
            # A new root one leaf short fails (from the empty tree every new root is consistent).
            with pytest.raises(ProofError):
                verify_consistency(old, new, r1, ref_mth(LEAVES[: new - 1]), proof)
            # A fork: the same old size with a different old tree.
            forked = [*LEAVES[: old - 1], leaf_hash(b"forked")]
            with pytest.raises(ProofError):
                verify_consistency(old, new, ref_mth(forked), r2, proof)


# --- the read bound, for sizes up to 2^20 ----------------------------------------------------

# A tree whose leaves are all the same hash: every perfect subtree at a level has the same
# hash, so get_node is O(1) at any size while proofs stay real proofs that verify. It is only
# for counting reads; the exhaustive tests above check which node goes where.
MAX_LEVEL = 21
SAME_LEAF = leaf_hash(b"same")
LEVEL_HASH = [SAME_LEAF]
for _ in range(MAX_LEVEL):
    LEVEL_HASH.append(node_hash(LEVEL_HASH[-1], LEVEL_HASH[-1]))


def uniform(level: int, index: int) -> bytes:
    return LEVEL_HASH[level]


def bound(size: int) -> int:
    """2 * ceil(log2(size)) - 1: the bound proved in exchange.format.merkle._consistency_plan."""
    return 2 * (size - 1).bit_length() - 1


def sizes_to_check() -> list[int]:
    rng = random.Random(6962)
    sizes = set(range(2, 1100))
    for k in range(1, 21):
        sizes.update({(1 << k) - 1, 1 << k, (1 << k) + 1})
    sizes.update(rng.randrange(2, (1 << 20) + 1) for _ in range(300))
    return sorted(s for s in sizes if 2 <= s <= 1 << 20)


def test_read_bound_for_proofs_up_to_2_to_the_20() -> None:
    rng = random.Random(9162)
    for size in sizes_to_check():
        r = root_at(size, CountingStore(uniform, size))
        indexes = {0, 1, size // 2, size - 2, size - 1, rng.randrange(size), rng.randrange(size)}
        for index in indexes:
            get = CountingStore(uniform, size)
            proof = inclusion_proof(index, size, get)
            assert len(get.reads) <= bound(size), (index, size, len(get.reads))
            verify_inclusion(SAME_LEAF, index, size, proof, r)
        olds = {1, 2, size // 2, size - 1, 1 << ((size - 1).bit_length() - 1), rng.randrange(1, size)}
        for old in olds:
            get = CountingStore(uniform, size)
            proof = consistency_proof(old, size, get)
            assert len(get.reads) <= bound(size), (old, size, len(get.reads))
            verify_consistency(old, size, root_at(old, uniform), r, proof)


def test_read_bound_is_tight() -> None:
    # Every pair up to 70 leaves is within the bound, and the bound is reached: consistency
    # proofs into trees of 2^k - 1 leaves need 2k - 1 reads (inclusion proofs at most 2k - 2
    # for k >= 2), so the stated bound is not a loose guess.
    worst_inclusion = {size: 0 for size in range(1, MAX_LEAVES + 1)}
    worst_consistency = {size: 0 for size in range(0, MAX_LEAVES + 1)}
    for index, size in inclusion_cases():
        worst_inclusion[size] = max(worst_inclusion[size], len(nodes_needed_for_inclusion(index, size)))
    for old, new in consistency_cases():
        worst_consistency[new] = max(worst_consistency[new], len(nodes_needed_for_consistency(old, new)))
    for size in range(2, MAX_LEAVES + 1):
        assert worst_inclusion[size] <= bound(size)
        assert worst_consistency[size] <= bound(size)
    for k in range(3, 7):
        assert worst_consistency[(1 << k) - 1] == bound((1 << k) - 1) == 2 * k - 1
        assert worst_inclusion[(1 << k) - 1] == 2 * k - 2


# --- optional cross-check with an independent implementation --------------------------------


def test_cross_check_with_pymerkle() -> None:
    # pymerkle (not a dependency) implements RFC 9162 hashing independently. Its inclusion
    # path is the leaf hash followed by the RFC 9162 path, and its leaf indexes are 1-based.
    pymerkle = pytest.importorskip("pymerkle")
    major = int(str(getattr(pymerkle, "__version__", "0")).split(".")[0])
    if major < 6:
        pytest.skip("pymerkle before 6.0 has another API")
    tree = pymerkle.InmemoryTree(algorithm="sha256")
    data = [b"entry %d" % i for i in range(40)]
    for entry in data:
        tree.append_entry(entry)
    hashes = [leaf_hash(x) for x in data]
    store = build_store(hashes)
    get_root = getattr(tree, "get_root", None) or tree.get_state
    for size in range(1, len(data) + 1):
        assert get_root(size) == root_at(size, lambda lv, ix: store[lv, ix])
        for index in range(size):
            theirs = list(tree.prove_inclusion(index + 1, size).path)
            assert theirs[0] == hashes[index]
            assert theirs[1:] == inclusion_proof(index, size, lambda lv, ix: store[lv, ix])
