"""Download links: capabilities for one artifact, bound to one recipient, expiring and countable.

A link's token (`exl1_` + 32 random bytes in unpadded base64url, `services/tokens.py`) is shown
once, to its creator; the service keeps only its SHA-256, so a stolen database yields no working
link. A token that does not parse is refused before anything is looked up.

Redeeming needs no request signature, but the URL alone opens nothing: the link's challenge is a
fresh proof encrypted to the recipient's age key (`format/linkproof.py`), and only a request that
shows it opens a download session. So a leaked link is useless without that recipient's key, and
spends none of the recipient's downloads. Every redemption and every refusal is accounted for in
the log with the source IP and user agent; refusals of a token name their precise reason there,
while the answer is the same for every state (unknown, expired, revoked, used up, grant gone), so
an answer never tells whether a token ever existed.

Counting. A download is a *session*: opening one is the counted act, a guarded
`UPDATE links SET downloads = downloads + 1 WHERE … AND downloads < max_downloads`, so of
several racers for the last count exactly one wins. The proof that opened a session names it
(its SHA-256 is stored, unique), so every request carrying the same proof continues that session
uncounted, as do requests carrying the session's id (headers, file URLs, fresh URLs for a long
download, the receipt).

The decisions (`check_link`, `check_range`) are plain functions over records; the rest fetches
and persists around them, one transaction and its events per request.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..db import Connection, Database, Row
from ..errors import Conflict, NotFound, PermissionDenied, RangeNotSatisfiable, ValidationError
from ..format import age, linkproof
from ..format.note import Signer
from ..storage import Storage
from . import receipts
from .audit import AuditLog, Context
from .grants import require_owner
from .principals import Principal, get_principal, new_id
from .records import (
    Artifact,
    ArtifactFile,
    artifact_files,
    files_named,
    find_artifact,
    manifest_of,
    part_digests,
    visible_artifact,
)
from .tokens import LinkRefused, hash_token, new_token

__all__ = [
    "Credential",
    "Link",
    "ProofKeys",
    "Redemption",
    "SessionOpened",
    "challenge",
    "check_link",
    "check_range",
    "create",
    "file_url",
    "header",
    "list_links",
    "open_session",
    "receipt",
    "revoke",
    "view",
]

_SESSION = re.compile(r"ses_[0-9a-f]{32}")


# -- records and decisions ------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    id: str
    artifact_id: str
    artifact_name: str
    recipient_name: str
    created_by_name: str
    created_at_ms: int
    expires_at_ms: int
    max_downloads: int | None
    downloads: int
    revoked_at_ms: int | None
    allowed_networks: list[str] | None = None

    @classmethod
    def from_row(cls, row: Row) -> Link:
        return cls(
            id=row["id"],
            artifact_id=row["artifact_id"],
            artifact_name=row["artifact_name"],
            recipient_name=row["recipient_name"],
            created_by_name=row["created_by_name"],
            created_at_ms=row["created_at_ms"],
            expires_at_ms=row["expires_at_ms"],
            max_downloads=row["max_downloads"],
            downloads=row["downloads"],
            revoked_at_ms=row["revoked_at_ms"],
            allowed_networks=None if row["allowed_networks"] is None else row["allowed_networks"].split(","),
        )

    def to_json(self, now_ms: int) -> dict[str, Any]:
        return {
            "id": self.id,
            "artifact": self.artifact_id,
            "artifact_name": self.artifact_name,
            "recipient": self.recipient_name,
            "created_by": self.created_by_name,
            "created_at_ms": self.created_at_ms,
            "expires_at_ms": self.expires_at_ms,
            "max_downloads": self.max_downloads,
            "downloads": self.downloads,
            "revoked_at_ms": self.revoked_at_ms,
            "allowed_networks": self.allowed_networks,
            "state": self.state(now_ms),
        }

    def state(self, now_ms: int) -> str:
        if self.revoked_at_ms is not None:
            return "revoked"
        if self.expires_at_ms <= now_ms:
            return "expired"
        if self.max_downloads is not None and self.downloads >= self.max_downloads:
            return "used"
        return "active"


@dataclass(frozen=True)
class LinkRecord:
    """A link as redemption sees it: with its artifact's state and its recipient's grant."""

    id: str
    artifact_id: str
    recipient: Principal
    expires_at_ms: int
    max_downloads: int | None
    downloads: int
    revoked_at_ms: int | None
    artifact_status: str
    artifact_org_id: str
    grant_expires_at_ms: int | None
    grant_revoked_at_ms: int | None
    has_grant: bool
    allowed_networks: tuple[IPNetwork, ...] | None = None


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: At most this many networks in one link's allow-list.
MAX_ALLOWED_NETWORKS = 32


def parse_networks(texts: Sequence[str]) -> tuple[IPNetwork, ...]:
    """An allow-list as written (`203.0.113.7`, `198.51.100.0/24`, `2001:db8::/48`), or
    ValidationError naming the entry that is not a network."""
    if not texts:
        raise ValidationError("an allow-list needs at least one network", field="allowed_networks")
    if len(texts) > MAX_ALLOWED_NETWORKS:
        raise ValidationError(
            f"an allow-list holds at most {MAX_ALLOWED_NETWORKS} networks", field="allowed_networks"
        )
    networks = []
    for text in texts:
        try:
            networks.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            raise ValidationError(
                f"{text!r} is not an IP address or network (write 203.0.113.7 or 198.51.100.0/24)",
                field="allowed_networks",
            ) from None
    return tuple(networks)


def ip_allowed(networks: tuple[IPNetwork, ...] | None, ip: str | None) -> bool:
    if networks is None:
        return True
    try:
        address = ipaddress.ip_address(ip or "")
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in n for n in networks)


def check_link(link: LinkRecord, now_ms: int, *, counting: bool, ip: str | None = None) -> None:
    """May this link be redeemed now, from `ip`? Raise LinkRefused with the precise reason if not.

    `counting`: the request would open a new download session, so the count must allow one."""

    def refuse(reason: str) -> LinkRefused:
        return LinkRefused(reason, link_id=link.id)

    if link.revoked_at_ms is not None:
        raise refuse("link-revoked")
    if link.expires_at_ms <= now_ms:
        raise refuse("link-expired")
    if not ip_allowed(link.allowed_networks, ip):
        raise refuse("ip-not-allowed")
    if link.recipient.status != "active":
        raise refuse("recipient-disabled")
    if link.artifact_status != "complete":
        raise refuse(f"artifact-{link.artifact_status}")
    if link.recipient.org_id != link.artifact_org_id:
        if not link.has_grant:
            raise refuse("grant-missing")
        if link.grant_revoked_at_ms is not None:
            raise refuse("grant-revoked")
        if link.grant_expires_at_ms is not None and link.grant_expires_at_ms <= now_ms:
            raise refuse("grant-expired")
    if counting and link.max_downloads is not None and link.downloads >= link.max_downloads:
        raise refuse("link-exhausted")


_RANGE = re.compile(r"bytes=(\d{0,19})-(\d{0,19})")


def check_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The first and last byte a Range header asks for, within `size`; None for no Range.

    A single range only (our clients and curl send one); one starting at or past the end is
    RangeNotSatisfiable, as is one that does not parse."""
    if header is None:
        return None
    match = _RANGE.fullmatch(header.strip())
    if match is None or match.group(1) == match.group(2) == "":
        raise RangeNotSatisfiable("only one byte range of the form bytes=FIRST-LAST is served")
    first_s, last_s = match.groups()
    if first_s == "":
        suffix = int(last_s)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable(f"the range asks for nothing of a {size}-byte object", size=size)
        return max(0, size - suffix), size - 1
    first = int(first_s)
    last = size - 1 if last_s == "" else int(last_s)
    if last < first:
        raise RangeNotSatisfiable("the range ends before it starts", size=size)
    if first >= size:
        raise RangeNotSatisfiable(f"the range starts at byte {first}, past the end ({size} bytes)", size=size)
    return first, min(last, size - 1)


