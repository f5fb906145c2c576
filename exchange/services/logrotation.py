"""Rotating the audit log's signing key: the old log's last event names the new origin and key.

A log signing key is retired on schedule or on suspicion. The tree does not restart: the log
goes on under a new origin and key, and its history is handed over inside the log itself, so an
auditor who pinned the old key can follow the change without trusting the operator's word:

1. `exchange admin log-key rotate` writes the new key (mode 0600, never over a file that
   exists) for the new origin;
2. one transaction appends `audit.log.rotated` under the old origin, with `next_origin`,
   `next_vkey` and `previous_vkey` in its details, and sets `audit_head.origin` to the new
   origin. Appends read the origin in the statement that takes their index
   (`AuditLog.append_many`), so from that commit on every replica, whichever key it runs with,
   appends under the new origin: there is no moment where an event can land under the wrong one;
3. the old key signs the checkpoint whose last leaf is the rotation event (its last word),
   cosigned by the witnesses like any checkpoint. From then on the old key signs nothing: a
   publisher whose key is not the head's origin's stops (`services.auditlog`);
4. replicas restart one at a time with `EXCHANGE_LOG_ORIGIN` and `EXCHANGE_LOG_SIGNING_KEY_FILE`
   naming the new ones; a replica started with the old origin refuses to start
   (`adopt_origin`), and so does one whose key is not the key the rotation named.

`exchange audit verify` follows a rotation when the old key's checkpoint of the rotation event
is in the bundle (`exchange.auditverify`). Steps 2 and 3 are resumable: run the command again
with the same arguments and it finishes what is missing (the checkpoint, typically, when the
witnesses were unreachable).

What this module does not do: touch key files other than creating the new one, or make old
replicas pick up the new key (they keep serving, appending under the new origin, until
restarted; link proofs made by old and new replicas differ meanwhile, since their key is
derived from the log key, so a recipient mid-download may have to fetch a new challenge).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..auditverify import ROTATION_ACTION
from ..db import Connection, Database
from ..errors import Conflict, ValidationError
from ..format.note import Signer, Verifier
from .audit import SYSTEM, AuditLog, Context

__all__ = ["ROTATION_ACTION", "Rotation", "adopt_origin", "append_rotation", "rotations", "verifier_at"]


@dataclass(frozen=True)
class Rotation:
    """One `audit.log.rotated` event, read back from its leaf."""

    idx: int
    from_origin: str
    to_origin: str
    to_vkey: str
    previous_vkey: str

    @property
    def size(self) -> int:
        """The tree size whose last leaf is the rotation: the old key's last checkpoint."""
        return self.idx + 1


async def rotations(conn: Connection) -> list[Rotation]:
    """Every rotation in the log, oldest first (the action is indexed; there are few)."""
    rows = await conn.fetchall(
        "SELECT idx, leaf FROM audit_events WHERE action = $1 ORDER BY idx", ROTATION_ACTION
    )
    found = []
    for row in rows:
        event = json.loads(bytes(row["leaf"]))
        details = event.get("details", {})
        found.append(
            Rotation(
                idx=int(row["idx"]),
                from_origin=str(event.get("origin")),
                to_origin=str(details.get("next_origin")),
                to_vkey=str(details.get("next_vkey")),
                previous_vkey=str(details.get("previous_vkey")),
            )
        )
    return found


async def verifier_at(conn: Connection, size: int, current: Verifier) -> Verifier:
    """The key that signs a checkpoint of `size`: that of the origin its last leaf carries."""
    for rotation in await rotations(conn):
        if size <= rotation.size:
            return Verifier.from_vkey(rotation.previous_vkey)
    return current


async def adopt_origin(db: Database, signer: Signer) -> None:
    """At start: the log's origin must be this replica's, and its key the one a rotation named.

    A log from before rotations existed has no origin on its head: it takes this replica's.
    Raises ValidationError (the service refuses to start) on a mismatch, saying what to set.
    """
    async with db.transaction() as conn:
        await conn.execute("UPDATE audit_head SET origin = $1 WHERE id = 1 AND origin IS NULL", signer.name)
        origin = await conn.fetchval("SELECT origin FROM audit_head WHERE id = 1")
        history = await rotations(conn)
    if origin != signer.name:
        raise ValidationError(
            f"the audit log's origin is {origin!r}, but this replica's log key is for {signer.name!r}: "
            "the log was rotated to a new key; set EXCHANGE_LOG_ORIGIN and EXCHANGE_LOG_SIGNING_KEY_FILE "
            "to the new origin and key",
            code="log-origin-mismatch",
        )
    named = [r.to_vkey for r in history if r.to_origin == origin]
    if named and named[-1] != signer.verifier_key():
        raise ValidationError(
            f"the log key file is not the key the rotation to {origin!r} named ({named[-1]})",
            code="log-origin-mismatch",
        )


async def append_rotation(db: Database, audit: AuditLog, old: Signer, new: Signer) -> Rotation:
    """Append the rotation event and move the head to `new`'s origin, in one transaction.

    Resumable: if the head already names `new`'s origin through a rotation to `new`'s key, that
    rotation is returned and nothing is written. Raises Conflict when the head's origin is
    neither `old`'s nor the finished rotation's, ValidationError when `new` is `old`'s origin.
    """
    if new.name == old.name:
        raise ValidationError("the new origin must differ from the current one", code="log-origin-unchanged")
    async with db.transaction() as conn:
        # Take the head's lock first (SQLite: the write lock; PostgreSQL: the row lock), so no
        # append or other rotation runs between the check and the event.
        origin = await conn.fetchval("UPDATE audit_head SET size = size WHERE id = 1 RETURNING origin")
        origin = origin or old.name
        if origin == new.name:
            done = [r for r in await rotations(conn) if r.to_vkey == new.verifier_key()]
            if done:
                return done[-1]
        if origin != old.name:
            raise Conflict(
                f"the log's origin is {origin!r}, not {old.name!r}: "
                "rotate with the key of the current origin",
                code="log-origin-mismatch",
            )
        idx = await audit.append(
            conn,
            Context(actor=SYSTEM),
            action=ROTATION_ACTION,
            resource={"type": "log", "id": old.name},
            details={
                "next_origin": new.name,
                "next_vkey": new.verifier_key(),
                "previous_vkey": old.verifier_key(),
            },
        )
        await conn.execute("UPDATE audit_head SET origin = $1 WHERE id = 1", new.name)
    return Rotation(idx, old.name, new.name, new.verifier_key(), old.verifier_key())
