"""Artifact records and the reads every service shares: what an artifact is, who may see it.

Holds the `Artifact` and `ArtifactFile` records, the query that reads an artifact with its
organisation's and uploader's names (`SELECT_ARTIFACT`), and the small reads and decisions that
the catalogue (`artifacts`), the multipart lifecycle (`uploads`), grants, links, upload links
and findings all stand on: find an artifact; find it only if the caller may see it
(`visible_artifact`, where not visible and not there answer alike); its files; its recorded part
digests; whether an active grant or a stored header names a principal; whether a recipient's
age header is well formed.

What this module does not do: change anything, append audit events, or touch storage. Every
read here runs on a connection its caller opened, so that a caller's decision and its
transaction stay one.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..db import Connection, Row, placeholders
from ..errors import AgeError, Conflict, ManifestError, NotFound, ValidationError
from ..format import age
from ..format.manifest import Manifest
from .principals import Principal

__all__ = [
    "EFFECTIVE_STATUS",
    "SELECT_ARTIFACT",
    "Artifact",
    "ArtifactFile",
    "artifact_files",
    "check_header",
    "files_named",
    "find_artifact",
    "has_active_grant",
    "holds_header",
    "manifest_of",
    "may_see",
    "part_digests",
    "require_not_gone",
    "visible_artifact",
]


@dataclass(frozen=True)
class Artifact:
    """One artifact: its metadata, its status and, once complete, its signed manifest."""

    id: str
    org_id: str
    org_name: str
    name: str
    kind: str
    status: str
    created_by: str
    created_by_name: str
    created_at_ms: int
    finished_at_ms: int | None
    part_size: int
    file_count: int
    plaintext_bytes: int
    manifest: bytes | None
    manifest_signature: bytes | None
    #: The tombstone: when, by whom and why it was deleted; when storage let go of its objects.
    deleted_at_ms: int | None = None
    deleted_by_name: str | None = None
    delete_reason: str | None = None
    purged_at_ms: int | None = None

    @classmethod
    def from_row(cls, row: Row) -> Artifact:
        return cls(
            id=row["id"],
            org_id=row["org_id"],
            org_name=row["org_name"],
            name=row["name"],
            kind=row["kind"],
            status=row["effective_status"],
            created_by=row["created_by"],
            created_by_name=row["created_by_name"],
            created_at_ms=row["created_at_ms"],
            finished_at_ms=row["finished_at_ms"],
            part_size=row["part_size"],
            file_count=row["file_count"],
            plaintext_bytes=row["plaintext_bytes"],
            manifest=None if row["manifest"] is None else bytes(row["manifest"]),
            manifest_signature=None
            if row["manifest_signature"] is None
            else bytes(row["manifest_signature"]),
            deleted_at_ms=row["deleted_at_ms"],
            deleted_by_name=row["deleted_by_name"],
            delete_reason=row["delete_reason"],
            purged_at_ms=row["purged_at_ms"],
        )

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id,
            "org": self.org_name,
            "name": self.name,
            "kind": self.kind,
            "status": self.status,
            "created_by": self.created_by_name,
            "created_at_ms": self.created_at_ms,
            "finished_at_ms": self.finished_at_ms,
            "part_size": self.part_size,
            "file_count": self.file_count,
            "size": self.plaintext_bytes,
        }
        if self.deleted_at_ms is not None:
            data["deleted"] = {
                "at_ms": self.deleted_at_ms,
                "by": self.deleted_by_name,
                "reason": self.delete_reason,
                "storage_purged": self.purged_at_ms is not None,
            }
        return data


@dataclass(frozen=True)
class ArtifactFile:
    """One file of an artifact: path, sizes, payload nonce, storage object, multipart upload."""

    idx: int
    path: str
    plaintext_size: int
    ciphertext_size: int
    part_count: int
    nonce: bytes
    object_key: str
    upload_id: str | None

    @classmethod
    def from_row(cls, row: Row) -> ArtifactFile:
        return cls(
            idx=row["idx"],
            path=row["path"],
            plaintext_size=row["plaintext_size"],
            ciphertext_size=row["ciphertext_size"],
            part_count=row["part_count"],
            nonce=bytes(row["payload_nonce"]),
            object_key=row["object_key"],
            upload_id=row["upload_id"],
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.idx,
            "path": self.path,
            "size": self.plaintext_size,
            "ciphertext_size": self.ciphertext_size,
            "part_count": self.part_count,
            "nonce": base64.b64encode(self.nonce).decode("ascii"),
            "object": self.object_key,
        }


# -- decisions ------------------------------------------------------------------------------------


def require_not_gone(artifact: Artifact) -> None:
    """Refuse (409 `artifact-aborted` / `artifact-deleted`) what touches an artifact that no longer
    holds bytes: an upload given up, or one deleted (its tombstone stays)."""
    if artifact.status in ("aborted", "deleted"):
        raise Conflict(f"the artifact is {artifact.status}", code=f"artifact-{artifact.status}")


def may_see(principal: Principal, artifact: Artifact, *, granted: bool = False) -> bool:
    """Metadata: the owning organisation's principals; admins and auditors see every artifact;
    its uploader (who may be of another organisation, through an upload link); anyone else only
    while an active (unrevoked, unexpired) grant names them."""
    return (
        principal.org_id == artifact.org_id
        or principal.role in ("admin", "auditor")
        or principal.id == artifact.created_by
        or granted
    )


def check_header(raw: bytes, who: str) -> bytes:
    """One recipient's header: a canonical age header with exactly one X25519 stanza."""
    try:
        header, end = age.Header.parse(raw)
    except AgeError as exc:
        raise ValidationError(f"the header for {who} is not a valid age header: {exc.message}") from None
    if end != len(raw):
        raise ValidationError(f"the header for {who} has bytes after its MAC line")
    if len(header.stanzas) != 1 or header.stanzas[0].type != "X25519":
        raise ValidationError(f"the header for {who} must hold exactly one X25519 stanza, for {who} alone")
    return raw


