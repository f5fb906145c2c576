"""RFC 6962 / RFC 9162 Merkle tree hashing, proofs and proof verification for the audit log.

The audit log is an append-only list of leaves (canonical JSON events). Its Merkle Tree Hash
(MTH) is the one of RFC 6962 section 2.1 (unchanged in RFC 9162 section 2.1.1), with SHA-256:

    leaf hash  = SHA-256(0x00 || leaf)
    node hash  = SHA-256(0x01 || left || right)
    empty tree = SHA-256("")

The distinct 0x00 / 0x01 prefixes are what stop a 64-byte leaf from being passed off as an
interior node (second-preimage attacks); every hash in here goes through `leaf_hash` or
`node_hash` for that reason.

Storage model. The database stores, for every *perfect* subtree that is complete, its hash
keyed by `(level, index)`: level 0 holds the leaf hashes, and the node at level L, index i
covers the leaves [i * 2^L, (i + 1) * 2^L). A node is stored once its last leaf is appended and
never changes afterwards, so the table is append-only like the log itself. Every hash the
service ever needs (roots of old tree sizes, inclusion and consistency proofs) is a fold of a
few of those nodes:

- the RFC 6962 tree of n leaves splits into the perfect subtrees given by the set bits of n,
  largest (leftmost) first, and its root is their right-to-left fold
  `node_hash(P1, node_hash(P2, ... Pk))` (`root_at`);
- a proof is a list of subtree hashes; each is either a stored perfect node or, at most once
  per proof, the hash of the right border of the tree, which is not perfect and is folded from
  its own perfect parts the same way.

Read bounds, with h = ceil(log2(n)) for a tree of n >= 2 leaves (proved in
`_consistency_plan`; `tests/format/test_merkle_exhaustive.py` checks them up to 2^20 leaves
and shows they are reached):

- `root_at(n)`:                        popcount(n) <= h + 1 reads;
- `inclusion_proof(i, n)`:             <= 2h - 1 reads;
- `consistency_proof(m, n)`:           <= 2h - 1 reads;
- `nodes_completed_by_append(n, ...)`: one read per completed parent (the left siblings only).

Each proof function has a `nodes_needed_for_*` twin that lists exactly the `(level, index)`
pairs it will read, so the database can fetch them in one query and pass a dict lookup as
`get_node` (`lambda level, index: nodes[level, index]`).

Verification (`verify_inclusion`, `verify_consistency`) follows RFC 9162 sections 2.1.3.2 and
2.1.4.2 step by step, after strict shape checks (sizes, indexes, 32-byte hashes, exact proof
length) that each fail with their own message.

What this module deliberately does not do: no I/O, no database, no clock, no caching; it does
not decide which leaves go in the log or how they are serialised; it does not check that stored
nodes are consistent with each other (a wrong node yields a proof that fails verification,
which is what verifiers are for). Sizes and indexes are plain Python ints; the checkpoint format
bounds them (see `exchange.format.checkpoint`).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Sequence

from exchange.errors import ProofError

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "GetNode",
    "NodeId",
    "consistency_proof",
    "inclusion_proof",
    "leaf_hash",
    "node_hash",
    "nodes_completed_by_append",
    "nodes_needed_for_append",
    "nodes_needed_for_consistency",
    "nodes_needed_for_inclusion",
    "nodes_needed_for_root",
    "root",
    "root_at",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32
"""Bytes in every hash of the tree (SHA-256)."""

EMPTY_ROOT = hashlib.sha256(b"").digest()
"""MTH of the empty tree (RFC 6962 section 2.1): SHA-256 of the empty string."""

_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"

NodeId = tuple[int, int]
"""`(level, index)` of a stored perfect subtree: it covers leaves [index * 2^level, (index + 1) * 2^level)."""

GetNode = Callable[[int, int], bytes]
"""Reads the stored hash of the perfect subtree at `(level, index)`."""

# A proof plan: one entry per proof element, each entry the perfect nodes (left to right) whose
# right-to-left fold is that element. Every entry has one node except, at most, the entry for the
# right border of the tree. Plans are pure functions of the sizes, so the same plan drives both
# `nodes_needed_for_*` (what to fetch) and the proof functions (what to fold).
_Plan = list[list[NodeId]]


def leaf_hash(leaf: bytes) -> bytes:
    """The RFC 6962 hash of one leaf: SHA-256(0x00 || leaf)."""
    return hashlib.sha256(_LEAF_PREFIX + leaf).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """The RFC 6962 hash of an interior node: SHA-256(0x01 || left || right).

    Both children must be 32-byte hashes; anything else is a programming error (ValueError),
    because a short or long child would make the concatenation ambiguous.
    """
    if len(left) != HASH_SIZE or len(right) != HASH_SIZE:
        raise ValueError(f"node children must be {HASH_SIZE}-byte hashes")
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


def root(leaf_hashes: Sequence[bytes]) -> bytes:
    """The Merkle Tree Hash of a list of leaf hashes, straight from the RFC 6962 definition.

    This is the reference: it reads every leaf, so it is for tests, the offline verifier and
    small trees. The service computes roots from stored nodes with `root_at`.
    """
    for h in leaf_hashes:
        if len(h) != HASH_SIZE:
            raise ValueError(f"leaf hashes must be {HASH_SIZE} bytes")
    if not leaf_hashes:
        return EMPTY_ROOT
    return _mth(leaf_hashes, 0, len(leaf_hashes))


def _mth(hashes: Sequence[bytes], lo: int, hi: int) -> bytes:
    # MTH(D[lo:hi]) with k the largest power of two smaller than the range (RFC 6962 2.1).
    # Recursion depth is log2(n); index bounds avoid copying slices.
    n = hi - lo
    if n == 1:
        return hashes[lo]
    k = _split(n)
    return node_hash(_mth(hashes, lo, lo + k), _mth(hashes, lo + k, hi))


def _split(n: int) -> int:
    """The largest power of two strictly smaller than n (n >= 2): RFC 6962's k."""
    return 1 << ((n - 1).bit_length() - 1)


