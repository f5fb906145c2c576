"""Findings: what testers report back about an artifact, and the lifecycle both sides can prove.

A finding is metadata in the clear — artifact, title, severity, category, status, reporter,
times — and two encrypted artifacts the reporter uploads first: the **body** (one file,
`body.md`) and, optionally, the **attachments** (any number of files of any size). Both are
ordinary artifacts of kind `finding-attachment`, created with a `claim` (see `claim`) that puts
them in the reported artifact's organisation and requires headers for that organisation's
active developers, the reporter and the clearinghouse principals the server names. So the
service never reads a finding, and storage holds ciphertext only.

    upload body (and attachments)   POST /v1/artifacts {"finding": {"on": ART, "part": "body"}}
    submit                          POST /v1/findings {artifact, body, attachments, title, …}
    move                            POST /v1/findings/ID/moves {"to": STATUS, "note": …}

Lifecycle (`MOVES`): submitted -> acknowledged -> validated -> remediated | wont-fix -> closed,
and closed -> submitted (reopen). Developers of the owning organisation make the first four
kinds of move; the reporter closes and reopens. A move is a guarded UPDATE on the status it
starts from, so two racing moves cannot both apply. A note on a move is encrypted by the client
under the body's file key (an age payload with a fresh nonce) and stored as given.

Who sees what: the owning organisation, the reporter's organisation, admins, auditors and the
principals it is encrypted to (the clearinghouse) see metadata and moves; decrypting needs a
header, which only the recipients hold. A developer who joins later is given one by any
developer who already has it (`share`), as grants do.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..db import Connection, Database, Row
from ..errors import Conflict, NotFound, PayloadTooLarge, PermissionDenied, ValidationError
from ..format.finding import BODY_NAME, CATEGORIES, MOVES, SEVERITIES, STATUSES
from . import uploads
from .audit import AuditLog, Context
from .principals import Principal, get_principal, new_id
from .records import Artifact, artifact_files, check_header, find_artifact, has_active_grant, holds_header

__all__ = [
    "CATEGORIES",
    "MOVES",
    "SEVERITIES",
    "STATUSES",
    "Finding",
    "Move",
    "check_move",
    "claim",
    "get",
    "list_findings",
    "move",
    "recipients",
    "share",
    "submit",
]

PARTS = ("body", "attachments")


@dataclass(frozen=True)
class Move:
    seq: int
    from_status: str | None
    to_status: str
    actor_name: str
    at_ms: int
    note: bytes | None

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "from": self.from_status,
            "to": self.to_status,
            "by": self.actor_name,
            "at_ms": self.at_ms,
            "note": None if self.note is None else base64.b64encode(self.note).decode("ascii"),
        }


@dataclass(frozen=True)
class Finding:
    id: str
    artifact_id: str
    artifact_name: str
    org_id: str
    org_name: str
    reporter_id: str
    reporter_name: str
    reporter_org_id: str
    reporter_org_name: str
    body_id: str
    attachments_id: str | None
    title: str
    severity: str
    category: str
    status: str
    created_at_ms: int
    updated_at_ms: int

    @classmethod
    def from_row(cls, row: Row) -> Finding:
        return cls(**{name: row[name] for name in cls.__dataclass_fields__})

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "artifact": self.artifact_id,
            "artifact_name": self.artifact_name,
            "org": self.org_name,
            "reporter": self.reporter_name,
            "reporter_org": self.reporter_org_name,
            "body": self.body_id,
            "attachments": self.attachments_id,
            "title": self.title,
            "severity": self.severity,
            "category": self.category,
            "status": self.status,
            "created_at_ms": self.created_at_ms,
            "updated_at_ms": self.updated_at_ms,
        }


# -- decisions ------------------------------------------------------------------------------------


def check_move(finding: Finding, principal: Principal, to: str) -> None:
    """May `principal` move `finding` to `to` now? Conflict (409) naming why if not."""
    if to not in STATUSES:
        raise ValidationError(f"status must be one of: {', '.join(STATUSES)}", field="to")
    who = MOVES.get((finding.status, to))
    if who is None:
        allowed = sorted(t for (f, t) in MOVES if f == finding.status)
        raise Conflict(
            f"a {finding.status} finding cannot become {to}; it can become: {', '.join(allowed)}",
            code="move-skips-lifecycle",
        )
    if who == "owner" and not (principal.org_id == finding.org_id and principal.role == "developer"):
        raise Conflict(
            f"only developers of {finding.org_name} may move a finding to {to}", code="move-not-permitted"
        )
    if who == "reporter" and principal.id != finding.reporter_id:
        raise Conflict(
            f"only the reporter ({finding.reporter_name}) may move a finding to {to}",
            code="move-not-permitted",
        )


def may_see(principal: Principal, finding: Finding) -> bool:
    return principal.org_id in (finding.org_id, finding.reporter_org_id) or principal.role in (
        "admin",
        "auditor",
    )


async def _may_report(conn: Connection, principal: Principal, artifact_id: str, now_ms: int) -> Artifact:
    """The artifact if `principal` may report on it: a tester it is granted to (actively), or a
    developer of its organisation. One 403 for every other case, existing or not."""
    artifact = await find_artifact(conn, artifact_id)

    def denied() -> PermissionDenied:
        return PermissionDenied(
            f"{principal.name} may not report on {artifact_id}: findings are for artifacts granted to you",
            code="not-granted",
        )

    if (
        artifact is None
        or artifact.kind == "finding-attachment"
        or principal.role not in ("tester", "developer")
    ):
        raise denied()
    if principal.org_id == artifact.org_id:
        if principal.role != "developer":
            raise denied()
    elif not await has_active_grant(conn, artifact_id, principal.id, now_ms):
        raise denied()
    # A deleted artifact's findings still come: its testers hold the bytes they downloaded.
    if artifact.status not in ("complete", "deleted"):
        raise Conflict(
            f"{artifact_id} is {artifact.status}, not complete", code=f"artifact-{artifact.status}"
        )
    return artifact


async def _clearinghouse(conn: Connection, names: Sequence[str]) -> dict[str, Principal]:
    out = {}
    for name in names:
        row = await conn.fetchone(
            "SELECT p.*, o.name AS org_name FROM principals p JOIN orgs o ON o.id = p.org_id"
            " WHERE p.name = $1",
            name,
        )
        if row is not None and row["status"] == "active":
            out[name] = Principal.from_row(row)
    return out


# -- recipients and the upload claim --------------------------------------------------------------


async def recipients(
    db: Database, principal: Principal, artifact_id: str, *, clearinghouse: Sequence[str], now_ms: int
) -> dict[str, tuple[str, str]]:
    """Whom a finding on `artifact_id` must be encrypted to, besides the reporter: name ->
    (age recipient, why: "developer" or "clearinghouse")."""
    async with db.read() as conn:
        artifact = await _may_report(conn, principal, artifact_id, now_ms)
        rows = await conn.fetchall(
            "SELECT name, age_recipient FROM principals WHERE org_id = $1 AND status = 'active'"
            " AND role = 'developer' ORDER BY name",
            artifact.org_id,
        )
        out = {r["name"]: (r["age_recipient"], "developer") for r in rows}
        for name, p in (await _clearinghouse(conn, clearinghouse)).items():
            out.setdefault(name, (p.age_recipient, "clearinghouse"))
    out.pop(principal.name, None)
    return out


def claim(
    principal: Principal,
    subject_id: str,
    part: str,
    *,
    clearinghouse: Sequence[str],
    body_max_bytes: int,
    now_ms: int,
) -> uploads.Claim:
    """The `claim` for `uploads.create` of a finding's body or attachments on `subject_id`."""
    if part not in PARTS:
        raise ValidationError(f"part must be one of: {', '.join(PARTS)}", field="finding.part")

    async def decide(conn: Connection, artifact_id: str, kind: str, total: int) -> uploads.Target:
        subject = await _may_report(conn, principal, subject_id, now_ms)
        if kind != "finding-attachment":
            raise ValidationError(
                "a finding's body and attachments are of kind finding-attachment", field="kind"
            )
        if part == "body" and total > body_max_bytes:
            raise PayloadTooLarge(
                f"the body is {total} bytes; a finding's body may be at most {body_max_bytes}"
                " (put logs and transcripts in attachments)",
                code="body-too-large",
            )
        extra = {name: p.id for name, p in (await _clearinghouse(conn, clearinghouse)).items()}

        async def finish(conn: Connection) -> None:
            await conn.execute("UPDATE artifacts SET subject_id = $1 WHERE id = $2", subject_id, artifact_id)

        return uploads.Target(
            org_id=subject.org_id,
            org_name=subject.org_name,
            extra=extra,
            details={"finding_on": subject_id, "finding_part": part},
            finish=finish,
        )

    return decide