# -- reads ----------------------------------------------------------------------------------------

_LINK_SELECT = (
    "SELECT l.*, a.name AS artifact_name, r.name AS recipient_name, c.name AS created_by_name"
    " FROM links l JOIN artifacts a ON a.id = l.artifact_id JOIN principals r ON r.id = l.recipient_id"
    " JOIN principals c ON c.id = l.created_by"
)

_RECORD_SELECT = (
    "SELECT l.id, l.artifact_id, l.expires_at_ms, l.max_downloads, l.downloads, l.revoked_at_ms,"
    " l.allowed_networks,"
    " CASE WHEN a.deleted_at_ms IS NOT NULL THEN 'deleted' ELSE a.status END AS artifact_status,"
    " a.org_id AS artifact_org_id,"
    " g.expires_at_ms AS grant_expires_at_ms, g.revoked_at_ms AS grant_revoked_at_ms,"
    " g.principal_id AS grant_principal,"
    " r.id AS r_id, r.name AS r_name, r.org_id AS r_org_id, o.name AS r_org_name, r.role AS r_role,"
    " r.key_id AS r_key_id, r.signing_public_key AS r_signing_public_key,"
    " r.age_recipient AS r_age_recipient, r.status AS r_status, r.created_at_ms AS r_created_at_ms"
    " FROM links l JOIN artifacts a ON a.id = l.artifact_id"
    " JOIN principals r ON r.id = l.recipient_id JOIN orgs o ON o.id = r.org_id"
    " LEFT JOIN grants g ON g.artifact_id = l.artifact_id AND g.principal_id = l.recipient_id"
    " WHERE l.token_sha256 = $1"
)


