"""Upload links: a bounded, expiring right to upload one artifact into an organisation.

This is how testers return files — logs, transcripts, proofs of concept, a fine-tuned checkpoint —
to a developer organisation they do not belong to. A developer makes the link for one named
uploader, one kind and a maximum size; the link's URL (`…/u/exu1_…`) is shown once and kept
only as its SHA-256, like a download link's.

Unlike a download link, an upload link is not a bearer capability on its own: every request that
uses it is signed by its bound uploader, because the artifact's manifest must be signed by a key
the service knows. A leaked upload link is useless to anyone else; asked about by anyone but its
uploader, it answers exactly as an unknown token does.

Using it is the ordinary upload (`uploads.create` with a `claim`), with three differences: the
artifact belongs to the link's organisation; its headers are for that organisation's active
developers and the uploader; and the creating transaction spends the link with a guarded UPDATE,
so of two racing uploads one wins. Revoking a link whose upload is still running aborts it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from ..db import Connection, Database, Row
from ..errors import Conflict, NotFound, ValidationError
from ..format.manifest import KINDS
from ..storage import Storage
from . import uploads
from .audit import AuditLog, Context
from .principals import Principal, get_principal, new_id, require_role
from .records import find_artifact
from .tokens import LinkRefused, hash_token, new_token, parse_token

__all__ = [
    "TOKEN_PREFIX",
    "UploadLink",
    "claim",
    "create",
    "inspect",
    "list_upload_links",
    "parse_upload_token",
    "revoke",
]

TOKEN_PREFIX = "exu1_"  # noqa: S105 - a prefix, not a secret


def parse_upload_token(text: str) -> bytes:
    """The token's SHA-256 if `text` is a canonical upload token; LinkRefused if not (pure)."""
    return parse_token(text, TOKEN_PREFIX)


@dataclass(frozen=True)
class UploadLink:
    id: str
    org_id: str
    org_name: str
    uploader_id: str
    uploader_name: str
    kind: str
    max_bytes: int
    note: str
    created_by_name: str
    created_at_ms: int
    expires_at_ms: int
    revoked_at_ms: int | None
    artifact_id: str | None
    used_at_ms: int | None

    @classmethod
    def from_row(cls, row: Row) -> UploadLink:
        return cls(
            id=row["id"],
            org_id=row["org_id"],
            org_name=row["org_name"],
            uploader_id=row["uploader_id"],
            uploader_name=row["uploader_name"],
            kind=row["kind"],
            max_bytes=row["max_bytes"],
            note=row["note"],
            created_by_name=row["created_by_name"],
            created_at_ms=row["created_at_ms"],
            expires_at_ms=row["expires_at_ms"],
            revoked_at_ms=row["revoked_at_ms"],
            artifact_id=row["artifact_id"],
            used_at_ms=row["used_at_ms"],
        )

    def state(self, now_ms: int) -> str:
        if self.revoked_at_ms is not None:
            return "revoked"
        if self.artifact_id is not None:
            return "used"
        if self.expires_at_ms <= now_ms:
            return "expired"
        return "active"

    def to_json(self, now_ms: int) -> dict[str, Any]:
        return {
            "id": self.id,
            "org": self.org_name,
            "uploader": self.uploader_name,
            "kind": self.kind,
            "max_bytes": self.max_bytes,
            "note": self.note,
            "created_by": self.created_by_name,
            "created_at_ms": self.created_at_ms,
            "expires_at_ms": self.expires_at_ms,
            "revoked_at_ms": self.revoked_at_ms,
            "artifact": self.artifact_id,
            "used_at_ms": self.used_at_ms,
            "state": self.state(now_ms),
        }


_SELECT = (
    "SELECT u.*, o.name AS org_name, p.name AS uploader_name, c.name AS created_by_name"
    " FROM upload_links u JOIN orgs o ON o.id = u.org_id JOIN principals p ON p.id = u.uploader_id"
    " JOIN principals c ON c.id = u.created_by"
)


