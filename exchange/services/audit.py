"""Appending audit events: one leaf per state change, refusal or audited read.

An event is written in the same transaction as the change it records (the caller passes its
`Connection`), so there is no change without its event and no event without its change. Its
bytes are the RFC 8785 (JCS) canonical JSON of the event, stored verbatim in `leaf`: a later
verifier hashes exactly those bytes and never re-serialises. `idx` is the event's position in the
log, taken from `audit_head` inside the transaction, so indices have no gaps.

The event schema (version 1):

    type      "exchange.audit.event/v1"
    origin    the log's origin name (`audit_head.origin`: it changes once per key rotation)
    idx       position in the log (0-based), equal to the leaf index in the Merkle tree
    id        UUIDv7 (RFC 9562): the time in ms, then 74 random bits; unique, and ordered in time
              so that its index grows at the end instead of at random pages
    time_ms   UTC time in milliseconds
    action    e.g. "invite.create", "principal.enroll", "request.refused"
    actor     {type: principal|anonymous|system, id?, name?, org?, role?, key_id?}
    source    {ip?, user_agent?}
    resource  {type, id?, sha256?} or absent
    request_id
    outcome   {result: allowed|denied|error, reason?}
    details   small object of strings, integers and booleans (never secrets, never floats)

Each append also writes, in the same transaction, the Merkle tree nodes it completes (the leaf
hash and every perfect subtree the new leaf closes, `exchange.format.merkle`): the stored tree
always covers exactly the committed events, whichever replica wrote them, and proofs cost
O(log n) reads. Signing checkpoints and serving proofs is `services.auditlog`.

The indexed columns (`idx`, `id`, `time_ms`, `action`, `outcome`, `actor_id`, …) are copies of
fields of the leaf, made by `event_columns` from the event itself, so that checking a row is
comparing it with `event_columns` of its leaf (`services.auditcheck`). An append refuses to run
past a gap or a row beyond the head (one key lookup), and once the process has found the log
damaged (`AuditLog.fail_closed`) it refuses every append: the caller's whole transaction fails
with `AuditLogDamaged`, so no change is made without its event.
"""

from __future__ import annotations

import functools
import json
import logging
import secrets
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import rfc8785

from ..db import Connection, Database, placeholders
from ..errors import AuditLogDamaged
from ..format import merkle

__all__ = [
    "ANONYMOUS",
    "EVENT_COLUMNS",
    "EVENT_TYPE",
    "MAX_LEAF_BYTES",
    "SYSTEM",
    "Actor",
    "AuditLog",
    "Context",
    "Entry",
    "Outcome",
    "event_columns",
    "read_nodes",
    "record_alone",
]

log = logging.getLogger("exchange.audit")

EVENT_TYPE = "exchange.audit.event/v1"
#: A leaf stays well under what a verifier must be willing to hash.
MAX_LEAF_BYTES = 64 * 1024
#: Attacker-chosen strings (user agents, claimed key ids) are cut to this many characters.
_MAX_FREE_TEXT = 512
#: The index an event holds until it takes its own (the largest a JSON number keeps exactly).
_MAX_IDX = 2**53 - 1

Outcome = Literal["allowed", "denied", "error"]


@dataclass(frozen=True)
class Actor:
    type: Literal["principal", "anonymous", "system"]
    id: str | None = None
    name: str | None = None
    org: str | None = None
    role: str | None = None
    key_id: str | None = None

    def to_json(self) -> dict[str, str]:
        data = {
            "type": self.type,
            "id": self.id,
            "name": self.name,
            "org": self.org,
            "role": self.role,
            "key_id": self.key_id,
        }
        return {k: v for k, v in data.items() if v is not None}


ANONYMOUS = Actor(type="anonymous")
SYSTEM = Actor(type="system")


@dataclass(frozen=True)
class Context:
    """Who asks, from where, under which request id: what every event records."""

    actor: Actor = ANONYMOUS
    ip: str | None = None
    user_agent: str | None = None
    request_id: str | None = None