def _record(row: Row) -> LinkRecord:
    recipient = Principal.from_row({k[2:]: v for k, v in row.items() if k.startswith("r_")})
    return LinkRecord(
        id=row["id"],
        artifact_id=row["artifact_id"],
        recipient=recipient,
        expires_at_ms=row["expires_at_ms"],
        max_downloads=row["max_downloads"],
        downloads=row["downloads"],
        revoked_at_ms=row["revoked_at_ms"],
        artifact_status=row["artifact_status"],
        artifact_org_id=row["artifact_org_id"],
        grant_expires_at_ms=row["grant_expires_at_ms"],
        grant_revoked_at_ms=row["grant_revoked_at_ms"],
        has_grant=row["grant_principal"] is not None,
        allowed_networks=_networks(row["allowed_networks"]),
    )


def _networks(stored: str | None) -> tuple[IPNetwork, ...] | None:
    return None if stored is None else tuple(ipaddress.ip_network(n) for n in stored.split(","))


@dataclass(frozen=True)
class Redemption:
    """What a redeemable link opens: the link, its artifact and files, and (if any) the session."""

    link: LinkRecord
    artifact: Artifact
    files: list[ArtifactFile]
    digests: dict[int, dict[int, bytes]]
    session: str | None = None


async def _check(
    conn: Connection, token_hash: bytes, now_ms: int, *, counting: bool, ip: str | None
) -> LinkRecord:
    """The link's record, if redeemable now from `ip`; LinkRefused with the reason if not."""
    row = await conn.fetchone(_RECORD_SELECT, token_hash)
    if row is None:
        raise LinkRefused("link-unknown")
    record = _record(row)
    check_link(record, now_ms, counting=counting, ip=ip)
    return record


async def _resolve(
    conn: Connection, token_hash: bytes, now_ms: int, *, counting: bool, ip: str | None
) -> tuple[LinkRecord, Artifact]:
    record = await _check(conn, token_hash, now_ms, counting=counting, ip=ip)
    artifact = await find_artifact(conn, record.artifact_id)
    assert artifact is not None
    return record, artifact


