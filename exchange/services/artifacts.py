"""The artifact catalogue: finding artifacts, and reading a complete one's header and files.

What a principal may see: its organisation's artifacts (every one, for admins and auditors),
those it uploaded, and those an active grant gives it. Listing pages through them newest first;
reading an artifact's own age header, or the presigned GETs of its files, is an audited access
and only for its recipients.

What this module does not do: start, continue, complete or abort an upload (`uploads`), or hold
the records and the reads other services share (`records`). Bytes never pass through here.
"""

from __future__ import annotations

from ..db import Database
from ..errors import Conflict, PermissionDenied
from ..storage import Storage
from .audit import AuditLog, Context
from .downloads import enter_session
from .principals import Principal
from .records import (
    EFFECTIVE_STATUS,
    SELECT_ARTIFACT,
    Artifact,
    ArtifactFile,
    artifact_files,
    part_digests,
    require_not_gone,
    visible_artifact,
)

__all__ = ["download_urls", "get", "get_header", "list_artifacts"]


async def get(
    db: Database, principal: Principal, artifact_id: str, *, now_ms: int | None = None
) -> tuple[Artifact, list[ArtifactFile]]:
    """The artifact and its files, if the caller may see it (grants count when `now_ms` is known)."""
    async with db.read() as conn:
        artifact = await visible_artifact(conn, principal, artifact_id, now_ms)
        return artifact, await artifact_files(conn, artifact_id)


#: An active grant of artifact `a` to principal $8 at time $7 (no time: grants are not asked about).
_GRANTED = (
    "(CAST($7 AS BIGINT) IS NOT NULL AND EXISTS (SELECT 1 FROM grants g WHERE g.artifact_id = a.id"
    " AND g.principal_id = $8 AND g.revoked_at_ms IS NULL"
    " AND (g.expires_at_ms IS NULL OR g.expires_at_ms > $7)))"
)


async def list_artifacts(
    db: Database,
    principal: Principal,
    *,
    status: str | None,
    limit: int,
    after: tuple[int, str] | None,
    now_ms: int | None = None,
) -> list[Artifact]:
    """The caller's organisation's artifacts (every one for admins and auditors), and those an
    active grant gives the caller (when the time `now_ms` is known), newest first.

    `after` is the (created_at_ms, id) of the last artifact of the previous page.
    """
    everyone = principal.role in ("admin", "auditor")
    after_ms, after_id = after if after else (None, None)
    rows = await db.fetchall(
        SELECT_ARTIFACT + " WHERE ($1 OR a.org_id = $2 OR a.created_by = $8 OR " + _GRANTED + ")"
        " AND (CAST($3 AS TEXT) IS NULL OR " + EFFECTIVE_STATUS + " = $3)"
        " AND (CAST($4 AS BIGINT) IS NULL OR a.created_at_ms < $4 OR (a.created_at_ms = $4 AND a.id < $5))"
        " ORDER BY a.created_at_ms DESC, a.id DESC LIMIT $6",
        everyone,
        principal.org_id,
        status,
        after_ms,
        after_id,
        limit,
        now_ms,
        principal.id,
    )
    return [Artifact.from_row(r) for r in rows]


async def get_header(
    db: Database,
    audit: AuditLog,
    ctx: Context,
    principal: Principal,
    artifact_id: str,
    *,
    now_ms: int | None = None,
) -> tuple[Artifact, bytes]:
    """The caller's own age header for the artifact; reading it is an audited access."""
    async with db.transaction() as conn:
        artifact = await visible_artifact(conn, principal, artifact_id, now_ms)
        require_not_gone(artifact)
        header = await conn.fetchval(
            "SELECT header FROM artifact_headers WHERE artifact_id = $1 AND principal_id = $2",
            artifact_id,
            principal.id,
        )
        if header is None:
            raise PermissionDenied(
                f"{principal.name} is not a recipient of artifact {artifact_id}", code="not-a-recipient"
            )
        await audit.append(
            conn, ctx, action="artifact.header", resource={"type": "artifact", "id": artifact_id}
        )
    return artifact, bytes(header)


async def download_urls(
    db: Database,
    storage: Storage,
    audit: AuditLog,
    ctx: Context,
    principal: Principal,
    artifact_id: str,
    *,
    ttl_s: int,
    now_ms: int,
    session: str | None = None,
) -> tuple[Artifact, list[ArtifactFile], dict[int, dict[int, bytes]], dict[int, str], str]:
    """Presigned GETs for every file of a complete artifact, for its recipients, in a download
    session: opened (and counted against a bounding grant) without `session`, renewed with it
    (`services.downloads`); return them and the session's id."""
    async with db.transaction() as conn:
        artifact = await visible_artifact(conn, principal, artifact_id, now_ms)
        if artifact.status != "complete":
            raise Conflict(
                f"the artifact is {artifact.status}, not complete", code=f"artifact-{artifact.status}"
            )
        recipient = await conn.fetchval(
            "SELECT principal_id FROM artifact_headers WHERE artifact_id = $1 AND principal_id = $2",
            artifact_id,
            principal.id,
        )
        if recipient is None:
            raise PermissionDenied(
                f"{principal.name} is not a recipient of artifact {artifact_id}", code="not-a-recipient"
            )
        files = await artifact_files(conn, artifact_id)
        digests = await part_digests(conn, artifact_id)
        session = await enter_session(
            conn,
            audit,
            ctx,
            principal,
            artifact,
            session=session,
            now_ms=now_ms,
            details={"files": len(files), "ttl_s": ttl_s},
        )
    urls = {f.idx: storage.presign_get(f.object_key, ttl_s=ttl_s) for f in files}
    return artifact, files, digests, urls, session