def _check_count(value: int, what: str) -> None:
    # bool is an int in Python; a True tree size is a bug, not a 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProofError(f"The {what} must be an integer.")
    if value < 0:
        raise ProofError(f"The {what} must not be negative (got {value}).")


def _check_hash(value: bytes, what: str) -> None:
    if not isinstance(value, bytes) or len(value) != HASH_SIZE:
        raise ProofError(f"The {what} must be a {HASH_SIZE}-byte hash.")


def _read(get_node: GetNode, node: NodeId) -> bytes:
    value = get_node(*node)
    # A stored node of the wrong length is a corrupt database row, not a bad request: say so
    # instead of folding it into a proof that will fail somewhere far away.
    if not isinstance(value, bytes) or len(value) != HASH_SIZE:
        raise ValueError(f"stored Merkle node {node} is not a {HASH_SIZE}-byte hash")
    return value


def _fold(hashes: Sequence[bytes]) -> bytes:
    # MTH of a range from its perfect parts, largest first: node(P1, node(P2, ... Pk)).
    acc = hashes[-1]
    for h in reversed(hashes[:-1]):
        acc = node_hash(h, acc)
    return acc


def _range_nodes(start: int, end: int) -> list[NodeId]:
    """The perfect nodes, left to right, whose right-to-left fold is MTH(D[start:end]).

    Valid for the ranges this module asks about: the whole tree (start = 0) and the right
    border below a fork at level L (start a multiple of 2^(L-1), end - start <= 2^(L-1)). In
    both, start is a multiple of every power of two in end - start, so each part is an aligned,
    complete perfect subtree, and the RFC 6962 split (largest power of two first) produces
    exactly these parts.
    """
    nodes: list[NodeId] = []
    pos = start
    remaining = end - start
    for level in range(remaining.bit_length() - 1, -1, -1):
        if remaining >> level & 1:
            nodes.append((level, pos >> level))
            pos += 1 << level
    return nodes


def nodes_needed_for_root(size: int) -> list[NodeId]:
    """The stored nodes `root_at(size, ...)` reads: one per set bit of size, largest first."""
    _check_count(size, "tree size")
    return _range_nodes(0, size)


def root_at(size: int, get_node: GetNode) -> bytes:
    """The root of the tree of the first `size` leaves, from stored perfect nodes.

    Reads popcount(size) nodes (at most log2(size) + 1). The empty tree needs none.
    """
    needed = nodes_needed_for_root(size)
    if not needed:
        return EMPTY_ROOT
    return _fold([_read(get_node, node) for node in needed])