def check_usable(link: UploadLink, principal: Principal, now_ms: int, *, resuming: bool = False) -> None:
    """May `principal` use this link now? LinkRefused (one uniform answer) with the reason if not.

    `resuming`: the caller asks about a link it already spent on an upload (to continue it)."""

    def refuse(reason: str) -> LinkRefused:
        return LinkRefused(reason, link_id=link.id)

    if link.uploader_id != principal.id:
        raise refuse("not-the-uploader")
    if link.revoked_at_ms is not None:
        raise refuse("link-revoked")
    if link.artifact_id is not None:
        if not resuming:
            raise refuse("link-used")
        return
    if link.expires_at_ms <= now_ms:
        raise refuse("link-expired")


async def _by_token(conn: Connection, token_hash: bytes) -> UploadLink:
    row = await conn.fetchone(_SELECT + " WHERE u.token_sha256 = $1", token_hash)
    if row is None:
        raise LinkRefused("link-unknown")
    return UploadLink.from_row(row)


async def _recipients(conn: Connection, org_id: str) -> dict[str, str]:
    rows = await conn.fetchall(
        "SELECT name, age_recipient FROM principals WHERE org_id = $1 AND status = 'active'"
        " AND role = 'developer' ORDER BY name",
        org_id,
    )
    return {r["name"]: r["age_recipient"] for r in rows}


# -- management (a developer of the receiving organisation) ---------------------------------------


async def create(
    db: Database,
    audit: AuditLog,
    ctx: Context,
    principal: Principal,
    *,
    uploader_name: str,
    kind: str,
    max_bytes: int,
    max_bytes_limit: int,
    note: str,
    lifetime_s: int,
    max_lifetime_s: int,
    now_ms: int,
) -> tuple[UploadLink, str]:
    """A new upload link into the caller's organisation; return it and its token (shown once)."""
    require_role(principal, "developer")
    if kind not in KINDS:
        raise ValidationError(f"kind must be one of: {', '.join(KINDS)}", field="kind")
    if not 0 < max_bytes <= max_bytes_limit:
        raise ValidationError(
            f"max_bytes must be between 1 and {max_bytes_limit} (the server's artifact limit)",
            field="max_bytes",
        )
    if not 0 < lifetime_s <= max_lifetime_s:
        raise ValidationError(
            f"a link lives between 1 second and {max_lifetime_s} seconds", code="link-lifetime"
        )
    uploader = await get_principal(db, uploader_name)
    if uploader.status != "active":
        raise Conflict(f"{uploader.name} is not an active principal", code="principal-disabled")
    if uploader.role == "auditor":
        raise Conflict(f"{uploader.name} is an auditor: auditors do not upload", code="uploader-role")
    token = new_token(TOKEN_PREFIX)
    link_id = new_id("ulk")
    expires = now_ms + lifetime_s * 1000
    async with db.transaction() as conn:
        await conn.execute(
            "INSERT INTO upload_links (id, token_sha256, org_id, uploader_id, kind, max_bytes, note,"
            " created_by, created_at_ms, expires_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            link_id,
            hash_token(token),
            principal.org_id,
            uploader.id,
            kind,
            max_bytes,
            note,
            principal.id,
            now_ms,
            expires,
        )
        await audit.append(
            conn,
            ctx,
            action="upload_link.create",
            resource={"type": "upload_link", "id": link_id},
            details={
                "uploader": uploader.name,
                "kind": kind,
                "max_bytes": max_bytes,
                "expires_at_ms": expires,
                "note": note,
            },
        )
        row = await conn.fetchone(_SELECT + " WHERE u.id = $1", link_id)
    assert row is not None
    return UploadLink.from_row(row), token


async def list_upload_links(db: Database, principal: Principal, *, limit: int) -> list[UploadLink]:
    """The organisation's upload links (every one for admins and auditors) and those bound to the
    caller, newest first."""
    everyone = principal.role in ("admin", "auditor")
    rows = await db.fetchall(
        _SELECT + " WHERE ($1 OR u.org_id = $2 OR u.uploader_id = $3)"
        " ORDER BY u.created_at_ms DESC, u.id DESC LIMIT $4",
        everyone,
        principal.org_id,
        principal.id,
        limit,
    )
    return [UploadLink.from_row(r) for r in rows]


