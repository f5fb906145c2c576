"""Grants: a developer of the owning organisation gives a tester one artifact, until a time.

The developer's client unwraps the artifact's file key locally and posts an age header wrapped
for the tester's recipient; the service stores it beside the other recipients' headers and
never sees a file key. While the grant is active (not revoked, not expired) the tester may read
the artifact's metadata and its own header (see `records.has_active_grant`), and links may be
made for it. Revoking a grant removes the tester's header and revokes its links in the same
transaction, so nothing the tester held a moment ago still works.

What this module does not do: wrap keys (clients do) or decide on links (`links`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..db import Connection, Database, Row
from ..errors import Conflict, NotFound, PermissionDenied, ValidationError
from .audit import AuditLog, Context
from .principals import Principal, get_principal, require_role
from .records import Artifact, check_header, require_not_gone, visible_artifact

__all__ = ["Grant", "grant", "list_grants", "require_owner", "revoke"]


@dataclass(frozen=True)
class Grant:
    artifact_id: str
    principal_name: str
    granted_by_name: str
    created_at_ms: int
    expires_at_ms: int | None
    revoked_at_ms: int | None
    #: Downloads by id this grant gives (None: no limit), and how many it has given.
    max_downloads: int | None = None
    downloads: int = 0
    #: Active, but the grantee's header is gone (it re-enrolled with new keys): grant it again.
    needs_regrant: bool = False

    @classmethod
    def from_row(cls, row: Row) -> Grant:
        return cls(
            artifact_id=row["artifact_id"],
            principal_name=row["principal_name"],
            granted_by_name=row["granted_by_name"],
            created_at_ms=row["created_at_ms"],
            expires_at_ms=row["expires_at_ms"],
            revoked_at_ms=row["revoked_at_ms"],
            max_downloads=row["max_downloads"],
            downloads=row["downloads"],
            needs_regrant=row["revoked_at_ms"] is None and not row["has_header"],
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "artifact": self.artifact_id,
            "principal": self.principal_name,
            "granted_by": self.granted_by_name,
            "created_at_ms": self.created_at_ms,
            "expires_at_ms": self.expires_at_ms,
            "revoked_at_ms": self.revoked_at_ms,
            "max_downloads": self.max_downloads,
            "downloads": self.downloads,
            "needs_regrant": self.needs_regrant,
        }


# -- decisions ------------------------------------------------------------------------------------


def require_owner(principal: Principal, artifact: Artifact) -> None:
    """Grants and links are given by developers of the organisation that owns the artifact."""
    require_role(principal, "developer")
    if principal.org_id != artifact.org_id:
        raise PermissionDenied(
            f"only developers of {artifact.org_name} may share its artifacts", code="not-owner"
        )


def check_grantee(grantee: Principal, artifact: Artifact) -> None:
    if grantee.status != "active":
        raise Conflict(f"{grantee.name} is not an active principal", code="principal-disabled")
    if grantee.role != "tester":
        raise ValidationError(
            f"{grantee.name} is a {grantee.role}; artifacts are granted to testers", code="grantee-not-tester"
        )


# -- changes --------------------------------------------------------------------------------------

_SELECT = (
    "SELECT g.*, p.name AS principal_name, b.name AS granted_by_name,"
    " EXISTS (SELECT 1 FROM artifact_headers h WHERE h.artifact_id = g.artifact_id"
    " AND h.principal_id = g.principal_id) AS has_header FROM grants g"
    " JOIN principals p ON p.id = g.principal_id JOIN principals b ON b.id = g.granted_by"
)


async def _grant_row(conn: Connection, artifact_id: str, principal_id: str) -> Grant | None:
    row = await conn.fetchone(
        _SELECT + " WHERE g.artifact_id = $1 AND g.principal_id = $2", artifact_id, principal_id
    )
    return None if row is None else Grant.from_row(row)


async def grant(
    db: Database,
    audit: AuditLog,
    ctx: Context,
    principal: Principal,
    artifact_id: str,
    *,
    grantee_name: str,
    header: bytes,
    expires_at_ms: int | None,
    now_ms: int,
    max_downloads: int | None = None,
) -> Grant:
    """Record (or renew) a grant and the grantee's header; audited as `artifact.grant`.

    `max_downloads` bounds the downloads by id it gives (each a counted session); granting again
    is a new decision, so its count starts over."""
    grantee = await get_principal(db, grantee_name)
    check_header(header, grantee.name)
    if expires_at_ms is not None and expires_at_ms <= now_ms:
        raise ValidationError("a grant must end in the future", code="grant-until-past")
    async with db.transaction() as conn:
        artifact = await visible_artifact(conn, principal, artifact_id, now_ms)
        require_owner(principal, artifact)
        require_not_gone(artifact)
        check_grantee(grantee, artifact)
        await conn.execute(
            "INSERT INTO grants (artifact_id, principal_id, granted_by, created_at_ms, expires_at_ms,"
            " revoked_at_ms, max_downloads, downloads) VALUES ($1, $2, $3, $4, $5, NULL, $6, 0)"
            " ON CONFLICT (artifact_id, principal_id) DO UPDATE SET granted_by = excluded.granted_by,"
            " created_at_ms = excluded.created_at_ms, expires_at_ms = excluded.expires_at_ms,"
            " revoked_at_ms = NULL, max_downloads = excluded.max_downloads, downloads = 0",
            artifact_id,
            grantee.id,
            principal.id,
            now_ms,
            expires_at_ms,
            max_downloads,
        )
        await conn.execute(
            "INSERT INTO artifact_headers (artifact_id, principal_id, header, created_at_ms)"
            " VALUES ($1, $2, $3, $4) ON CONFLICT (artifact_id, principal_id)"
            " DO UPDATE SET header = excluded.header, created_at_ms = excluded.created_at_ms",
            artifact_id,
            grantee.id,
            header,
            now_ms,
        )
        await audit.append(
            conn,
            ctx,
            action="artifact.grant",
            resource={"type": "artifact", "id": artifact_id},
            details={
                "principal": grantee.name,
                "org": grantee.org_name,
                "expires_at_ms": expires_at_ms,
                "max_downloads": max_downloads,
            },
        )
        found = await _grant_row(conn, artifact_id, grantee.id)
    assert found is not None
    return found


async def revoke(
    db: Database,
    audit: AuditLog,
    ctx: Context,
    principal: Principal,
    artifact_id: str,
    *,
    grantee_name: str,
    now_ms: int,
) -> tuple[Grant, int]:
    """Revoke a grant: the header goes, every live link for the grantee dies; return (grant, links)."""
    grantee = await get_principal(db, grantee_name)
    async with db.transaction() as conn:
        artifact = await visible_artifact(conn, principal, artifact_id, now_ms)
        require_owner(principal, artifact)
        changed = await conn.execute(
            "UPDATE grants SET revoked_at_ms = $1"
            " WHERE artifact_id = $2 AND principal_id = $3 AND revoked_at_ms IS NULL",
            now_ms,
            artifact_id,
            grantee.id,
        )
        if changed != 1:
            raise NotFound(f"{grantee.name} holds no grant of {artifact_id}", code="no-grant")
        await conn.execute(
            "DELETE FROM artifact_headers WHERE artifact_id = $1 AND principal_id = $2",
            artifact_id,
            grantee.id,
        )
        links = await conn.execute(
            "UPDATE links SET revoked_at_ms = $1"
            " WHERE artifact_id = $2 AND recipient_id = $3 AND revoked_at_ms IS NULL",
            now_ms,
            artifact_id,
            grantee.id,
        )
        await audit.append(
            conn,
            ctx,
            action="artifact.revoke",
            resource={"type": "artifact", "id": artifact_id},
            details={"principal": grantee.name, "links_revoked": links},
        )
        found = await _grant_row(conn, artifact_id, grantee.id)
    assert found is not None
    return found, links


async def list_grants(db: Database, principal: Principal, artifact_id: str, *, now_ms: int) -> list[Grant]:
    """An artifact's grants, for those who may see it (a grantee sees only its own)."""
    async with db.read() as conn:
        artifact = await visible_artifact(conn, principal, artifact_id, now_ms)
        rows = await conn.fetchall(
            _SELECT + " WHERE g.artifact_id = $1 ORDER BY g.created_at_ms", artifact_id
        )
    grants = [Grant.from_row(r) for r in rows]
    if principal.org_id != artifact.org_id and principal.role not in ("admin", "auditor"):
        grants = [g for g in grants if g.principal_name == principal.name]
    return grants