async def view(
    db: Database, audit: AuditLog, ctx: Context, token_hash: bytes, now_ms: int, *, html: bool
) -> Redemption:
    """What the link holds, if it could open a download now from the request's address: the
    link, its artifact and files. Counts nothing; the view is an audit event. A link that is used
    up answers like any other unusable one (the uniform 404)."""
    async with db.transaction() as conn:
        record, artifact = await _resolve(conn, token_hash, now_ms, counting=True, ip=ctx.ip)
        files = await artifact_files(conn, artifact.id)
        await audit.append(
            conn,
            ctx,
            action="link.view",
            resource={"type": "artifact", "id": artifact.id},
            details={"link": record.id, "html": html},
        )
    return Redemption(record, artifact, files, {})


async def _session_of(conn: Connection, record: LinkRecord, session: str) -> str:
    if not _SESSION.fullmatch(session):
        raise LinkRefused("session-malformed", link_id=record.id)
    found = await conn.fetchval(
        "SELECT id FROM link_sessions WHERE id = $1 AND link_id = $2", session, record.id
    )
    if found is None:
        raise LinkRefused("session-unknown", link_id=record.id)
    return str(found)


async def _open(
    conn: Connection, audit: AuditLog, ctx: Context, record: LinkRecord, now_ms: int, proof_sha256: bytes
) -> tuple[str, bool]:
    """Open the session this proof names, counting one download, or refuse: of racers for the last
    count, one wins. Return (session, opened); opened is False when a racer with the same proof
    opened it first (then nothing is counted twice)."""
    session = "ses_" + secrets.token_hex(16)
    inserted = await conn.execute(
        "INSERT INTO link_sessions (id, link_id, opened_at_ms, proof_sha256) VALUES ($1, $2, $3, $4)"
        " ON CONFLICT DO NOTHING",
        session,
        record.id,
        now_ms,
        proof_sha256,
    )
    if inserted != 1:  # the same proof opened a session a moment ago, in a transaction now committed
        found = await conn.fetchval(
            "SELECT id FROM link_sessions WHERE link_id = $1 AND proof_sha256 = $2", record.id, proof_sha256
        )
        if found is None:
            raise LinkRefused("session-unknown", link_id=record.id)
        return str(found), False
    won = await conn.execute(
        "UPDATE links SET downloads = downloads + 1 WHERE id = $1 AND revoked_at_ms IS NULL"
        " AND expires_at_ms > $2 AND (max_downloads IS NULL OR downloads < max_downloads)",
        record.id,
        now_ms,
    )
    if won != 1:
        raise LinkRefused("link-exhausted", link_id=record.id)  # the transaction drops the session
    downloads = await conn.fetchval("SELECT downloads FROM links WHERE id = $1", record.id)
    await audit.append(
        conn,
        ctx,
        action="link.session",
        resource={"type": "artifact", "id": record.artifact_id},
        details={
            "link": record.id,
            "recipient": record.recipient.name,
            "session": session,
            "downloads": int(downloads),
            "max_downloads": record.max_downloads,
        },
        actor=record.recipient.actor,
    )
    return session, True


@dataclass(frozen=True)
class Credential:
    """What a redemption request shows besides the token: a proof of the recipient's key (from
    the link's challenge) or the id of a session such a proof opened. A request with neither is
    refused (`proof-required`) once the link is known to be usable; it spends nothing."""

    proof: str | None = None
    session: str | None = None


def _refuse_proof(record: LinkRecord, reason: str) -> PermissionDenied:
    messages = {
        "proof-required": "downloading through this link needs a proof that you hold the recipient's key:"
        " fetch GET /l/TOKEN/challenge, decrypt it with `age -d -i key.txt`, and send it as ?proof=…"
        " (`exchange download URL` does all of this)",
        "proof-malformed": "the proof is not of the form exp1_…: send exactly what the challenge decrypts to",
        "proof-invalid": "the proof was not issued for this link; ask its challenge for a new one",
        "proof-expired": "the proof is too old to open a download; ask the link's challenge for a new one",
    }
    return PermissionDenied(messages[reason], code=reason, link=record.id)


