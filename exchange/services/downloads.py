"""Downloads by an artifact's id as sessions, as a link's are: opened once (and counted against
the grant that allows it, if it bounds its downloads), renewed without counting while a long
download needs fresh URLs, and ended by the downloader's signed receipt.

Which downloads count: one whose right to the artifact is a grant (a tester of another
organisation). The owning organisation's own principals and a finding's clearinghouse
recipients download as sessions with receipts too, but no grant is spent. The count is a guarded
UPDATE (`downloads < max_downloads`) in the session's transaction, so two replicas cannot both
spend the last one; a refused session writes nothing but its refusal event.
"""

from __future__ import annotations

from ..db import Connection, Database
from ..errors import NotFound, PermissionDenied
from . import receipts
from .audit import AuditLog, Context
from .principals import Principal, new_id
from .records import Artifact, has_active_grant, visible_artifact

__all__ = ["enter_session", "record_receipt"]


async def enter_session(
    conn: Connection,
    audit: AuditLog,
    ctx: Context,
    principal: Principal,
    artifact: Artifact,
    *,
    session: str | None,
    now_ms: int,
    details: dict[str, object],
) -> str:
    """Open a download session (None) or renew `session`; its event in the same transaction."""
    if session is not None:
        found = await conn.fetchval(
            "SELECT id FROM download_sessions WHERE id = $1 AND artifact_id = $2 AND principal_id = $3",
            session,
            artifact.id,
            principal.id,
        )
        if found is None:
            raise NotFound(
                f"no download session {session!r} of yours for {artifact.id}", code="no-such-session"
            )
        await audit.append(
            conn,
            ctx,
            action="artifact.renew",
            resource={"type": "artifact", "id": artifact.id},
            details=details | {"session": session},
        )
        return session
    counted = principal.org_id != artifact.org_id and await has_active_grant(
        conn, artifact.id, principal.id, now_ms
    )
    limit: dict[str, object] = {}
    if counted:
        spent = await conn.execute(
            "UPDATE grants SET downloads = downloads + 1 WHERE artifact_id = $1 AND principal_id = $2"
            " AND revoked_at_ms IS NULL AND (max_downloads IS NULL OR downloads < max_downloads)",
            artifact.id,
            principal.id,
        )
        row = await conn.fetchone(
            "SELECT downloads, max_downloads FROM grants WHERE artifact_id = $1 AND principal_id = $2",
            artifact.id,
            principal.id,
        )
        assert row is not None
        if spent != 1:
            raise PermissionDenied(
                f"the grant's {row['max_downloads']} download(s) are used up; ask {artifact.org_name}"
                " for a new grant",
                code="downloads-exhausted",
            )
        limit = {"downloads": row["downloads"], "max_downloads": row["max_downloads"]}
    session = new_id("ses")
    await conn.execute(
        "INSERT INTO download_sessions (id, artifact_id, principal_id, counted, opened_at_ms)"
        " VALUES ($1, $2, $3, $4, $5)",
        session,
        artifact.id,
        principal.id,
        counted,
        now_ms,
    )
    await audit.append(
        conn,
        ctx,
        action="artifact.download",
        resource={"type": "artifact", "id": artifact.id},
        details=details | {"session": session, "counted": counted} | limit,
    )
    return session


async def record_receipt(
    db: Database,
    audit: AuditLog,
    ctx: Context,
    principal: Principal,
    artifact_id: str,
    *,
    session: str,
    signature: bytes,
    now_ms: int,
) -> dict[str, object]:
    """Record the downloader's receipt of its session: its Ed25519 signature over
    `receipt_message(..., link=None)`, checked against its registered key."""
    async with db.transaction() as conn:
        artifact = await visible_artifact(conn, principal, artifact_id, now_ms)
        row = await conn.fetchone(
            "SELECT id FROM download_sessions WHERE id = $1 AND artifact_id = $2 AND principal_id = $3",
            session,
            artifact_id,
            principal.id,
        )
        if row is None:
            raise NotFound(
                f"no download session {session!r} of yours for {artifact_id}", code="no-such-session"
            )
        return await receipts.record(
            conn,
            audit,
            ctx,
            recipient=principal,
            artifact_id=artifact.id,
            link_id=None,
            session=session,
            signature=signature,
            now_ms=now_ms,
        )