def nodes_needed_for_append(size: int) -> list[NodeId]:
    """The stored nodes `nodes_completed_by_append(size, ...)` reads, lowest level first.

    Appending leaf `size` completes the level-0 node `size` and then, for every trailing one
    bit of `size`, one more parent whose left child is already stored.
    """
    _check_count(size, "tree size")
    needed: list[NodeId] = []
    level, index = 0, size
    while index & 1:
        # The new node is a right child; its left sibling completed earlier and is stored.
        needed.append((level, index - 1))
        level, index = level + 1, index >> 1
    return needed


def nodes_completed_by_append(size: int, leaf_hash: bytes, get_node: GetNode) -> list[tuple[int, int, bytes]]:
    """Every `(level, index, hash)` to store when the leaf at index `size` is appended.

    `size` is the tree size before the append and `leaf_hash` the new leaf's hash. The leaf
    node is always returned; each further entry is a parent that the append completed. Only
    the left siblings are read (see `nodes_needed_for_append`), lowest level first.
    """
    _check_hash(leaf_hash, "leaf hash")
    completed = [(0, size, leaf_hash)]
    acc = leaf_hash
    for level, index in nodes_needed_for_append(size):
        acc = node_hash(_read(get_node, (level, index)), acc)
        completed.append((level + 1, index >> 1, acc))
    return completed


def _path_plan(level: int, index: int, size: int) -> _Plan:
    """The audit path of the complete node `(level, index)` in the tree of `size` leaves.

    This is the RFC 9162 PATH of that node, bottom-up, planned over stored nodes. Write
    a = index and b = (size - 1) >> level (the node at this level that holds the last leaf);
    their paths to the root meet at relative height f = bitlen(a ^ b):

    - below the meeting point (j < f - 1) the node's ancestors lie in the left half of the
      meeting node, which is complete, so each sibling is one stored perfect node;
    - at j = f - 1 the sibling is the right half of the meeting node, which runs to the end of
      the tree and need not be perfect: it is folded from its perfect parts (`_range_nodes`);
    - above the meeting point the ancestor is on the right border of the tree, which has a
      sibling only where the ancestor is a right child (bit j of a set), and that left sibling
      is complete; a left-child ancestor on the border was promoted by RFC 6962's split and
      contributes nothing.

    Reads: (f - 1) + popcount(leaves in the right half) + popcount(a >> f). See
    `_consistency_plan` for the bound, which covers inclusion as the case level = 0, no seed.
    """
    plan: _Plan = []
    last = (size - 1) >> level
    fork = (index ^ last).bit_length()
    for j in range(fork):
        sibling = (index >> j) ^ 1
        if j < fork - 1:
            plan.append([(level + j, sibling)])
        else:
            # The right half of the meeting node: from its first leaf to the end of the tree.
            plan.append(_range_nodes(sibling << (level + j), size))
    j = fork
    while index >> j:
        if index >> j & 1:
            plan.append([(level + j, (index >> j) - 1)])
        j += 1
    return plan


def _inclusion_plan(index: int, size: int) -> _Plan:
    _check_count(index, "leaf index")
    _check_count(size, "tree size")
    if size == 0:
        raise ProofError("There is no inclusion proof in an empty tree.")
    if index >= size:
        raise ProofError(f"Leaf index {index} is not in a tree of {size} leaves.")
    return _path_plan(0, index, size)