async def _enter(
    conn: Connection,
    audit: AuditLog,
    ctx: Context,
    token_hash: bytes,
    now_ms: int,
    credential: Credential,
    keys: ProofKeys,
) -> tuple[LinkRecord, str, bool]:
    """The link's record and the session this request belongs to, opening (and counting) it if
    the request carries a fresh proof; refuse with the precise reason otherwise.

    Return (record, session, opened)."""
    row = await conn.fetchone(_RECORD_SELECT, token_hash)
    if row is None:
        raise LinkRefused("link-unknown")
    record = _record(row)
    if credential.session is not None:
        check_link(record, now_ms, counting=False, ip=ctx.ip)
        return record, await _session_of(conn, record, credential.session), False
    if credential.proof is None:
        check_link(record, now_ms, counting=True, ip=ctx.ip)  # an unusable link: the uniform answer
        raise _refuse_proof(record, "proof-required")
    try:
        digest = linkproof.proof_digest(credential.proof)
    except linkproof.LinkProofError as exc:  # names no session: it could only open a new one
        check_link(record, now_ms, counting=True, ip=ctx.ip)
        raise _refuse_proof(record, exc.reason) from None
    found = await conn.fetchval(
        "SELECT id FROM link_sessions WHERE link_id = $1 AND proof_sha256 = $2", record.id, digest
    )
    if found is not None:  # this proof opened a session already: continue it, uncounted
        check_link(record, now_ms, counting=False, ip=ctx.ip)
        return record, str(found), False
    check_link(record, now_ms, counting=True, ip=ctx.ip)
    try:
        linkproof.verify_proof(
            keys.mac_key, record.id, credential.proof, now_ms=now_ms, max_age_ms=keys.max_age_s * 1000
        )
    except linkproof.LinkProofError as exc:
        raise _refuse_proof(record, exc.reason) from None
    session, opened = await _open(conn, audit, ctx, record, now_ms, digest)
    return record, session, opened


@dataclass(frozen=True)
class ProofKeys:
    """The service's key for link proofs and how long a proof may open a session."""

    mac_key: bytes = field(repr=False)
    max_age_s: int

    @classmethod
    def from_signer(cls, signer: Signer, *, max_age_s: int) -> ProofKeys:
        """Derived from the log's signing key, which every replica shares: any replica checks the
        proofs any other issued, and no further secret needs distributing."""
        return cls(signer.derive_key(linkproof.PROOF_KEY_LABEL), max_age_s)


async def challenge(
    db: Database, audit: AuditLog, ctx: Context, token_hash: bytes, now_ms: int, keys: ProofKeys
) -> tuple[LinkRecord, bytes]:
    """A fresh proof for the link's recipient, as an age file only the recipient's key opens.

    Counts nothing and stores nothing but its audit event; refused like a download (the uniform
    404) when the link could not open a session now."""
    async with db.transaction() as conn:
        record = await _check(conn, token_hash, now_ms, counting=True, ip=ctx.ip)
        proof = linkproof.make_proof(keys.mac_key, record.id, now_ms)
        sealed = age.encrypt(proof.encode("ascii"), [record.recipient.age_recipient])
        await audit.append(
            conn,
            ctx,
            action="link.challenge",
            resource={"type": "artifact", "id": record.artifact_id},
            details={"link": record.id, "recipient": record.recipient.name},
        )
    return record, sealed


