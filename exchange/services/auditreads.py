"""Auditors' reads of the log, each one decision and one audit event: filtered pages and exports.

`auditlog` reads the tree (proofs, entries, filtered rows); this module decides what an
auditor's request may read, reads it, and records the read (`audit.query`, `audit.export`), so
that the API's handlers only parse and serialise. Who may read (the auditor and admin roles) is
decided here too.

What it does not do: verify anything for the auditor (`exchange.auditverify` trusts none of
this), or fail the log closed on damage a read finds (the caller's `fail_closed` does).
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ..db import Database
from ..errors import NotFound, ValidationError
from . import auditlog
from .audit import AuditLog, Context
from .principals import Principal, require_role

__all__ = [
    "AUDITOR_ROLES",
    "Page",
    "begin_export",
    "consistency_proof",
    "export_entries",
    "inclusion_proof",
    "query_page",
]

#: Who may read the log.
AUDITOR_ROLES = ("auditor", "admin")


@dataclass(frozen=True)
class Page:
    """One page of a filtered query, pinned to a signed checkpoint."""

    size: int
    note: bytes
    rows: list[tuple[int, bytes]]
    proofs: dict[int, list[bytes]]
    next_cursor: str | None


async def _pinned(db: Database, *, size: int | None) -> tuple[int, bytes]:
    """The checkpoint a query is pinned to: at `size`, or the latest."""
    if size is None:
        latest = await auditlog.latest_checkpoint(db)
        size, note = latest if latest else (0, None)
    else:
        note = await auditlog.checkpoint_at(db, size)
    if note is None:
        raise NotFound(f"no checkpoint was published at size {size}: queries are pinned to a checkpoint")
    return size, note


async def query_page(
    db: Database,
    audit: AuditLog,
    ctx: Context,
    principal: Principal,
    where: auditlog.Filter,
    *,
    size: int | None,
    after: int,
    limit: int,
    with_proofs: bool,
) -> Page:
    """Matching events after index `after`, at most `limit`, pinned to the checkpoint at `size`
    (default: the latest); with inclusion proofs if asked. The query is an `audit.query` event,
    appended once the rows are read (a read holds no write lock while it runs)."""
    require_role(principal, *AUDITOR_ROLES)
    size, note = await _pinned(db, size=size)
    if where.actor_id:
        where = dataclasses.replace(where, actor_id=await auditlog.actor_id(db, where.actor_id))
    async with db.read() as conn:
        rows = await auditlog.query(conn, where, size=size, after=after, limit=limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        proofs = await auditlog.inclusion_proofs(conn, [i for i, _ in rows], size) if with_proofs else {}
    async with db.transaction() as conn:
        await audit.append(
            conn,
            ctx,
            action="audit.query",
            details=where.to_json() | {"size": size, "after": after, "returned": len(rows)},
        )
    return Page(size, note, rows, proofs, f"{size}.{rows[-1][0]}" if more else None)


async def begin_export(
    db: Database, audit: AuditLog, ctx: Context, principal: Principal, *, start: int, end: int, limit: int
) -> None:
    """Check and record (`audit.export`) an export of events [start, end); `export_entries` then
    streams them."""
    require_role(principal, *AUDITOR_ROLES)
    if start > end:
        raise ValidationError("start must not be after end", field="start")
    if end - start > limit:
        raise ValidationError(f"at most {limit} entries per request; page through longer ranges", field="end")
    async with db.transaction() as conn:
        size = await auditlog.tree_size(conn)
        if end > size:
            raise ValidationError(f"the log has {size} events, fewer than end {end}", field="end")
        await audit.append(conn, ctx, action="audit.export", details={"start": start, "end": end})


def export_entries(db: Database, audit: AuditLog, *, start: int, end: int) -> AsyncIterator[bytes]:
    """The exact leaves of an export `begin_export` recorded, each row checked on the way."""
    return auditlog.read_entries(db, start, end, audit=audit)


async def inclusion_proof(db: Database, principal: Principal, *, index: int, size: int) -> list[bytes]:
    """The inclusion proof of event `index` in the tree of `size` events."""
    require_role(principal, *AUDITOR_ROLES)
    async with db.read() as conn:
        return (await auditlog.inclusion_proofs(conn, [index], size))[index]


async def consistency_proof(db: Database, principal: Principal, *, old: int, new: int) -> list[bytes]:
    """The consistency proof from the tree of `old` events to the tree of `new`."""
    require_role(principal, *AUDITOR_ROLES)
    async with db.read() as conn:
        return await auditlog.consistency_proof(conn, old, new)