def _consistency_plan(old_size: int, new_size: int) -> _Plan:
    """RFC 9162 SUBPROOF(m, D[n], true), planned over stored nodes.

    The old tree's rightmost perfect subtree is the node at level s = trailing zeros of m,
    index (m - 1) >> s. The proof is that node's hash (the "seed"; omitted when m is a power of
    two, since then the seed is the old root the verifier already has) followed by its audit
    path in the new tree. The verifier rebuilds the old root from the seed and the proof
    elements to its left, and the new root from all of them.

    Read bound (inclusion is the special case s = 0 without a seed). Let h = ceil(log2(n)) =
    bitlen(n - 1), a = (m - 1) >> s, b = (n - 1) >> s and f = bitlen(a ^ b), the height above
    level s where the paths of a and b meet. Then f <= bitlen(b) <= h - s, and the reads are

        seed (0 or 1) + (f - 1) perfect siblings + r (right half) + popcount(a >> f)

    where the right half holds at most 2^(s + f - 1) leaves, so r <= max(1, s + f - 1), and
    a >> f < 2^(h - s - f), so popcount(a >> f) <= h - s - f.
    - If s + f >= 2: at most 1 + (f - 1) + (s + f - 1) + (h - s - f) = h + f - 1 <= 2h - 1.
    - If s = 0 and f = 1: at most 1 + 0 + 1 + (h - 1) = h + 1, which is <= 2h - 1 once h >= 2;
      for h = 1 (n = 2) the old size is 1, a power of two, so there is no seed and one read.
    - If f = 0 (inclusion of the last leaf): popcount(a) <= h.
    So every proof reads at most 2 * ceil(log2(n)) - 1 nodes for n >= 2 (none for n = 1).
    """
    _check_count(old_size, "old tree size")
    _check_count(new_size, "new tree size")
    if old_size > new_size:
        raise ProofError(f"The old tree size {old_size} is larger than the new tree size {new_size}.")
    if old_size == 0 or old_size == new_size:
        # RFC 9162 defines proofs for 0 < m < n only. There is nothing to prove between equal
        # trees, and every tree extends the empty one, so the proof is empty (and the
        # verifier insists on that, see verify_consistency).
        return []
    shift = (old_size & -old_size).bit_length() - 1
    seed: NodeId = (shift, (old_size - 1) >> shift)
    plan: _Plan = [] if old_size == 1 << shift else [[seed]]
    plan.extend(_path_plan(shift, seed[1], new_size))
    return plan


def _flatten(plan: _Plan) -> list[NodeId]:
    return [node for entry in plan for node in entry]


def _run(plan: _Plan, get_node: GetNode) -> list[bytes]:
    return [_fold([_read(get_node, node) for node in entry]) for entry in plan]


def nodes_needed_for_inclusion(index: int, size: int) -> list[NodeId]:
    """Exactly the stored nodes `inclusion_proof(index, size, ...)` reads, in read order."""
    return _flatten(_inclusion_plan(index, size))


def inclusion_proof(index: int, size: int, get_node: GetNode) -> list[bytes]:
    """The RFC 9162 2.1.3.1 inclusion proof (audit path) of leaf `index` in the tree of `size`.

    Bottom-up, as RFC 9162 orders it. At most 2 * ceil(log2(size)) - 1 reads.
    Raises ProofError for an empty tree or an index outside it.
    """
    return _run(_inclusion_plan(index, size), get_node)


def nodes_needed_for_consistency(old_size: int, new_size: int) -> list[NodeId]:
    """Exactly the stored nodes `consistency_proof(old_size, new_size, ...)` reads, in read order."""
    return _flatten(_consistency_plan(old_size, new_size))


def consistency_proof(old_size: int, new_size: int, get_node: GetNode) -> list[bytes]:
    """The RFC 9162 2.1.4.1 consistency proof between the trees of `old_size` and `new_size`.

    Empty when old_size is 0 or equals new_size. At most 2 * ceil(log2(new_size)) - 1 reads.
    Raises ProofError when old_size > new_size.
    """
    return _run(_consistency_plan(old_size, new_size), get_node)


def _inclusion_proof_length(index: int, size: int) -> int:
    # Inner part: levels below the meeting point of the paths of `index` and `size - 1`;
    # border part: one hash per right-child ancestor above it.
    inner = (index ^ (size - 1)).bit_length()
    return inner + (index >> inner).bit_count()


def _consistency_proof_length(old_size: int, new_size: int) -> int:
    shift = (old_size & -old_size).bit_length() - 1
    seed = 0 if old_size == 1 << shift else 1
    return seed + _inclusion_proof_length((old_size - 1) >> shift, ((new_size - 1) >> shift) + 1)


def _hashes(n: int) -> str:
    return f"{n} hash" if n == 1 else f"{n} hashes"


