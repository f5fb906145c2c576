"""The service checks its own audit log: at start, before every checkpoint, and in every row it serves.

A signed checkpoint is a promise about the stored leaves, so the process signs only a root it
has folded from leaves it re-hashed itself, never one merely read back from the stored nodes:

- `TreeCheck.start` (when the service starts): no row past the head, the latest checkpoint's
  size not past the head, then every stored event re-read in index order (`advance` from 0):
  no gap, each row's columns equal to `event_columns` of its leaf, each leaf re-hashed, every
  stored tree node equal to the node those hashes make, and the root at the checkpoint's size
  equal to the checkpoint's root.
- `TreeCheck.advance(size)` (before every checkpoint): the same for the events added since the
  last check, plus the last event checked (so a deleted or edited tail shows) and the stored
  root at the new size (so an edited frontier node shows). The right frontier of the tree (at
  most log2(n) + 1 hashes) stays in memory between checks: it was folded from leaves, not read.
- `check_row` (wherever a row is served): the row's columns against its leaf, so an edited
  column cannot misfile an event into a filtered query; an edited column that hides an event
  from a filter is found by the checks above, which read every row.

Any mismatch raises `AuditLogDamaged`, and the log (`AuditLog.fail_closed`) stops every append
and every checkpoint of this process, logging one line that names the position and the column
or node, never an event's contents.

What this module does not do: repair anything, or prove anything to an auditor (that is
`exchange.auditverify`, which trusts none of this). A leaf edited while the service runs, after
it was checked, is found at the next start, by `exchange audit query` (its proof fails) or by an
auditor's export, not at the next checkpoint: re-reading the whole log every second would cost
O(n) per checkpoint. The start check costs O(n) and blocks start-up: measured at 21 s (SQLite)
and 23 s (PostgreSQL) per million events on a shared 2-core machine.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from ..db import Connection, Database, Row
from ..errors import AuditLogDamaged, NoteError
from ..format import merkle
from ..format.checkpoint import Checkpoint
from ..format.note import Verifier, open_note
from .audit import EVENT_COLUMNS, AuditLog, event_columns, read_nodes

__all__ = ["ROW_COLUMNS", "TreeCheck", "check_row"]

#: What a checked read selects from `audit_events`.
ROW_COLUMNS = ", ".join((*EVENT_COLUMNS, "leaf"))
#: Events read per query by a check; a batch's rows and nodes are held in memory together.
_BATCH = 5000
_INT_COLUMNS = frozenset({"idx", "time_ms"})


def _same(column: str, stored: Any, derived: Any) -> bool:
    if column in _INT_COLUMNS:
        return type(derived) is int and stored == derived
    # Optional text: an empty string and NULL select alike, so they compare alike.
    if stored in (None, "") or derived in (None, ""):
        return stored in (None, "") and derived in (None, "")
    return isinstance(derived, str) and stored == derived


def check_row(row: Row) -> bytes:
    """The row's leaf, once every column copied from the leaf was found equal to it.

    Raises AuditLogDamaged naming the row's idx and the first column that differs.
    """
    idx = row["idx"]
    leaf = bytes(row["leaf"])
    try:
        event = json.loads(leaf.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError included
        raise AuditLogDamaged(f"event {idx}: the leaf is not JSON") from None
    if not isinstance(event, dict):
        raise AuditLogDamaged(f"event {idx}: the leaf is not a JSON object")
    columns = event_columns(event)
    # The usual case in one comparison (the start check runs this a million times a million
    # events); only a row that differs goes column by column, to say which.
    if (
        columns == tuple(map(row.__getitem__, EVENT_COLUMNS))
        and type(columns[0]) is int
        and type(columns[2]) is int
    ):
        return leaf
    for column, derived in zip(EVENT_COLUMNS, columns, strict=True):
        if not _same(column, row[column], derived):
            raise AuditLogDamaged(f"event {idx}: the {column} column does not match its leaf")
    return leaf


def _completed_ranges(start: int, end: int) -> list[tuple[int, int, int]]:
    """(level, first, stop) of the stored nodes the leaves [start, end) complete.

    The node (L, i) covers leaves [i * 2^L, (i + 1) * 2^L) and is completed by its last leaf,
    which lies in [start, end) exactly when start >> L <= i < end >> L.
    """
    ranges = []
    level = 0
    while end >> level > start >> level:
        ranges.append((level, start >> level, end >> level))
        level += 1
    return ranges


async def _stored_nodes(conn: Connection, start: int, end: int) -> dict[merkle.NodeId, bytes]:
    ranges = _completed_ranges(start, end)
    if not ranges:
        return {}
    args: list[int] = []
    terms = []
    for level, first, stop in ranges:
        args += [level, first, stop]
        n = len(args)
        terms.append(f"(level = ${n - 2} AND idx >= ${n - 1} AND idx < ${n})")
    rows = await conn.fetchall(
        "SELECT level, idx, hash FROM audit_tree_nodes WHERE " + " OR ".join(terms),  # noqa: S608 - placeholders only
        *args,
    )
    return {(int(r["level"]), int(r["idx"])): bytes(r["hash"]) for r in rows}


class TreeCheck:
    """What this process verified of the stored log: a size, and the tree's right frontier there.

    One per process, driven by the `Publisher` under its lock; nothing in here is shared.
    """

    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit
        self.size = 0
        # nodes_needed_for_root(size), folded from re-hashed leaves; and the last leaf's hash.
        self._frontier: dict[merkle.NodeId, bytes] = {}
        self._last_leaf = b""

    async def start(self, db: Database, latest: tuple[int, bytes] | None, verifier: Verifier) -> None:
        """Check the whole stored log against itself and against `latest`, the newest checkpoint."""
        try:
            checkpoint = _open(latest[1], verifier) if latest is not None else None
            size = await self._head(db)  # read after the checkpoint, so never smaller than it
            if checkpoint is not None and checkpoint.size > size:
                raise AuditLogDamaged(
                    f"the checkpoint of size {checkpoint.size} is larger than the log's head {size}"
                )
        except AuditLogDamaged as exc:
            self.audit.fail_closed(exc)
            raise
        self.size, self._frontier, self._last_leaf = 0, {}, b""
        await self.advance(db, size, checkpoint=checkpoint)

    async def head(self, db: Database) -> int:
        """The log's head, once no stored event was found past it."""
        try:
            return await self._head(db)
        except AuditLogDamaged as exc:
            self.audit.fail_closed(exc)
            raise

    async def _head(self, db: Database) -> int:
        # The largest idx first, then the head: the head a later read sees is never smaller than
        # what the rows an earlier read saw imply, so replicas appending meanwhile are no alarm.
        async with db.read() as conn:
            top = await conn.fetchval("SELECT MAX(idx) FROM audit_events")
            size = int(await conn.fetchval("SELECT size FROM audit_head WHERE id = 1"))
        if top is not None and int(top) >= size:
            raise AuditLogDamaged(f"event {top} is stored beyond the log's head {size}")
        return size

    async def advance(self, db: Database, size: int, *, checkpoint: Checkpoint | None = None) -> bytes:
        """Check the events up to `size` (the head, or less); return the root there, from the leaves."""
        try:
            return await self._advance(db, size, checkpoint)
        except AuditLogDamaged as exc:
            self.audit.fail_closed(exc)
            raise

    async def _advance(self, db: Database, size: int, checkpoint: Checkpoint | None) -> bytes:
        checked = self.size
        if size < checked:
            raise AuditLogDamaged(f"the log's head went back from {checked} to {size}")
        frontier, last_leaf = dict(self._frontier), self._last_leaf
        pos = checked - 1 if checked else 0  # the last event checked, read again
        while pos < size:
            end = min(size, pos + _BATCH)
            async with db.read() as conn:
                rows = await conn.fetchall(
                    f"SELECT {ROW_COLUMNS} FROM audit_events WHERE idx >= $1 AND idx < $2 ORDER BY idx",  # noqa: S608 - fixed names
                    pos,
                    end,
                )
                stored = await _stored_nodes(conn, max(pos, checked), end)
            made: set[merkle.NodeId] = set()
            expected = pos
            for row in rows:
                idx = int(row["idx"])
                if idx != expected:
                    raise AuditLogDamaged(f"event {expected} is missing (the next stored event is {idx})")
                leaf_hash = merkle.leaf_hash(check_row(row))
                if idx < checked:
                    if not hmac.compare_digest(leaf_hash, last_leaf):
                        raise AuditLogDamaged(f"event {idx} changed after it was checked")
                else:
                    for node, node_hash in _append(frontier, idx, leaf_hash):
                        if node not in stored:
                            raise AuditLogDamaged(f"tree node {node} over event {idx} is missing")
                        if not hmac.compare_digest(node_hash, stored[node]):
                            what = f"event {idx}" if node[0] == 0 else f"tree node {node}"
                            raise AuditLogDamaged(f"{what} does not match the leaves under it")
                        made.add(node)
                    if checkpoint is not None and idx + 1 == checkpoint.size:
                        _check_root(frontier, checkpoint)
                    last_leaf = leaf_hash
                expected += 1
            if expected != end:
                raise AuditLogDamaged(f"event {expected} is missing (the head is {size})")
            extra = sorted(stored.keys() - made)
            if extra:
                raise AuditLogDamaged(f"tree node {extra[0]} is stored but no leaf made it")
            pos = end
        root = merkle.root_at(size, lambda level, i: frontier[level, i])
        async with db.read() as conn:
            nodes = await read_nodes(conn, merkle.nodes_needed_for_root(size))
        if not hmac.compare_digest(merkle.root_at(size, lambda level, i: nodes[level, i]), root):
            raise AuditLogDamaged(f"the stored tree's root at size {size} does not match the leaves")
        self.size, self._frontier, self._last_leaf = size, frontier, last_leaf
        return root