async def open_session(
    db: Database,
    storage: Storage,
    audit: AuditLog,
    ctx: Context,
    token_hash: bytes,
    now_ms: int,
    credential: Credential,
    keys: ProofKeys,
    *,
    ttl_s: int,
) -> SessionOpened:
    """Open a counted download session with a proof, or continue one (`credential.session`, or
    the proof that opened it) without counting; with everything a download needs: presigned
    GETs of every file living `ttl_s`, the recipient's header, the signed manifest, the uploader."""
    async with db.transaction() as conn:
        record, session, opened = await _enter(conn, audit, ctx, token_hash, now_ms, credential, keys)
        artifact = await find_artifact(conn, record.artifact_id)
        assert artifact is not None
        header_raw = await conn.fetchval(
            "SELECT header FROM artifact_headers WHERE artifact_id = $1 AND principal_id = $2",
            record.artifact_id,
            record.recipient.id,
        )
        if header_raw is None:
            raise LinkRefused("not-a-recipient", link_id=record.id)
        # The key the manifest names, current or retired by a rotation since (principal_keys).
        signed = manifest_of(artifact)
        uploader_row = await conn.fetchone(
            "SELECT p.name, k.key_id, k.signing_public_key FROM principals p"
            " JOIN principal_keys k ON k.principal_id = p.id WHERE p.id = $1 AND k.key_id = $2",
            artifact.created_by,
            signed[0].uploader if signed else "",
        ) or await conn.fetchone(
            "SELECT name, key_id, signing_public_key FROM principals WHERE id = $1", artifact.created_by
        )
        assert uploader_row is not None
        if not opened:
            await audit.append(
                conn,
                ctx,
                action="link.renew",
                resource={"type": "artifact", "id": record.artifact_id},
                details={"link": record.id, "session": session, "ttl_s": ttl_s},
                actor=record.recipient.actor,
            )
        files = await artifact_files(conn, artifact.id)
        digests = await part_digests(conn, artifact.id)
    urls = {f.idx: storage.presign_get(f.object_key, ttl_s=ttl_s) for f in files}
    return SessionOpened(
        Redemption(record, artifact, files, digests, session),
        header=bytes(header_raw),
        urls=urls,
        uploader={
            "name": uploader_row["name"],
            "key_id": uploader_row["key_id"],
            "signing_public_key": bytes(uploader_row["signing_public_key"]),
        },
        expires_at_ms=now_ms + ttl_s * 1000,
    )


@dataclass(frozen=True)
class SessionOpened:
    """A download session and everything its client needs, decided in one transaction."""

    redemption: Redemption
    header: bytes
    urls: dict[int, str]
    uploader: dict[str, Any]
    expires_at_ms: int


async def header(
    db: Database,
    audit: AuditLog,
    ctx: Context,
    token_hash: bytes,
    now_ms: int,
    credential: Credential,
    keys: ProofKeys,
) -> bytes:
    """The bound recipient's age header, within a session (opened by this request's proof if it
    is the first of that proof's requests)."""
    async with db.transaction() as conn:
        record, session, _ = await _enter(conn, audit, ctx, token_hash, now_ms, credential, keys)
        raw = await conn.fetchval(
            "SELECT header FROM artifact_headers WHERE artifact_id = $1 AND principal_id = $2",
            record.artifact_id,
            record.recipient.id,
        )
        if raw is None:
            raise LinkRefused("not-a-recipient", link_id=record.id)
        await audit.append(
            conn,
            ctx,
            action="link.header",
            resource={"type": "artifact", "id": record.artifact_id},
            details={"link": record.id, "recipient": record.recipient.name, "session": session},
            actor=record.recipient.actor,
        )
    return bytes(raw)