# -- reads ----------------------------------------------------------------------------------------

_SELECT = (
    "SELECT f.*, a.name AS artifact_name, o.name AS org_name, r.name AS reporter_name,"
    " ro.name AS reporter_org_name FROM findings f JOIN artifacts a ON a.id = f.artifact_id"
    " JOIN orgs o ON o.id = f.org_id JOIN principals r ON r.id = f.reporter_id"
    " JOIN orgs ro ON ro.id = f.reporter_org_id"
)


async def _finding(conn: Connection, principal: Principal, finding_id: str) -> Finding:
    row = await conn.fetchone(_SELECT + " WHERE f.id = $1", finding_id)
    finding = None if row is None else Finding.from_row(row)
    # Beyond the two organisations, admins and auditors: whoever it is encrypted to (the
    # clearinghouse) sees it too.
    if finding is None or not (
        may_see(principal, finding) or await holds_header(conn, finding.body_id, principal.id)
    ):
        raise NotFound(f"no finding {finding_id!r}")
    return finding


async def _moves(conn: Connection, finding_id: str) -> list[Move]:
    rows = await conn.fetchall(
        "SELECT m.*, p.name AS actor_name FROM finding_moves m JOIN principals p ON p.id = m.actor_id"
        " WHERE m.finding_id = $1 ORDER BY m.seq",
        finding_id,
    )
    return [
        Move(
            seq=r["seq"],
            from_status=r["from_status"],
            to_status=r["to_status"],
            actor_name=r["actor_name"],
            at_ms=r["at_ms"],
            note=None if r["note"] is None else bytes(r["note"]),
        )
        for r in rows
    ]