async def revoke(
    db: Database,
    storage: Storage,
    audit: AuditLog,
    ctx: Context,
    principal: Principal,
    link_id: str,
    *,
    now_ms: int,
) -> UploadLink:
    """Revoke an upload link at once; an upload it started and that is still running is aborted."""
    async with db.transaction() as conn:
        row = await conn.fetchone(_SELECT + " WHERE u.id = $1", link_id)
        # Another organisation's link answers like no link at all.
        if row is None or row["org_id"] != principal.org_id or principal.role != "developer":
            raise NotFound(f"no upload link {link_id!r}")
        changed = await conn.execute(
            "UPDATE upload_links SET revoked_at_ms = $1 WHERE id = $2 AND revoked_at_ms IS NULL",
            now_ms,
            link_id,
        )
        if changed != 1:
            raise Conflict("the upload link was already revoked", code="link-revoked")
        await audit.append(
            conn,
            ctx,
            action="upload_link.revoke",
            resource={"type": "upload_link", "id": link_id},
            details={"uploader": row["uploader_name"], "artifact": row["artifact_id"]},
        )
    if row["artifact_id"] is not None:
        async with db.read() as conn:
            started = await find_artifact(conn, row["artifact_id"])
        if started is not None and started.status == "uploading":
            # Completed or aborted meanwhile (Conflict): nothing is left running either way.
            with contextlib.suppress(Conflict):
                await uploads.abort_artifact(
                    db, storage, audit, ctx, started, now_ms, action="artifact.abort"
                )
    async with db.read() as conn:
        final = await conn.fetchone(_SELECT + " WHERE u.id = $1", link_id)
    assert final is not None
    return UploadLink.from_row(final)


# -- use (signed by the bound uploader) -----------------------------------------------------------


async def inspect(
    db: Database, audit: AuditLog, ctx: Context, principal: Principal, token_hash: bytes, now_ms: int
) -> tuple[UploadLink, dict[str, str], str | None]:
    """What the bound uploader needs to use the link: the link, the age recipients its upload must
    be encrypted to (name -> age recipient; the uploader adds itself), and the status of the
    artifact it already started, if any (so an interrupted upload can resume). Audited."""
    async with db.transaction() as conn:
        link = await _by_token(conn, token_hash)
        check_usable(link, principal, now_ms, resuming=True)
        recipients = await _recipients(conn, link.org_id)
        status = None
        if link.artifact_id is not None:
            status = await conn.fetchval("SELECT status FROM artifacts WHERE id = $1", link.artifact_id)
        await audit.append(
            conn,
            ctx,
            action="upload_link.view",
            resource={"type": "upload_link", "id": link.id},
            details={"artifact": link.artifact_id},
        )
    return link, recipients, None if status is None else str(status)


def claim(principal: Principal, token_hash: bytes, now_ms: int) -> uploads.Claim:
    """The `claim` for `uploads.create` that spends the upload link `token_hash`."""

    async def decide(conn: Connection, artifact_id: str, kind: str, total: int) -> uploads.Target:
        link = await _by_token(conn, token_hash)
        check_usable(link, principal, now_ms)
        if kind != link.kind:
            raise ValidationError(f"this upload link is for a {link.kind}, not a {kind}", field="kind")
        if total > link.max_bytes:
            raise ValidationError(
                f"the upload is {total} bytes; this upload link allows at most {link.max_bytes}",
                code="upload-too-large",
            )

        async def spend(conn: Connection) -> None:
            won = await conn.execute(
                "UPDATE upload_links SET artifact_id = $1, used_at_ms = $2 WHERE id = $3"
                " AND artifact_id IS NULL AND revoked_at_ms IS NULL AND expires_at_ms > $2",
                artifact_id,
                now_ms,
                link.id,
            )
            if won != 1:
                raise LinkRefused("link-used", link_id=link.id)

        return uploads.Target(
            org_id=link.org_id,
            org_name=link.org_name,
            extra={},
            details={"upload_link": link.id},
            finish=spend,
        )

    return decide