def manifest_of(artifact: Artifact) -> tuple[Manifest, bytes] | None:
    """The artifact's signed manifest and its signature once complete; None before."""
    if artifact.manifest is None or artifact.manifest_signature is None:
        return None
    try:
        return Manifest.from_canonical(artifact.manifest), artifact.manifest_signature
    except ManifestError:  # pragma: no cover - stored only after it parsed
        return None


# -- reads ----------------------------------------------------------------------------------------

#: An artifact row with its organisation's and its uploader's names; add the WHERE.
#: A deleted artifact's status reads 'deleted' (migration 0012), whatever its upload's was.
EFFECTIVE_STATUS = "CASE WHEN a.deleted_at_ms IS NOT NULL THEN 'deleted' ELSE a.status END"
SELECT_ARTIFACT = (
    "SELECT a.*, "  # noqa: S608 - constants only
    + EFFECTIVE_STATUS
    + " AS effective_status, o.name AS org_name,"
    " p.name AS created_by_name, d.name AS deleted_by_name FROM artifacts a"
    " JOIN orgs o ON o.id = a.org_id JOIN principals p ON p.id = a.created_by"
    " LEFT JOIN principals d ON d.id = a.deleted_by"
)


async def find_artifact(conn: Connection, artifact_id: str) -> Artifact | None:
    """The artifact, whoever asks; None if there is none. Callers decide who may see it."""
    row = await conn.fetchone(SELECT_ARTIFACT + " WHERE a.id = $1", artifact_id)
    return None if row is None else Artifact.from_row(row)


async def has_active_grant(conn: Connection, artifact_id: str, principal_id: str, now_ms: int) -> bool:
    """Does an unrevoked grant of the artifact, unexpired at `now_ms`, name the principal?"""
    found = await conn.fetchval(
        "SELECT 1 FROM grants WHERE artifact_id = $1 AND principal_id = $2 AND revoked_at_ms IS NULL"
        " AND (expires_at_ms IS NULL OR expires_at_ms > $3)",
        artifact_id,
        principal_id,
        now_ms,
    )
    return found is not None


async def holds_header(conn: Connection, artifact_id: str, principal_id: str) -> bool:
    """Is the principal one of the artifact's recipients (is an age header stored for it)?"""
    found = await conn.fetchval(
        "SELECT 1 FROM artifact_headers WHERE artifact_id = $1 AND principal_id = $2",
        artifact_id,
        principal_id,
    )
    return found is not None


async def visible_artifact(
    conn: Connection, principal: Principal, artifact_id: str, now_ms: int | None = None
) -> Artifact:
    """The artifact if `principal` may see it. Grants count only when the time (`now_ms`) is known."""
    artifact = await find_artifact(conn, artifact_id)
    visible = artifact is not None and (
        may_see(principal, artifact)
        or (now_ms is not None and await has_active_grant(conn, artifact_id, principal.id, now_ms))
        # A finding's body or attachments, for the clearinghouse principals it was encrypted to.
        or (artifact.kind == "finding-attachment" and await holds_header(conn, artifact_id, principal.id))
    )
    # Not visible and not there answer alike: an id reveals nothing about another organisation.
    if artifact is None or not visible:
        raise NotFound(f"no artifact {artifact_id!r}")
    return artifact


async def artifact_files(conn: Connection, artifact_id: str) -> list[ArtifactFile]:
    """Every file of the artifact, in index order."""
    rows = await conn.fetchall(
        "SELECT * FROM artifact_files WHERE artifact_id = $1 ORDER BY idx", artifact_id
    )
    return [ArtifactFile.from_row(r) for r in rows]


async def part_digests(conn: Connection, artifact_id: str) -> dict[int, dict[int, bytes]]:
    """The SHA-256 recorded for each part URL issued: file index -> part number -> digest."""
    rows = await conn.fetchall(
        "SELECT file_idx, number, sha256 FROM artifact_parts WHERE artifact_id = $1", artifact_id
    )
    out: dict[int, dict[int, bytes]] = {}
    for r in rows:
        out.setdefault(r["file_idx"], {})[r["number"]] = bytes(r["sha256"])
    return out


async def files_named(conn: Connection, artifact_id: str, indices: Sequence[int]) -> dict[int, ArtifactFile]:
    """Just these files of the artifact (an artifact may have thousands), by index."""
    rows = await conn.fetchall(
        f"SELECT * FROM artifact_files WHERE artifact_id = $1 AND idx IN ({placeholders(2, len(indices))})",  # noqa: S608 - placeholders only
        artifact_id,
        *indices,
    )
    return {f.idx: f for f in map(ArtifactFile.from_row, rows)}
