"""Deleting an artifact: its stored objects removed, its records and events kept, a tombstone.

The change and its event commit first (`artifact.delete`): from that moment the artifact's
status reads `deleted`, every link to it is refused (`artifact-deleted` in the log, the uniform
`link-unavailable` to the holder), downloads by id, new grants and new links are refused, and
presigned URLs handed out before stop working once the objects are gone. Storage is emptied
after the commit, and `artifact.purge` records when it was: a store that fails meanwhile leaves
a deleted artifact whose objects remain, never a live artifact without them. Those are purged
by the next `delete` of the same artifact or by the sweeper (`purge_pending`), whichever comes
first. Grants, headers, links, sessions, receipts and findings stay: custody is history.

Who may: developers of the organisation that owns the artifact, and admins. An upload still
running is aborted, not deleted (`exchange artifacts abort`).
"""

from __future__ import annotations

import logging

from ..db import Database
from ..errors import Conflict, ExchangeError, PermissionDenied
from ..storage import Storage
from .audit import SYSTEM, AuditLog, Context
from .principals import Principal
from .records import SELECT_ARTIFACT, Artifact, artifact_files, find_artifact, visible_artifact
from .uploads import remove_from_storage

__all__ = ["delete_artifact", "purge_pending", "require_deleter"]

log = logging.getLogger("exchange.artifacts")


def require_deleter(principal: Principal, artifact: Artifact) -> None:
    """Developers of the owning organisation, and admins."""
    if principal.role == "admin":
        return
    if principal.role != "developer" or principal.org_id != artifact.org_id:
        raise PermissionDenied(
            f"only developers of {artifact.org_name} (or an admin) may delete its artifacts", code="not-owner"
        )


async def delete_artifact(
    db: Database,
    storage: Storage,
    audit: AuditLog,
    ctx: Context,
    principal: Principal,
    artifact_id: str,
    *,
    reason: str | None,
    now_ms: int,
) -> Artifact:
    """Delete a complete artifact (or finish purging one already deleted); return its tombstone."""
    async with db.transaction() as conn:
        artifact = await visible_artifact(conn, principal, artifact_id, now_ms)
        require_deleter(principal, artifact)
        if artifact.status == "deleted":
            if artifact.purged_at_ms is not None:
                raise Conflict(f"{artifact_id} is already deleted", code="artifact-deleted")
        elif artifact.status != "complete":
            hint = " (abort it: `exchange artifacts abort`)" if artifact.status == "uploading" else ""
            raise Conflict(
                f"{artifact_id} is {artifact.status}; only a complete artifact is deleted{hint}",
                code=f"artifact-{artifact.status}",
            )
        else:
            changed = await conn.execute(
                "UPDATE artifacts SET deleted_at_ms = $1, deleted_by = $2, delete_reason = $3"
                " WHERE id = $4 AND deleted_at_ms IS NULL AND status = 'complete'",
                now_ms,
                principal.id,
                reason,
                artifact_id,
            )
            if changed != 1:
                raise Conflict(f"{artifact_id} changed meanwhile; try again", code="artifact-changed")
            details = {"name": artifact.name, "files": artifact.file_count, "size": artifact.plaintext_bytes}
            await audit.append(
                conn,
                ctx,
                action="artifact.delete",
                resource={"type": "artifact", "id": artifact_id},
                details=details | ({"reason": reason} if reason else {}),
            )
    await _purge(db, storage, audit, ctx, artifact_id, now_ms)
    async with db.read() as conn:
        final = await find_artifact(conn, artifact_id)
    assert final is not None
    return final


async def _purge(
    db: Database, storage: Storage, audit: AuditLog, ctx: Context, artifact_id: str, now_ms: int
) -> bool:
    """Remove a deleted artifact's objects, then record that they are gone (once); False if the
    store failed (the artifact stays deleted, its objects wait for the next try)."""
    async with db.read() as conn:
        files = await artifact_files(conn, artifact_id)
    try:
        await remove_from_storage(storage, files)
    except ExchangeError as exc:
        log.warning("artifact %s deleted, but removing its objects failed: %s", artifact_id, exc.code)
        return False
    async with db.transaction() as conn:
        done = await conn.execute(
            "UPDATE artifacts SET purged_at_ms = $1 WHERE id = $2 AND deleted_at_ms IS NOT NULL"
            " AND purged_at_ms IS NULL",
            now_ms,
            artifact_id,
        )
        if done == 1:
            await audit.append(
                conn,
                ctx,
                action="artifact.purge",
                resource={"type": "artifact", "id": artifact_id},
                details={"objects": len(files)},
            )
    return True


async def purge_pending(
    db: Database, storage: Storage, audit: AuditLog, *, now_ms: int, limit: int = 100
) -> list[str]:
    """The sweeper's part: purge deleted artifacts whose objects a failed store left behind."""
    rows = await db.fetchall(
        SELECT_ARTIFACT + " WHERE a.deleted_at_ms IS NOT NULL AND a.purged_at_ms IS NULL"
        " ORDER BY a.deleted_at_ms LIMIT $1",
        limit,
    )
    purged = []
    for row in rows:
        if await _purge(db, storage, audit, Context(actor=SYSTEM), row["id"], now_ms):
            purged.append(row["id"])
    return purged