async def file_url(
    db: Database,
    storage: Storage,
    audit: AuditLog,
    ctx: Context,
    token_hash: bytes,
    now_ms: int,
    credential: Credential,
    keys: ProofKeys,
    *,
    index: int,
    range_header: str | None,
    ttl_s: int,
) -> tuple[str, str]:
    """A presigned GET for one file (checked against the Range asked for); return (url, session).

    The first request carrying a fresh proof opens (and counts) the session; every later one with
    the same proof, or with the session's id, continues it."""
    async with db.transaction() as conn:
        row = await conn.fetchone(_RECORD_SELECT, token_hash)
        if row is None:
            raise LinkRefused("link-unknown")
        # The one file asked for: an artifact may have thousands, and this is every redirect.
        f = (await files_named(conn, row["artifact_id"], [index])).get(index)
        if f is None:
            check_link(_record(row), now_ms, counting=False, ip=ctx.ip)
            count = await conn.fetchval("SELECT file_count FROM artifacts WHERE id = $1", row["artifact_id"])
            raise NotFound(f"the artifact has files 0 to {count - 1}, not {index}", code="no-such-file")
        byte_range = check_range(range_header, f.ciphertext_size)
        record, session, _ = await _enter(conn, audit, ctx, token_hash, now_ms, credential, keys)
        await audit.append(
            conn,
            ctx,
            action="link.file",
            resource={"type": "artifact", "id": record.artifact_id},
            details={
                "link": record.id,
                "session": session,
                "file": index,
                "range": None if byte_range is None else f"{byte_range[0]}-{byte_range[1]}",
                "ttl_s": ttl_s,
            },
            actor=record.recipient.actor,
        )
    return storage.presign_get(f.object_key, ttl_s=ttl_s), session


async def receipt(
    db: Database,
    audit: AuditLog,
    ctx: Context,
    token_hash: bytes,
    now_ms: int,
    *,
    session: str,
    signature: bytes,
) -> dict[str, Any]:
    """Record the recipient's signed receipt of a session's download: the end of custody.

    The signature is the recipient's Ed25519 signature over `format.receipt.receipt_message`
    (artifact, link, session and manifest digest, domain-separated), checked against the
    recipient's registered key.
    A link's receipts stay acceptable after it expires or is used up: the download happened."""
    async with db.transaction() as conn:
        row = await conn.fetchone(_RECORD_SELECT, token_hash)
        if row is None:
            raise LinkRefused("link-unknown")
        record = _record(row)
        session = await _session_of(conn, record, session)
        return await receipts.record(
            conn,
            audit,
            ctx,
            recipient=record.recipient,
            artifact_id=record.artifact_id,
            link_id=record.id,
            session=session,
            signature=signature,
            now_ms=now_ms,
        )


# -- management (signed) --------------------------------------------------------------------------


