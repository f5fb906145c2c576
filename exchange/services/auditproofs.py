"""Proofs a person can carry: one event's leaf, its inclusion proof and the checkpoint it is in.

`event_proof` serves what a c2sp.org/tlog-proof file needs for one event, named by its UUIDv7
`id` or its `idx`: the exact leaf, the RFC 6962 inclusion proof to the latest published
checkpoint's size, and that checkpoint's signed note with its witness cosignatures. The client
packs them into a `.tlog-proof` file (`exchange.format.tlogproof`) that anyone holding the
log's key checks offline. Every proof served is an audited read (`audit.prove`).

Who may prove an event (`may_prove`, a plain function of the principal and the event alone):

- the auditor and admin roles: any event;
- any principal: an event it is the actor of (`actor.id` is its id): a tester's own link
  sessions, receipts and findings, a developer's upload completions, grants and links;
- any principal: an event it is the subject of, named by the event itself: `details.principal`
  (a grant, a revocation, a finding shared with it) or `details.recipient` (a link made for it,
  its sessions, challenges and receipts) is its name (names are unique and never reused), or
  the resource is the principal itself (`resource` {type: principal, id: its id}).

Anything else is refused with the one 403 (`proof-refused`) whether or not the event exists, so
that a principal learns nothing of other people's events; the refusal is audited like every
refusal. An auditor asking for an event that does not exist gets 404.

What it does not do: verify anything (the proof's reader does, with `exchange.client.auditproof`,
against keys it pinned), sign a checkpoint on demand (an event not yet in a published checkpoint
is a 409 `not-yet-checkpointed`: ask again after the next publication), or find events through
other records (the reporter of a finding is not a subject of another principal's `finding.move`:
an auditor proves those).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..db import Database
from ..errors import Conflict, NotFound, PermissionDenied
from . import auditlog
from .audit import AuditLog, Context
from .auditcheck import ROW_COLUMNS, check_row
from .auditreads import AUDITOR_ROLES
from .principals import Principal

__all__ = ["EventProof", "event_proof", "may_prove", "parse_event_ref"]

#: An event's `id`: a UUID (version 7 when this service made it), lowercase as events write it.
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
#: Event fields that name the subject of an event by principal name.
SUBJECT_NAME_FIELDS = ("principal", "recipient")
#: Indices are BIGINT columns.
_MAX_IDX = 2**63 - 1


@dataclass(frozen=True)
class EventProof:
    """What a tlog-proof of one event holds: the leaf at `idx`, its proof to `size`, the note."""

    idx: int
    id: str
    leaf: bytes
    size: int
    note: bytes
    proof: list[bytes]


def parse_event_ref(raw: str) -> str | int | None:
    """An event reference: its id (a UUID) or its idx (a decimal); None if it is neither."""
    if _UUID.fullmatch(raw):
        return raw
    if raw.isascii() and raw.isdigit() and len(raw) <= 19 and int(raw) <= _MAX_IDX:
        return int(raw)
    return None


def _member(event: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = event.get(name)
    return value if isinstance(value, Mapping) else {}


def may_prove(principal: Principal, event: Mapping[str, Any]) -> bool:
    """Whether `principal` may have a proof of `event`: an auditor or admin, its actor, or its subject."""
    if principal.role in AUDITOR_ROLES:
        return True
    actor, details, resource = _member(event, "actor"), _member(event, "details"), _member(event, "resource")
    if actor.get("type") == "principal" and actor.get("id") == principal.id:
        return True
    if any(details.get(name) == principal.name for name in SUBJECT_NAME_FIELDS):
        return True
    return resource.get("type") == "principal" and resource.get("id") == principal.id


def _refused() -> PermissionDenied:
    # One answer for "not yours" and "no such event": the difference is not the asker's to learn.
    return PermissionDenied(
        "you may prove only events you are the actor or the subject of; an auditor can prove others",
        code="proof-refused",
    )


async def event_proof(
    db: Database, audit: AuditLog, ctx: Context, principal: Principal, ref: str | int
) -> EventProof:
    """The proof of event `ref` (id or idx) in the latest published checkpoint, once `principal`
    may have it; the read is recorded as `audit.prove`. A row that contradicts its leaf raises
    AuditLogDamaged (the caller fails the log closed)."""
    column = "id" if isinstance(ref, str) else "idx"
    latest = await auditlog.latest_checkpoint(db)
    async with db.read() as conn:
        row = await conn.fetchone(
            f"SELECT {ROW_COLUMNS} FROM audit_events WHERE {column} = $1",  # noqa: S608 - fixed names
            ref,
        )
        if row is None:
            if principal.role in AUDITOR_ROLES:
                raise NotFound(f"no event {ref} in the log")
            raise _refused()
        leaf = check_row(row)
        event = json.loads(leaf)
        if not may_prove(principal, event):
            raise _refused()
        idx = int(row["idx"])
        if latest is None or idx >= latest[0]:
            raise Conflict(
                f"event {idx} is not in a published checkpoint yet; ask again after the next one",
                code="not-yet-checkpointed",
            )
        size, note = latest
        proof = (await auditlog.inclusion_proofs(conn, [idx], size))[idx]
    async with db.transaction() as conn:
        await audit.append(
            conn,
            ctx,
            action="audit.prove",
            resource={"type": "audit_event", "id": str(row["id"])},
            details={"idx": idx, "size": size},
        )
    return EventProof(idx=idx, id=str(row["id"]), leaf=leaf, size=size, note=note, proof=proof)