async def get(db: Database, principal: Principal, finding_id: str) -> tuple[Finding, list[Move]]:
    async with db.read() as conn:
        finding = await _finding(conn, principal, finding_id)
        return finding, await _moves(conn, finding_id)


async def list_findings(
    db: Database,
    principal: Principal,
    *,
    artifact_id: str | None,
    status: str | None,
    severity: str | None,
    limit: int,
    after: tuple[int, str] | None,
) -> list[Finding]:
    """Findings the caller may see, newest first; `after` is the last one's (created_at_ms, id)."""
    everyone = principal.role in ("admin", "auditor")
    after_ms, after_id = after if after else (None, None)
    rows = await db.fetchall(
        _SELECT + " WHERE ($1 OR f.org_id = $2 OR f.reporter_org_id = $2 OR EXISTS (SELECT 1 FROM"
        " artifact_headers h WHERE h.artifact_id = f.body_id AND h.principal_id = $9))"
        " AND (CAST($3 AS TEXT) IS NULL OR f.artifact_id = $3)"
        " AND (CAST($4 AS TEXT) IS NULL OR f.status = $4)"
        " AND (CAST($5 AS TEXT) IS NULL OR f.severity = $5)"
        " AND (CAST($6 AS BIGINT) IS NULL OR f.created_at_ms < $6 OR (f.created_at_ms = $6 AND f.id < $7))"
        " ORDER BY f.created_at_ms DESC, f.id DESC LIMIT $8",
        everyone,
        principal.org_id,
        artifact_id,
        status,
        severity,
        after_ms,
        after_id,
        limit,
        principal.id,
    )
    return [Finding.from_row(r) for r in rows]