def _check_proof(proof: Sequence[bytes], expected: int, what: str) -> None:
    # Checked up front so that a proof of the wrong length fails with a message that says so,
    # rather than as a root mismatch; RFC 9162's own loop would also reject it.
    if len(proof) != expected:
        problem = "too long" if len(proof) > expected else "too short"
        raise ProofError(
            f"The {what} proof is {problem}: {_hashes(len(proof))} where {expected} "
            f"{'is' if expected == 1 else 'are'} expected."
        )
    for position, h in enumerate(proof):
        _check_hash(h, f"{what} proof hash at position {position}")


def verify_inclusion(leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> None:
    """Check that `leaf_hash` is leaf `index` of the tree of `size` leaves with root `root`.

    RFC 9162 2.1.3.2. Returns None on success and raises ProofError otherwise: an empty tree,
    an index outside the tree, a hash that is not 32 bytes, a proof of the wrong length, or a
    proof that does not lead to `root`.
    """
    _check_count(index, "leaf index")
    _check_count(size, "tree size")
    if size == 0:
        raise ProofError("Nothing is included in an empty tree.")
    if index >= size:
        raise ProofError(f"Leaf index {index} is not in a tree of {size} leaves.")
    _check_hash(leaf_hash, "leaf hash")
    _check_hash(root, "root hash")
    _check_proof(proof, _inclusion_proof_length(index, size), "inclusion")

    # RFC 9162 2.1.3.2, steps 2-5: fn walks the leaf's index up the tree, sn the last leaf's.
    fn, sn = index, size - 1
    r = leaf_hash
    for p in proof:
        if sn == 0:
            raise ProofError("The inclusion proof has hashes past the root.")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                # fn is a left child on the right border: its parents up to the next right
                # child are promoted nodes with no sibling, so skip those levels.
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("The inclusion proof ends below the root.")
    if not hmac.compare_digest(r, root):
        raise ProofError(
            "The inclusion proof does not lead to the expected root: the leaf is not in that tree."
        )


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """Check that the tree of `new_size` leaves with `new_root` extends the one of `old_size` with `old_root`.

    RFC 9162 2.1.4.2. Returns None on success and raises ProofError otherwise. Beyond the RFC
    algorithm: old_size > new_size fails; equal sizes need an empty proof and equal roots; an
    old tree of size 0 is consistent with every tree, but only with an empty proof, and its
    root must be the empty-tree hash (so must the new one if it is empty too).
    """
    _check_count(old_size, "old tree size")
    _check_count(new_size, "new tree size")
    if old_size > new_size:
        raise ProofError(
            f"The old tree size {old_size} is larger than the new tree size {new_size}: a log never shrinks."
        )
    _check_hash(old_root, "old root hash")
    _check_hash(new_root, "new root hash")
    for size, r, which in ((old_size, old_root, "old"), (new_size, new_root, "new")):
        if size == 0 and not hmac.compare_digest(r, EMPTY_ROOT):
            raise ProofError(f"The {which} tree is empty but its root is not the empty-tree hash.")
    if old_size == new_size:
        if proof:
            raise ProofError("The consistency proof between two trees of the same size must be empty.")
        if not hmac.compare_digest(old_root, new_root):
            raise ProofError(f"Two different roots for the same tree size {old_size}: the log forked.")
        return
    if old_size == 0:
        if proof:
            raise ProofError("The consistency proof from the empty tree must be empty.")
        return
    _check_proof(proof, _consistency_proof_length(old_size, new_size), "consistency")

    # RFC 9162 2.1.4.2. Step 2: when the old size is a power of two the old root is itself the
    # seed subtree, so it heads the path.
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    # Steps 3-4: start at the old tree's rightmost perfect subtree.
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    # Step 5: fr rebuilds the old root, sr the new one, both from the seed.
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("The consistency proof has hashes past the new root.")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            # A right sibling inside the new tree only: it is not part of the old tree.
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("The consistency proof ends below the new root.")
    # Both checked, and reported apart: a wrong old root means the proof is not for the tree
    # the verifier remembers; a wrong new root means the new tree does not extend it.
    if not hmac.compare_digest(fr, old_root):
        raise ProofError("The consistency proof does not lead to the old root.")
    if not hmac.compare_digest(sr, new_root):
        raise ProofError(
            "The consistency proof does not lead to the new root: the new tree does not extend the old one."
        )
