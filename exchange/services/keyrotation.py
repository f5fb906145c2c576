"""Rotating a principal's keys, its key history, and re-wrapping its own age headers.

A principal replaces its signing key and age recipient itself (`rotate`): the request is signed
by the old key (that is the authorisation) and carries the new signing key's proof
(`format.keyrotation`) that the same caller holds it. In one transaction the old key's validity
closes, the new key joins the history and becomes the principal's current key, and the event
`principal.rotate` names both. From then on only the new key authenticates (authentication
reads `principals.key_id` alone); the old one stays in `principal_keys`, so what it signed (an
artifact's manifest) still verifies, and its id can never be enrolled again.

What was granted to the old age recipient is an age header the old age identity opens. The
principal's client, which still holds that identity, lists its own headers (`own_headers`),
wraps each file key for its new recipient and stores the result over its own row (`rewrap`,
event `artifact.rewrap`). Nothing new is disclosed: the principal already had every file key.

What this module does not do: check the wrapped file key (the service never sees one, so a
principal can only break its own access by storing a bad header), re-wrap for anyone else, or
rotate keys that were lost (an admin re-enrol is another path).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..db import Database, Row
from ..errors import Conflict, NotFound, ValidationError
from ..format.keyrotation import KeyRotationError, verify_rotation
from ..identity import PublicKeys
from .audit import AuditLog, Context
from .principals import Principal, check_key_unused, swap_keys
from .records import check_header, find_artifact, require_not_gone

__all__ = ["KeyRecord", "OwnHeader", "key_history", "own_headers", "rewrap", "rotate"]


@dataclass(frozen=True)
class KeyRecord:
    """One key a principal holds or held, and when."""

    key_id: str
    signing_public_key: bytes
    age_recipient: str
    valid_from_ms: int
    valid_until_ms: int | None

    @classmethod
    def from_row(cls, row: Row) -> KeyRecord:
        return cls(
            key_id=row["key_id"],
            signing_public_key=bytes(row["signing_public_key"]),
            age_recipient=row["age_recipient"],
            valid_from_ms=row["valid_from_ms"],
            valid_until_ms=row["valid_until_ms"],
        )


@dataclass(frozen=True)
class OwnHeader:
    """One of the caller's own age headers: the artifact, the header, when it was written."""

    artifact_id: str
    header: bytes
    created_at_ms: int


async def key_history(db: Database, principal_id: str) -> list[KeyRecord]:
    """Every key the principal has held, oldest first; the current one last (valid_until None)."""
    rows = await db.fetchall(
        "SELECT key_id, signing_public_key, age_recipient, valid_from_ms, valid_until_ms"
        " FROM principal_keys WHERE principal_id = $1 ORDER BY valid_from_ms, key_id",
        principal_id,
    )
    return [KeyRecord.from_row(r) for r in rows]


async def rotate(
    db: Database,
    audit: AuditLog,
    ctx: Context,
    principal: Principal,
    keys: PublicKeys,
    proof: bytes,
    *,
    now_ms: int,
) -> Principal:
    """Replace `principal`'s keys (it signed this request with its current key) with `keys`,
    proven by `proof`; audited as `principal.rotate`."""
    if keys.key_id == principal.key_id:
        raise ValidationError("the new signing key is the current one: make new keys", code="key-unchanged")
    if keys.age_recipient == principal.age_recipient:
        raise ValidationError(
            "the new age recipient is the current one: a rotation replaces both keys",
            code="age-key-unchanged",
        )
    try:
        verify_rotation(
            keys.signing_public_key,
            proof,
            principal_id=principal.id,
            old_key_id=principal.key_id,
            new_key_id=keys.key_id,
            age_recipient=keys.age_recipient,
        )
    except KeyRotationError as exc:
        raise ValidationError(str(exc), code="rotation-proof-invalid", field="proof") from None
    async with db.transaction() as conn:
        await check_key_unused(conn, keys)  # first: a signing key used before is the plainer refusal
        held = await conn.fetchval(
            "SELECT 1 FROM principal_keys WHERE principal_id = $1 AND age_recipient = $2",
            principal.id,
            keys.age_recipient,
        )
        if held is not None:
            raise Conflict("this age recipient was one of yours before: make new keys", code="age-key-reused")
        # Guarded by the old key: of two rotations racing, one wins, the other changes nothing.
        rotated = await swap_keys(conn, principal, keys, now_ms, active_only=True)
        await audit.append(
            conn,
            ctx,
            action="principal.rotate",
            resource={"type": "principal", "id": principal.id},
            details={
                "name": principal.name,
                "old_key_id": principal.key_id,
                "new_key_id": keys.key_id,
                "age_recipient": keys.age_recipient,
            },
        )
    return rotated


async def own_headers(
    db: Database, audit: AuditLog, ctx: Context, principal: Principal, *, limit: int, after: str | None
) -> list[OwnHeader]:
    """A page of the caller's own age headers (of artifacts neither aborted nor deleted), by
    artifact id; reading them is one audited access, `principal.headers`."""
    async with db.transaction() as conn:
        rows = await conn.fetchall(
            "SELECT h.artifact_id, h.header, h.created_at_ms FROM artifact_headers h"
            " JOIN artifacts a ON a.id = h.artifact_id"
            " WHERE h.principal_id = $1 AND a.deleted_at_ms IS NULL AND a.status <> 'aborted'"
            " AND (CAST($2 AS TEXT) IS NULL OR h.artifact_id > $2) ORDER BY h.artifact_id LIMIT $3",
            principal.id,
            after,
            limit,
        )
        await audit.append(
            conn,
            ctx,
            action="principal.headers",
            resource={"type": "principal", "id": principal.id},
            details={"count": len(rows)},
        )
    return [OwnHeader(r["artifact_id"], bytes(r["header"]), r["created_at_ms"]) for r in rows]


async def rewrap(
    db: Database, audit: AuditLog, ctx: Context, principal: Principal, artifact_id: str, header: bytes
) -> None:
    """Store `header` over the caller's own header of the artifact; audited as `artifact.rewrap`.

    Only the caller's row changes, and only if it has one: a principal that holds no header of
    an artifact is answered as if there were no artifact."""
    check_header(header, principal.name)
    async with db.transaction() as conn:
        held = await conn.fetchval(
            "SELECT 1 FROM artifact_headers WHERE artifact_id = $1 AND principal_id = $2",
            artifact_id,
            principal.id,
        )
        artifact = await find_artifact(conn, artifact_id) if held is not None else None
        if artifact is None:
            raise NotFound(f"no artifact {artifact_id!r}")
        require_not_gone(artifact)
        await conn.execute(
            "UPDATE artifact_headers SET header = $1 WHERE artifact_id = $2 AND principal_id = $3",
            header,
            artifact_id,
            principal.id,
        )
        await audit.append(
            conn,
            ctx,
            action="artifact.rewrap",
            resource={"type": "artifact", "id": artifact_id},
            details={"principal": principal.name, "key_id": principal.key_id},
        )