# -- changes --------------------------------------------------------------------------------------


async def _content(
    conn: Connection, principal: Principal, content_id: str, subject_id: str, part: str
) -> Artifact:
    """A finding's uploaded body or attachments: the reporter's, complete, about the subject."""
    content = await find_artifact(conn, content_id)
    subject = await conn.fetchval("SELECT subject_id FROM artifacts WHERE id = $1", content_id)
    if content is None or content.created_by != principal.id or subject != subject_id:
        raise ValidationError(
            f"{content_id} is not a {part} you uploaded for a finding on {subject_id}", field=part
        )
    if content.status != "complete":
        raise Conflict(
            f"the {part} upload {content_id} is {content.status}: finish it first (run the command again)",
            code=f"artifact-{content.status}",
        )
    return content


async def _manifest_digest(conn: Connection, artifact_id: str) -> str:
    digest = await conn.fetchval("SELECT manifest_sha256 FROM artifacts WHERE id = $1", artifact_id)
    return bytes(digest).hex()


async def submit(
    db: Database,
    audit: AuditLog,
    ctx: Context,
    principal: Principal,
    *,
    artifact_id: str,
    body_id: str,
    attachments_id: str | None,
    title: str,
    severity: str,
    category: str,
    now_ms: int,
) -> Finding:
    """Record a finding whose body (and attachments) the reporter has uploaded."""
    if severity not in SEVERITIES:
        raise ValidationError(f"severity must be one of: {', '.join(SEVERITIES)}", field="severity")
    finding_id = new_id("fnd")
    async with db.transaction() as conn:
        subject = await _may_report(conn, principal, artifact_id, now_ms)
        await _content(conn, principal, body_id, artifact_id, "body")
        files = await artifact_files(conn, body_id)
        if [f.path for f in files] != [BODY_NAME]:
            raise ValidationError(
                f"a finding's body upload holds exactly one file, {BODY_NAME}", field="body"
            )
        if attachments_id is not None:
            await _content(conn, principal, attachments_id, artifact_id, "attachments")
        taken = await conn.fetchval(
            "SELECT id FROM findings WHERE body_id IN ($1, $2) OR attachments_id IN ($1, $2)",
            body_id,
            attachments_id or body_id,
        )
        if taken is not None:
            raise Conflict(f"these uploads already belong to finding {taken}", code="finding-exists")
        await conn.execute(
            "INSERT INTO findings (id, artifact_id, org_id, reporter_id, reporter_org_id, body_id,"
            " attachments_id, title, severity, category, status, created_at_ms, updated_at_ms)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'submitted', $11, $11)",
            finding_id,
            artifact_id,
            subject.org_id,
            principal.id,
            principal.org_id,
            body_id,
            attachments_id,
            title,
            severity,
            category,
            now_ms,
        )
        await conn.execute(
            "INSERT INTO finding_moves (finding_id, seq, from_status, to_status, actor_id, at_ms)"
            " VALUES ($1, 1, NULL, 'submitted', $2, $3)",
            finding_id,
            principal.id,
            now_ms,
        )
        await audit.append(
            conn,
            ctx,
            action="finding.submit",
            resource={"type": "finding", "id": finding_id},
            details={
                "artifact": artifact_id,
                "org": subject.org_name,
                "title": title,
                "severity": severity,
                "category": category,
                "body": body_id,
                "attachments": attachments_id,
                # The reporter's signed manifests: what was reported, provably, without the text.
                "body_manifest_sha256": await _manifest_digest(conn, body_id),
                "attachments_manifest_sha256": None
                if attachments_id is None
                else await _manifest_digest(conn, attachments_id),
            },
        )
        return await _finding(conn, principal, finding_id)