def _clean(value: Any, path: str = "details") -> Any:
    """Refuse floats and unknown types; cut long strings. A bug here must fail loudly."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        if abs(value) > 2**53 - 1:
            raise ValueError(f"{path}: integer outside the range JSON keeps exact")
        return value
    if isinstance(value, str):
        return value[:_MAX_FREE_TEXT]
    if isinstance(value, Mapping):
        return {str(k): _clean(v, f"{path}.{k}") for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_clean(v, f"{path}[]") for v in value]
    raise TypeError(f"{path}: {type(value).__name__} is not allowed in an audit event")


@dataclass(frozen=True)
class Entry:
    """One event to append with `AuditLog.append_many`: what `append` takes as keywords."""

    action: str
    outcome: Outcome = "allowed"
    reason: str | None = None
    resource: Mapping[str, Any] | None = None
    details: Mapping[str, Any] | None = None
    actor: Actor | None = None


#: Bound parameters per INSERT statement, below both engines' limits (SQLite 32766, PostgreSQL 32767).
_MAX_PARAMS = 30_000
#: Tree nodes read per query (a page of 1,000 rows with proofs needs up to ~40,000).
_MAX_NODES_PER_QUERY = 10_000
#: The columns of `audit_events` that copy a field of the leaf, in `event_columns` order.
EVENT_COLUMNS = (
    "idx",
    "id",
    "time_ms",
    "action",
    "outcome",
    "reason",
    "actor_id",
    "actor_org",
    "resource_type",
    "resource_id",
    "request_id",
)
_INSERT_COLUMNS = ", ".join((*EVENT_COLUMNS, "leaf"))


def _member(event: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = event.get(name)
    return value if isinstance(value, Mapping) else {}


def event_columns(event: Mapping[str, Any]) -> tuple[Any, ...]:
    """The values of `EVENT_COLUMNS` for an event: what an append writes and what a check expects.

    Read from the event alone (never from the caller's arguments), so a row can be checked
    against its leaf at any time. A member that is absent, or not an object, gives NULLs.
    """
    actor, outcome, resource = _member(event, "actor"), _member(event, "outcome"), _member(event, "resource")
    return (
        event.get("idx"),
        event.get("id"),
        event.get("time_ms"),
        event.get("action"),
        outcome.get("result"),
        outcome.get("reason"),
        actor.get("id"),
        actor.get("org"),
        resource.get("type"),
        resource.get("id"),
        event.get("request_id"),
    )


def _uuid7(ms: int) -> str:
    rand = secrets.randbits(74)
    value = (ms & (2**48 - 1)) << 80 | 0x7 << 76 | (rand >> 62) << 64 | 0b10 << 62 | rand & (2**62 - 1)
    return str(uuid.UUID(int=value))


def canonical_json(event: Mapping[str, Any]) -> bytes:
    r"""The RFC 8785 bytes of an event (no floats: `_clean` refused them).

    For ASCII text without floats, RFC 8785 output is exactly compact, key-sorted `json.dumps`
    output: member names sort alike by UTF-16 code units and by code points, integers print
    alike, and the string escapes are the same (short forms for \b \t \n \f \r, lowercase
    \u00XX for other controls, nothing else). So an event that encodes to pure ASCII (nearly
    every one) takes the C encoder, ten times faster than the rfc8785 package, which handles
    the rest; tests hold the two to the same bytes.
    """
    text = json.dumps(event, ensure_ascii=False, separators=(",", ":"), sort_keys=True, allow_nan=False)
    if text.isascii():
        return text.encode("ascii")
    return bytes(rfc8785.dumps(event))


class AuditLog:
    def __init__(self, *, origin: str, clock: Callable[[], int]) -> None:
        self.origin = origin
        self._clock = clock
        #: What this process found wrong with the stored log, once it found anything; then
        #: every append is refused until the log is repaired and the process restarted.
        self.damage: str | None = None

    def fail_closed(self, exc: AuditLogDamaged) -> None:
        """Stop appending (and so every write) for the life of the process; say so once, loudly.

        The message names positions and columns, never the events' contents.
        """
        if self.damage is None:
            self.damage = exc.message
            log.error(
                "audit-log-damaged: %s; appends and checkpoints are stopped until the log is "
                "repaired and the service restarted",
                exc.message,
            )

    def _refuse_if_damaged(self) -> None:
        if self.damage is not None:
            raise AuditLogDamaged(
                "the audit log failed its integrity check, so nothing can be recorded and nothing "
                "was changed; the operator must repair the log and restart the service"
            )

    async def append(
        self,
        conn: Connection,
        ctx: Context,
        *,
        action: str,
        outcome: Outcome = "allowed",
        reason: str | None = None,
        resource: Mapping[str, Any] | None = None,
        details: Mapping[str, Any] | None = None,
        actor: Actor | None = None,
    ) -> int:
        """Append one event inside the caller's transaction; return its index."""
        entry = Entry(action, outcome, reason, resource, details, actor)
        return (await self.append_many(conn, ctx, [entry]))[0]

    def _event(self, ctx: Context, entry: Entry) -> dict[str, Any]:
        actor = entry.actor or ctx.actor
        now_ms = self._clock()
        event: dict[str, Any] = {
            "type": EVENT_TYPE,
            "origin": self.origin,
            "idx": _MAX_IDX,
            "id": _uuid7(now_ms),
            "time_ms": now_ms,
            "action": entry.action,
            "actor": actor.to_json(),
            "source": _clean({"ip": ctx.ip, "user_agent": ctx.user_agent}, "source"),
            "outcome": {"result": entry.outcome} | ({"reason": entry.reason} if entry.reason else {}),
        }
        if ctx.request_id:
            event["request_id"] = ctx.request_id
        if entry.resource:
            event["resource"] = _clean(entry.resource, "resource")
        if entry.details:
            event["details"] = _clean(entry.details)
        return event

    async def append_many(self, conn: Connection, ctx: Context, entries: Sequence[Entry]) -> list[int]:
        """Append several events inside the caller's transaction, in order; return their indices.

        One head update, one read of the tree's right frontier and a few multi-row inserts,
        however many events: this is what batch writers (and the benchmark) use.
        """
        if not entries:
            return []
        self._refuse_if_damaged()
        events = [self._event(ctx, entry) for entry in entries]  # bad values refused before the head moves
        head = await conn.fetchone(
            "UPDATE audit_head SET size = size + $1 WHERE id = 1 RETURNING size, origin", len(events)
        )
        assert head is not None, "audit_head has its one row from the first migration"
        # The head's origin, not this process's: after a key rotation every replica appends
        # under the new origin at once, whichever key it was started with (services.logrotation).
        if head["origin"]:
            for event in events:
                event["origin"] = head["origin"]
        first = int(head["size"]) - len(events)
        try:
            await _check_tail(conn, first)
        except AuditLogDamaged as exc:
            self.fail_closed(exc)
            raise
        rows: list[tuple[Any, ...]] = []
        leaf_hashes: list[bytes] = []
        for idx, (entry, event) in enumerate(zip(entries, events, strict=True), start=first):
            event["idx"] = idx
            leaf = canonical_json(event)
            if len(leaf) > MAX_LEAF_BYTES:
                # Give the indices back: a refused event takes none, even if the caller goes on.
                await conn.execute("UPDATE audit_head SET size = size - $1 WHERE id = 1", len(events))
                raise ValueError(f"audit event {entry.action} is over {MAX_LEAF_BYTES} bytes")
            leaf_hashes.append(merkle.leaf_hash(leaf))
            rows.append((*event_columns(event), leaf))
        try:
            nodes = await _tree_nodes(conn, first, leaf_hashes)
        except AuditLogDamaged as exc:
            self.fail_closed(exc)
            raise
        await _insert(conn, "audit_events", _INSERT_COLUMNS, rows)
        await _insert(conn, "audit_tree_nodes", "level, idx, hash", nodes)
        return [first + i for i in range(len(events))]


async def _check_tail(conn: Connection, first: int) -> None:
    """Refuse to append at `first` unless the stored events end exactly at `first - 1`.

    The caller holds the head (its row lock, or SQLite's write lock), so no other append can
    commit meanwhile: a missing `first - 1` is a deleted row, and any row at `first` or beyond
    was put there behind the log's back. Appending past either would bury the damage.
    """
    rows = await conn.fetchall(
        "SELECT idx FROM audit_events WHERE idx >= $1 ORDER BY idx LIMIT 2", max(first - 1, 0)
    )
    found = [int(r["idx"]) for r in rows]
    if found != ([first - 1] if first else []):
        if first and (not found or found[0] != first - 1):
            raise AuditLogDamaged(f"event {first - 1}, the last before the head {first}, is missing")
        raise AuditLogDamaged(f"event {found[-1]} is stored beyond the log's head {first}")


async def _insert(conn: Connection, table: str, columns: str, rows: Sequence[tuple[Any, ...]]) -> None:
    width = len(rows[0])
    per_statement = _MAX_PARAMS // width
    for start in range(0, len(rows), per_statement):
        chunk = rows[start : start + per_statement]
        await conn.execute(_insert_sql(table, columns, width, len(chunk)), *[v for row in chunk for v in row])


@functools.lru_cache(maxsize=256)
def _insert_sql(table: str, columns: str, width: int, count: int) -> str:
    """`INSERT … VALUES ($1, …), (…)` for `count` rows: the same few shapes on every request."""
    values = ", ".join(
        "(" + ", ".join(f"${r * width + c + 1}" for c in range(width)) + ")" for r in range(count)
    )
    return f"INSERT INTO {table} ({columns}) VALUES {values}"  # noqa: S608 - fixed names, placeholders only


async def read_nodes(conn: Connection, nodes: Sequence[merkle.NodeId]) -> dict[merkle.NodeId, bytes]:
    """The stored hashes of `nodes`, by key lookups; a missing node is a damaged tree (AuditLogDamaged)."""
    unique = list(dict.fromkeys(nodes))
    found: dict[merkle.NodeId, bytes] = {}
    for start in range(0, len(unique), _MAX_NODES_PER_QUERY):
        # One `level = ? AND idx IN (...)` term per level, ORed: both engines turn each term into
        # index lookups (a row-value IN list would be a table scan on SQLite, and a long OR chain
        # of single pairs overflows SQLite's expression depth).
        by_level: dict[int, list[int]] = {}
        for level, index in unique[start : start + _MAX_NODES_PER_QUERY]:
            by_level.setdefault(level, []).append(index)
        args: list[int] = []
        terms = []
        for level, indices in by_level.items():
            args.append(level)
            first = len(args) + 1
            args.extend(indices)
            in_list = placeholders(first, len(indices))
            terms.append(f"(level = ${first - 1} AND idx IN ({in_list}))")
        rows = await conn.fetchall(
            "SELECT level, idx, hash FROM audit_tree_nodes WHERE " + " OR ".join(terms),  # noqa: S608 - placeholders only
            *args,
        )
        found.update({(int(r["level"]), int(r["idx"])): bytes(r["hash"]) for r in rows})
    missing = [n for n in unique if n not in found]
    if missing:
        raise AuditLogDamaged(f"audit tree nodes {missing[:3]} are missing: the stored tree is damaged")
    return found


async def _tree_nodes(
    conn: Connection, size: int, leaf_hashes: Sequence[bytes]
) -> list[tuple[int, int, bytes]]:
    """Every node the leaves appended at `size`, `size + 1`, ... complete.

    An append reads only left siblings, and each is a perfect subtree of the tree as it stands:
    one of the old tree's frontier nodes (read once, here) or a node this batch completed.
    """
    known = await read_nodes(conn, merkle.nodes_needed_for_root(size))
    completed: list[tuple[int, int, bytes]] = []
    for offset, leaf_hash in enumerate(leaf_hashes):
        for level, index, node in merkle.nodes_completed_by_append(
            size + offset, leaf_hash, lambda level, i: known[level, i]
        ):
            known[level, index] = node
            completed.append((level, index, node))
    return completed


async def record_alone(db: Database, audit: AuditLog, ctx: Context, entries: Sequence[Entry]) -> None:
    """Append `entries` in a transaction of their own: refusals and their summaries, whose change
    never happened (so there is nothing else to commit with them)."""
    async with db.transaction() as conn:
        await audit.append_many(conn, ctx, entries)