async def create(
    db: Database,
    audit: AuditLog,
    ctx: Context,
    principal: Principal,
    artifact_id: str,
    *,
    recipient_name: str,
    lifetime_s: int,
    max_lifetime_s: int,
    max_downloads: int | None,
    now_ms: int,
    allowed_networks: Sequence[str] | None = None,
) -> tuple[Link, str]:
    """A new link for a granted recipient; return it and its token (shown once, never stored).

    `allowed_networks`: redeem only from these addresses or networks (None: from anywhere)."""
    if not 0 < lifetime_s <= max_lifetime_s:
        raise ValidationError(
            f"a link lives between 1 second and {max_lifetime_s} seconds", code="link-lifetime"
        )
    if max_downloads is not None and max_downloads < 1:
        raise ValidationError("max_downloads must be at least 1", field="max_downloads")
    networks = None if allowed_networks is None else parse_networks(allowed_networks)
    stored_networks = None if networks is None else ",".join(str(n) for n in networks)
    recipient = await get_principal(db, recipient_name)
    token = new_token()
    link_id = new_id("lnk")
    async with db.transaction() as conn:
        artifact = await visible_artifact(conn, principal, artifact_id, now_ms)
        require_owner(principal, artifact)
        if artifact.status != "complete":
            raise Conflict(
                f"the artifact is {artifact.status}: links are made only for complete uploads",
                code=f"artifact-{artifact.status}",
            )
        if recipient.status != "active":
            raise Conflict(f"{recipient.name} is not an active principal", code="principal-disabled")
        needs_grant = recipient.org_id != artifact.org_id
        # Check the grant with a guarded no-op UPDATE, not a SELECT: it locks the grant row until
        # this transaction commits (PostgreSQL row lock; SQLite's writer lock anyway), so a racing
        # revoke either commits first (the guard fails: refused) or waits, and then its
        # `UPDATE links` sees and revokes this link. A plain SELECT let a revoke commit between
        # the check and the INSERT on READ COMMITTED, leaving a live link issued after it.
        locked = needs_grant and await conn.execute(
            "UPDATE grants SET revoked_at_ms = revoked_at_ms WHERE artifact_id = $1 AND principal_id = $2"
            " AND revoked_at_ms IS NULL AND (expires_at_ms IS NULL OR expires_at_ms > $3)",
            artifact_id,
            recipient.id,
            now_ms,
        )
        if needs_grant and locked != 1:
            raise Conflict(
                f"{recipient.name} holds no active grant of {artifact_id}: grant it first", code="not-granted"
            )
        has_header = await conn.fetchval(
            "SELECT 1 FROM artifact_headers WHERE artifact_id = $1 AND principal_id = $2",
            artifact_id,
            recipient.id,
        )
        if has_header is None:
            raise Conflict(f"{recipient.name} is not a recipient of {artifact_id}", code="not-a-recipient")
        expires = now_ms + lifetime_s * 1000
        await conn.execute(
            "INSERT INTO links (id, token_sha256, artifact_id, recipient_id, created_by, created_at_ms,"
            " expires_at_ms, max_downloads, downloads, allowed_networks)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 0, $9)",
            link_id,
            hash_token(token),
            artifact_id,
            recipient.id,
            principal.id,
            now_ms,
            expires,
            max_downloads,
            stored_networks,
        )
        await audit.append(
            conn,
            ctx,
            action="link.create",
            resource={"type": "link", "id": link_id},
            details={
                "artifact": artifact_id,
                "recipient": recipient.name,
                "expires_at_ms": expires,
                "max_downloads": max_downloads,
                "allowed_networks": None if networks is None else [str(n) for n in networks],
            },
        )
        row = await conn.fetchone(_LINK_SELECT + " WHERE l.id = $1", link_id)
    assert row is not None
    return Link.from_row(row), token


async def list_links(
    db: Database, principal: Principal, *, artifact_id: str | None, limit: int
) -> list[Link]:
    """Links the caller may see: its organisation's artifacts' (all for admins and auditors),
    and those bound to the caller."""
    everyone = principal.role in ("admin", "auditor")
    rows = await db.fetchall(
        _LINK_SELECT + " WHERE ($1 OR a.org_id = $2 OR l.recipient_id = $3)"
        " AND (CAST($4 AS TEXT) IS NULL OR l.artifact_id = $4) ORDER BY l.created_at_ms DESC, l.id DESC"
        " LIMIT $5",
        everyone,
        principal.org_id,
        principal.id,
        artifact_id,
        limit,
    )
    return [Link.from_row(r) for r in rows]


async def revoke(
    db: Database, audit: AuditLog, ctx: Context, principal: Principal, link_id: str, *, now_ms: int
) -> Link:
    """Revoke a link at once: every later redemption, in any session, is refused."""
    async with db.transaction() as conn:
        row = await conn.fetchone(_LINK_SELECT + " WHERE l.id = $1", link_id)
        if row is None:
            raise NotFound(f"no link {link_id!r}")
        try:
            artifact = await visible_artifact(conn, principal, row["artifact_id"])
            require_owner(principal, artifact)
        except (NotFound, PermissionDenied):
            raise NotFound(f"no link {link_id!r}") from None
        changed = await conn.execute(
            "UPDATE links SET revoked_at_ms = $1 WHERE id = $2 AND revoked_at_ms IS NULL", now_ms, link_id
        )
        if changed != 1:
            raise Conflict("the link was already revoked", code="link-revoked")
        await audit.append(
            conn,
            ctx,
            action="link.revoke",
            resource={"type": "link", "id": link_id},
            details={"artifact": row["artifact_id"], "recipient": row["recipient_name"]},
        )
        final = await conn.fetchone(_LINK_SELECT + " WHERE l.id = $1", link_id)
    assert final is not None
    return Link.from_row(final)