def _append(
    frontier: dict[merkle.NodeId, bytes], size: int, leaf_hash: bytes
) -> list[tuple[merkle.NodeId, bytes]]:
    """Fold the leaf at `size` into the frontier; return every node it completes, leaf first.

    The append reads exactly the left siblings it merges with, which leave the frontier; the
    highest node it completes takes their place.
    """
    completed = merkle.nodes_completed_by_append(size, leaf_hash, lambda level, i: frontier[level, i])
    for level, index, _ in completed[1:]:
        del frontier[level - 1, 2 * index]  # the left child, merged into its completed parent
    level, index, node_hash = completed[-1]
    frontier[level, index] = node_hash
    return [((level, index), node_hash) for level, index, node_hash in completed]


def _check_root(frontier: dict[merkle.NodeId, bytes], checkpoint: Checkpoint) -> None:
    root = merkle.root_at(checkpoint.size, lambda level, i: frontier[level, i])
    if not hmac.compare_digest(root, checkpoint.root_hash):
        raise AuditLogDamaged(
            f"the leaves do not hash to the root of the checkpoint of size {checkpoint.size}"
        )


def _open(note: bytes, verifier: Verifier) -> Checkpoint:
    try:
        checkpoint = Checkpoint.parse(open_note(note, [verifier]).text)
    except NoteError as exc:
        raise AuditLogDamaged(f"the latest checkpoint does not verify with the log's key: {exc}") from exc
    if checkpoint.origin != verifier.name:
        raise AuditLogDamaged(f"the latest checkpoint is for another log ({checkpoint.origin!r})")
    return checkpoint