async def move(
    db: Database,
    audit: AuditLog,
    ctx: Context,
    principal: Principal,
    finding_id: str,
    *,
    to: str,
    note: bytes | None,
    note_max_bytes: int,
    now_ms: int,
) -> tuple[Finding, list[Move]]:
    """Move a finding along its lifecycle, with an optional encrypted note; audited."""
    if note is not None and len(note) > note_max_bytes:
        raise PayloadTooLarge(
            f"the note is {len(note)} bytes; at most {note_max_bytes}", code="note-too-large"
        )
    if note is not None and len(note) < 16 + 16:
        raise ValidationError("the note is not an age payload (nonce, then at least one chunk)", field="note")
    async with db.transaction() as conn:
        finding = await _finding(conn, principal, finding_id)
        check_move(finding, principal, to)
        changed = await conn.execute(
            "UPDATE findings SET status = $1, updated_at_ms = $2 WHERE id = $3 AND status = $4",
            to,
            now_ms,
            finding_id,
            finding.status,
        )
        if changed != 1:
            raise Conflict("the finding was moved meanwhile; look again", code="finding-moved")
        seq = await conn.fetchval("SELECT MAX(seq) FROM finding_moves WHERE finding_id = $1", finding_id)
        await conn.execute(
            "INSERT INTO finding_moves (finding_id, seq, from_status, to_status, actor_id, at_ms, note)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7)",
            finding_id,
            int(seq) + 1,
            finding.status,
            to,
            principal.id,
            now_ms,
            note,
        )
        await audit.append(
            conn,
            ctx,
            action="finding.move",
            resource={"type": "finding", "id": finding_id},
            details={"from": finding.status, "to": to, "note": note is not None},
        )
        return await _finding(conn, principal, finding_id), await _moves(conn, finding_id)


async def share(
    db: Database,
    audit: AuditLog,
    ctx: Context,
    principal: Principal,
    finding_id: str,
    *,
    grantee_name: str,
    headers: dict[str, bytes],
    now_ms: int,
) -> Finding:
    """Give a developer of the owning organisation who joined later the finding's keys: headers
    (for the body, and the attachments if any) that an existing developer wrapped on its machine."""
    grantee = await get_principal(db, grantee_name)
    async with db.transaction() as conn:
        finding = await _finding(conn, principal, finding_id)
        if principal.org_id != finding.org_id or principal.role != "developer":
            raise PermissionDenied(
                f"only developers of {finding.org_name} may give others access", code="role-required"
            )
        if grantee.org_id != finding.org_id or grantee.role != "developer" or grantee.status != "active":
            raise Conflict(
                f"{grantee.name} is not an active developer of {finding.org_name}", code="not-a-developer"
            )
        parts = {"body": finding.body_id} | (
            {"attachments": finding.attachments_id} if finding.attachments_id else {}
        )
        if set(headers) != set(parts):
            raise ValidationError(f"send one header for each of: {', '.join(parts)}", field="headers")
        for part, content_id in parts.items():
            has_own = await conn.fetchval(
                "SELECT 1 FROM artifact_headers WHERE artifact_id = $1 AND principal_id = $2",
                content_id,
                principal.id,
            )
            if has_own is None:
                raise PermissionDenied(
                    f"{principal.name} holds no key to this finding's {part}, so cannot pass one on",
                    code="not-a-recipient",
                )
            raw = check_header(headers[part], grantee.name)
            has_theirs = await conn.fetchval(
                "SELECT 1 FROM artifact_headers WHERE artifact_id = $1 AND principal_id = $2",
                content_id,
                grantee.id,
            )
            if has_theirs is not None:
                raise Conflict(f"{grantee.name} can already read this finding", code="already-shared")
            # A racing share of the same header hits the primary key: a Conflict, rolled back.
            await conn.execute(
                "INSERT INTO artifact_headers (artifact_id, principal_id, header, created_at_ms)"
                " VALUES ($1, $2, $3, $4)",
                content_id,
                grantee.id,
                raw,
                now_ms,
            )
        await audit.append(
            conn,
            ctx,
            action="finding.share",
            resource={"type": "finding", "id": finding_id},
            details={"principal": grantee.name},
        )
        return finding
