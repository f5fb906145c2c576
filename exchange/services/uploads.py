"""Uploads: the multipart lifecycle of an artifact, from its declaration to its completion.

The service never sees plaintext or file keys. It keeps, per artifact, the metadata (name, kind,
paths, sizes, payload nonces), one age header per recipient, the SHA-256 every part URL was
bound to, and — once complete — the uploader's signed manifest. Storage keys are its own
(`new_object_key`); paths live only in metadata.

The life of an upload:

    create      the uploader declares files, sizes and nonces, and posts one header per
                recipient (itself and every active developer of its organisation); the service
                picks the part size                                          -> 'uploading'
    part URLs   for each part the client names the SHA-256 of its ciphertext; the service records
                it (a part's digest never changes) and answers with a URL bound to that size and
                digest, so storage refuses any other bytes; re-issuable, in batches. A file of
                one part gets a PUT of its whole object (one storage call fewer to start it, three
                fewer to finish it); a larger file, a multipart upload started on first need
    complete    the client sends its signed manifest; the service verifies the signature with
                the uploader's registered key, checks every per-file value against its own
                records, checks what storage holds, assembles the objects    -> 'complete'
    abort       by the uploader, or by the sweeper once `upload_abandon_after_s` has passed:
                multipart uploads aborted, objects removed                   -> 'aborted'

A PUT URL outlives the upload it was issued for (a part URL dies with its multipart upload): used
after an abort or a deletion it would put the object back. So each file records until when its
last PUT URL may work (`put_until_ms`: expiry plus `STORAGE_CLOCK_SKEW_S`), and the sweeper
deletes the object of an aborted or deleted artifact once that time has passed
(`sweep_returned`). A URL only ever carries the bytes it was bound to, so before then an object
put back is the same ciphertext, never anything else.

Each change and its audit event commit together. The decisions (may this principal continue the
upload; does the manifest match the records; does storage hold the parts the layout says) are
the plain functions at the top.

What this module does not do: read a complete artifact's header or hand out download URLs (the
catalogue, `artifacts`), or decide where a link's or a finding's upload lands (their `claim`s,
in `uploadlinks` and `findings`). The records and shared reads are `records`'.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ..db import Connection, Database, placeholders
from ..errors import Conflict, ExchangeError, NotFound, PermissionDenied, ValidationError
from ..format import age
from ..format.manifest import (
    KINDS,
    Manifest,
    PartRange,
    check_paths,
    choose_part_size,
    ciphertext_digest,
    part_count,
    part_range,
    part_ranges,
)
from ..storage import Part, PresignedRequest, Storage, new_object_key
from .audit import SYSTEM, AuditLog, Context
from .principals import Principal, new_id, require_role
from .records import (
    SELECT_ARTIFACT,
    Artifact,
    ArtifactFile,
    artifact_files,
    check_header,
    files_named,
    find_artifact,
    part_digests,
    visible_artifact,
)

__all__ = [
    "Claim",
    "FileDeclaration",
    "Limits",
    "PartURL",
    "Target",
    "abort",
    "abort_artifact",
    "check_manifest",
    "check_stored_parts",
    "complete",
    "create",
    "issue_part_urls",
    "remove_from_storage",
    "require_uploader",
    "sweep_abandoned",
    "sweep_returned",
    "upload_status",
]

log = logging.getLogger("exchange.artifacts")


@dataclass(frozen=True)
class Limits:
    min_part_bytes: int
    max_files: int
    max_bytes: int
    max_part_urls: int


@dataclass(frozen=True)
class FileDeclaration:
    path: str
    size: int
    nonce: bytes


@dataclass(frozen=True)
class Target:
    """Where an upload lands when it is not simply its uploader's organisation's own: an upload
    link's organisation, or a finding's. The artifact belongs to `org_id`; its headers must be for
    that organisation's active developers, the uploader, and the `extra` principals (name -> id)."""

    org_id: str
    org_name: str
    extra: dict[str, str]
    details: dict[str, Any]
    #: Run in the same transaction once the artifact's rows exist (e.g. to spend the upload link
    #: with a guarded UPDATE that references them); raising refuses the whole creation.
    finish: Callable[[Connection], Awaitable[None]] | None = None


#: Decides, inside the creating transaction, where an upload lands — or refuses it. Called with the
#: connection, the new artifact's id, its kind and its total plaintext bytes.
Claim = Callable[[Connection, str, str, int], Awaitable[Target]]


@dataclass(frozen=True)
class PartURL:
    file: int
    number: int
    size: int
    request: PresignedRequest


# -- decisions ------------------------------------------------------------------------------------


def require_uploader(principal: Principal, artifact: Artifact) -> None:
    """Only the principal that started an upload may continue it, and only while it runs."""
    if principal.id != artifact.created_by:
        raise PermissionDenied(
            "only the principal that started this upload may continue it", code="not-uploader"
        )
    if artifact.status != "uploading":
        raise Conflict(
            f"the artifact is {artifact.status}, not uploading", code=f"artifact-{artifact.status}"
        )


def check_manifest(
    manifest: Manifest,
    artifact: Artifact,
    uploader: Principal,
    files: Sequence[ArtifactFile],
    digests: dict[int, dict[int, bytes]],
) -> None:
    """Does the signed manifest describe exactly what the service recorded? Raise Conflict if not."""

    def mismatch(what: str) -> Conflict:
        return Conflict(f"the manifest does not match the upload: {what}", code="manifest-mismatch")

    expected = {
        "artifact": artifact.id,
        "org": artifact.org_name,
        "name": artifact.name,
        "kind": artifact.kind,
        "uploader": uploader.key_id,
        "part_size": artifact.part_size,
    }
    for field, value in expected.items():
        if getattr(manifest, field) != value:
            raise mismatch(f"its {field} is not this artifact's")
    if sorted(f.path for f in manifest.files) != sorted(f.path for f in files):
        raise mismatch("it lists other files than were declared")
    for f in files:
        entry = manifest.file(f.path)
        if (entry.size, entry.ciphertext_size) != (f.plaintext_size, f.ciphertext_size):
            raise mismatch(f"the sizes of {f.path!r} differ from those declared")
        if entry.nonce != f.nonce or entry.object != f.object_key:
            raise mismatch(f"the nonce or object of {f.path!r} differ from those recorded")
        recorded = digests.get(f.idx, {})
        missing = [n for n in range(1, f.part_count + 1) if n not in recorded]
        if missing:
            raise Conflict(
                f"{f.path!r}: no part URL was issued for part(s) {_numbers(missing)}", code="parts-missing"
            )
        ours = ciphertext_digest([recorded[n] for n in range(1, f.part_count + 1)])
        if entry.ciphertext_digest != ours:
            raise mismatch(f"the ciphertext digest of {f.path!r} is not that of its recorded parts")


def check_stored_parts(f: ArtifactFile, stored: Sequence[Part], ranges: Sequence[PartRange]) -> list[Part]:
    """The parts storage holds for `f`, one per number, checked against the layout. Raise Conflict."""
    by_number: dict[int, Part] = {}
    for part in stored:
        seen = by_number.get(part.number)
        # A part uploaded twice may be listed twice (SeaweedFS does); the same bytes are harmless.
        if seen is not None and (seen.size, seen.etag) != (part.size, part.etag):
            raise Conflict(
                f"{f.path!r}: part {part.number} is stored twice with different bytes", code="part-conflict"
            )
        by_number[part.number] = part
    missing = [r.number for r in ranges if r.number not in by_number]
    if missing:
        raise Conflict(f"{f.path!r}: part(s) {_numbers(missing)} not uploaded yet", code="parts-missing")
    extra = sorted(set(by_number) - {r.number for r in ranges})
    if extra:
        raise Conflict(
            f"{f.path!r}: storage holds unexpected part(s) {_numbers(extra)}", code="part-unexpected"
        )
    for r in ranges:
        if by_number[r.number].size != r.size:
            raise Conflict(
                f"{f.path!r}: stored part {r.number} is {by_number[r.number].size} bytes, not {r.size}",
                code="part-size-mismatch",
            )
    return [by_number[r.number] for r in ranges]


def _numbers(numbers: Sequence[int]) -> str:
    shown = ", ".join(map(str, numbers[:10]))
    return shown + (f" and {len(numbers) - 10} more" if len(numbers) > 10 else "")


# -- reads ----------------------------------------------------------------------------------------


async def _recorded(
    conn: Connection, artifact_id: str, parts: Sequence[tuple[int, int]]
) -> dict[tuple[int, int], bytes]:
    """The recorded digests of just these (file, part number) pairs: a batch of part URLs costs
    its own size, not the artifact's."""
    by_file: dict[int, list[int]] = {}
    for file_idx, number in parts:
        by_file.setdefault(file_idx, []).append(number)
    out: dict[tuple[int, int], bytes] = {}
    for file_idx, numbers in by_file.items():
        in_list = placeholders(3, len(numbers))
        sql = f"SELECT number, sha256 FROM artifact_parts WHERE artifact_id = $1 AND file_idx = $2 AND number IN ({in_list})"  # noqa: S608, E501 - placeholders only
        rows = await conn.fetchall(
            sql,
            artifact_id,
            file_idx,
            *numbers,
        )
        out.update({(file_idx, int(r["number"])): bytes(r["sha256"]) for r in rows})
    return out


async def upload_status(
    db: Database, storage: Storage, principal: Principal, artifact_id: str
) -> tuple[Artifact, list[ArtifactFile], dict[int, dict[int, bytes]], dict[int, list[Part]]]:
    """What a resuming uploader needs: files, recorded part digests, parts storage holds."""
    async with db.read() as conn:
        artifact = await visible_artifact(conn, principal, artifact_id)
        require_uploader(principal, artifact)
        files = await artifact_files(conn, artifact_id)
        digests = await part_digests(conn, artifact_id)
    stored: dict[int, list[Part]] = {}

    async def one(f: ArtifactFile) -> None:
        if _one_put(f):
            info = await storage.head(f.object_key)
            if info is not None and info.size == f.ciphertext_size:
                stored[f.idx] = [Part(1, info.size, info.etag, None)]
        elif f.upload_id is not None:
            try:
                unique = {p.number: p for p in await storage.list_parts(f.object_key, f.upload_id)}
            except NotFound:
                # Assembled by a completion refused later (another file's parts were missing):
                # the object stands, so every part of it is stored.
                if not await _assembled(storage, f):
                    raise Conflict(
                        f"{f.path!r}: the upload is gone from storage", code="upload-gone"
                    ) from None
                ranges = part_ranges(f.plaintext_size, artifact.part_size)
                unique = {r.number: Part(r.number, r.size, "", None) for r in ranges}
            stored[f.idx] = [unique[n] for n in sorted(unique)]

    await _each(files, one)
    return artifact, files, digests, stored


# -- changes --------------------------------------------------------------------------------------


async def create(
    db: Database,
    audit: AuditLog,
    ctx: Context,
    principal: Principal,
    *,
    name: str,
    kind: str,
    files: Sequence[FileDeclaration],
    headers: dict[str, bytes],
    limits: Limits,
    now_ms: int,
    claim: Claim | None = None,
) -> tuple[Artifact, list[ArtifactFile]]:
    """Start an upload: record the files and the recipients' headers; storage is touched later.

    Without `claim`, a developer uploads into its own organisation. With it (an upload link, a
    finding), `claim` decides in the same transaction where the artifact lands, or refuses."""
    if claim is None:
        require_role(principal, "developer")
    if kind not in KINDS:
        raise ValidationError(f"kind must be one of: {', '.join(KINDS)}", field="kind")
    if len(files) > limits.max_files:
        raise ValidationError(f"an artifact holds at most {limits.max_files} files")
    paths = check_paths(f.path for f in files)
    total = sum(f.size for f in files)
    if total > limits.max_bytes:
        raise ValidationError(f"the artifact is {total} bytes, over the limit of {limits.max_bytes}")
    for f in files:
        if len(f.nonce) != age.NONCE_SIZE:
            raise ValidationError(f"the nonce of {f.path!r} must be {age.NONCE_SIZE} bytes")
    if len({f.nonce for f in files}) != len(files):
        raise ValidationError("two files share a payload nonce; each file needs its own")
    part_size = choose_part_size(max(f.size for f in files), min_part_bytes=limits.min_part_bytes)
    for who, raw in headers.items():
        check_header(raw, who)
    by_path = {f.path: f for f in files}
    artifact_id = new_id("art")
    async with db.transaction() as conn:
        if claim is None:
            target = Target(principal.org_id, principal.org_name, {}, {})
        else:
            target = await claim(conn, artifact_id, kind, total)
        developers = await conn.fetchall(
            "SELECT id, name FROM principals WHERE org_id = $1 AND status = 'active' AND role = 'developer'",
            target.org_id,
        )
        wanted = {r["name"]: r["id"] for r in developers} | target.extra | {principal.name: principal.id}
        missing = sorted(set(wanted) - set(headers))
        if missing:
            raise Conflict(
                f"headers are missing for: {', '.join(missing[:10])} (every active developer of the"
                " organisation, and the uploader, must be able to read its artifacts)",
                code="headers-incomplete",
                missing=missing[:100],
            )
        unknown = sorted(set(headers) - set(wanted))
        if unknown:
            raise ValidationError(
                f"headers name principals that are not active developers of {target.org_name}:"
                f" {', '.join(unknown[:10])}",
                code="headers-unknown",
            )
        await conn.execute(
            "INSERT INTO artifacts (id, org_id, name, kind, status, created_by, created_at_ms, part_size,"
            " file_count, plaintext_bytes) VALUES ($1, $2, $3, $4, 'uploading', $5, $6, $7, $8, $9)",
            artifact_id,
            target.org_id,
            name,
            kind,
            principal.id,
            now_ms,
            part_size,
            len(files),
            total,
        )
        for idx, path in enumerate(paths):
            f = by_path[path]
            await conn.execute(
                "INSERT INTO artifact_files (artifact_id, idx, path, plaintext_size, ciphertext_size,"
                " part_count, payload_nonce, object_key) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                artifact_id,
                idx,
                path,
                f.size,
                age.ciphertext_size(f.size),
                part_count(f.size, part_size),
                f.nonce,
                new_object_key("artifacts"),
            )
        for who, raw in sorted(headers.items()):
            await conn.execute(
                "INSERT INTO artifact_headers (artifact_id, principal_id, header, created_at_ms)"
                " VALUES ($1, $2, $3, $4)",
                artifact_id,
                wanted[who],
                raw,
                now_ms,
            )
        if target.finish is not None:
            await target.finish(conn)
        await audit.append(
            conn,
            ctx,
            action="artifact.create",
            resource={"type": "artifact", "id": artifact_id},
            details={
                "name": name,
                "kind": kind,
                "files": len(files),
                "bytes": total,
                "recipients": sorted(headers),
            }
            | target.details,
        )
        artifact = await find_artifact(conn, artifact_id)
        assert artifact is not None
        return artifact, await artifact_files(conn, artifact_id)


#: Storage calls one request makes at once for an artifact's files (starting their multipart
#: uploads, assembling them): an artifact of 1,000 small files otherwise waits on thousands of
#: round trips one after another. Storage's own pool of threads (8) bounds it too.
STORAGE_CALLS_AT_ONCE = 8

_T = TypeVar("_T")


async def _each(items: Sequence[_T], work: Callable[[_T], Awaitable[None]]) -> None:
    """`work(item)` for every item, STORAGE_CALLS_AT_ONCE at a time. Every one runs to its end;
    then the first failure in the items' order is raised, as one at a time would have."""
    slots = asyncio.Semaphore(STORAGE_CALLS_AT_ONCE)

    async def one(item: _T) -> None:
        async with slots:
            await work(item)

    for outcome in await asyncio.gather(*(one(i) for i in items), return_exceptions=True):
        if isinstance(outcome, BaseException):
            raise outcome


#: How long after its expiry storage may still honour a presigned URL: storage checks the expiry
#: against its own clock, and S3 tolerates 15 minutes of skew in a request's time.
STORAGE_CLOCK_SKEW_S = 15 * 60


def _one_put(f: ArtifactFile) -> bool:
    """Is `f` sent as one PUT of its object? Files of one part are, unless a multipart upload was
    started for one already (by a replica of a version before single PUTs: it is finished as such)."""
    return f.part_count == 1 and f.upload_id is None


async def _ensure_upload(db: Database, storage: Storage, artifact_id: str, f: ArtifactFile) -> str:
    """The file's multipart upload, created on first need. Two racing requests keep one."""
    if f.upload_id is not None:
        return f.upload_id
    upload_id = await storage.create_multipart(f.object_key)
    async with db.transaction() as conn:
        won = await conn.execute(
            "UPDATE artifact_files SET upload_id = $1"
            " WHERE artifact_id = $2 AND idx = $3 AND upload_id IS NULL",
            upload_id,
            artifact_id,
            f.idx,
        )
        current = await conn.fetchval(
            "SELECT upload_id FROM artifact_files WHERE artifact_id = $1 AND idx = $2", artifact_id, f.idx
        )
    if won != 1:
        await storage.abort_multipart(f.object_key, upload_id)
    return str(current)


async def issue_part_urls(
    db: Database,
    storage: Storage,
    audit: AuditLog,
    ctx: Context,
    principal: Principal,
    artifact_id: str,
    requests: Sequence[tuple[int, int, bytes]],
    *,
    limits: Limits,
    ttl_s: int,
    now_ms: int,
) -> list[PartURL]:
    """Record each (file, part number, SHA-256) and answer with URLs bound to size and digest.

    A part's digest is fixed by the first request that names it (the ciphertext is a function of
    the plaintext, the file key and the nonce, all fixed at creation); naming another is refused.
    A file of one part gets a PUT of its object, and records until when that URL may work.
    """
    if not requests:
        raise ValidationError("ask for at least one part")
    if len(requests) > limits.max_part_urls:
        raise ValidationError(f"ask for at most {limits.max_part_urls} part URLs at a time")
    if len({(f, n) for f, n, _ in requests}) != len(requests):
        raise ValidationError("the same part is asked for twice in one request")
    async with db.transaction() as conn:
        artifact = await visible_artifact(conn, principal, artifact_id)
        require_uploader(principal, artifact)
        # Indices no artifact can have are left out of the query (and refused below, by name).
        named = sorted({f for f, _, _ in requests if 0 <= f < limits.max_files})
        files = await files_named(conn, artifact_id, named) if named else {}
        recorded = await _recorded(
            conn,
            artifact_id,
            [(f, n) for f, n, _ in requests if f in files and 1 <= n <= files[f].part_count],
        )
        sizes: dict[tuple[int, int], int] = {}
        new: list[tuple[int, int, int, bytes]] = []
        for file_idx, number, digest in requests:
            f = files.get(file_idx)
            if f is None:
                raise ValidationError(f"the artifact has no file {file_idx}")
            if not 1 <= number <= f.part_count:
                raise ValidationError(f"{f.path!r} has parts 1 to {f.part_count}, not {number}")
            size = part_range(f.plaintext_size, artifact.part_size, number).size
            sizes[(file_idx, number)] = size
            known = recorded.get((file_idx, number))
            if known is None:
                new.append((file_idx, number, size, digest))
            elif known != digest:
                raise Conflict(
                    f"{f.path!r}: part {number} was started with other content; the local file changed"
                    " since this upload began (abort it and upload again)",
                    code="part-digest-changed",
                    path=f.path,
                    part=number,
                )
        for file_idx, number, size, digest in new:
            await conn.execute(
                "INSERT INTO artifact_parts (artifact_id, file_idx, number, size, sha256)"
                " VALUES ($1, $2, $3, $4, $5)",
                artifact_id,
                file_idx,
                number,
                size,
                digest,
            )
        one_put = sorted({i for i, _, _ in requests if _one_put(files[i])})
        if one_put:
            # Never earlier than a URL issued before (by a replica whose clock runs ahead).
            await conn.execute(
                "UPDATE artifact_files SET put_until_ms = CASE WHEN put_until_ms > $1 THEN put_until_ms"  # noqa: S608 - placeholders only
                f" ELSE $1 END WHERE artifact_id = $2 AND idx IN ({placeholders(3, len(one_put))})",
                now_ms + (ttl_s + STORAGE_CLOCK_SKEW_S) * 1000,
                artifact_id,
                *one_put,
            )
        if new:
            await audit.append(
                conn,
                ctx,
                action="artifact.parts",
                resource={"type": "artifact", "id": artifact_id},
                details={"recorded": len(new), "requested": len(requests)},
            )
    uploads: dict[int, str] = {}

    async def ensure(file_idx: int) -> None:
        uploads[file_idx] = await _ensure_upload(db, storage, artifact_id, files[file_idx])

    await _each(sorted({i for i, _, _ in requests if not _one_put(files[i])}), ensure)
    out = []
    for file_idx, number, digest in requests:
        f, size = files[file_idx], sizes[(file_idx, number)]
        checksum = base64.b64encode(digest).decode("ascii")
        if file_idx in uploads:
            request = storage.presign_upload_part(
                f.object_key,
                uploads[file_idx],
                number,
                ttl_s=ttl_s,
                content_length=size,
                checksum_sha256=checksum,
            )
        else:
            request = storage.presign_put(
                f.object_key, ttl_s=ttl_s, content_length=size, checksum_sha256=checksum
            )
        out.append(PartURL(file=file_idx, number=number, size=size, request=request))
    return out


async def _assembled(storage: Storage, f: ArtifactFile) -> bool:
    """Does storage hold `f`'s object, assembled, at its full size?"""
    info = await storage.head(f.object_key)
    return info is not None and info.size == f.ciphertext_size


async def _assemble(storage: Storage, artifact: Artifact, f: ArtifactFile, digests: dict[int, bytes]) -> None:
    """Complete one file's multipart upload after checking what storage holds; or check the object
    a single PUT stored."""
    if _one_put(f):
        await _check_put(storage, f, digests)
        return
    ranges = part_ranges(f.plaintext_size, artifact.part_size)
    if f.upload_id is None:
        raise Conflict(f"{f.path!r}: no part has been uploaded", code="parts-missing")
    try:
        stored = await storage.list_parts(f.object_key, f.upload_id)
    except NotFound:
        # Already assembled by an earlier completion that failed later on: the object stands.
        if await _assembled(storage, f):
            return
        raise Conflict(f"{f.path!r}: the upload is gone from storage", code="upload-gone") from None
    parts = check_stored_parts(f, stored, ranges)
    with_digests = [
        Part(
            number=p.number,
            size=p.size,
            etag=p.etag,
            checksum_sha256=base64.b64encode(digests[p.number]).decode(),
        )
        for p in parts
    ]
    try:
        await storage.complete_multipart(f.object_key, f.upload_id, with_digests)
    except NotFound:
        # A racing completion assembled it between our listing and our request, and this store
        # forgets a completed upload (S3 proper may answer NoSuchUpload; SeaweedFS repeats the
        # completion): the parts are bound to their digests, so the object stands as it would.
        if await _assembled(storage, f):
            return
        raise Conflict(f"{f.path!r}: the upload is gone from storage", code="upload-gone") from None
    except Conflict as exc:
        raise Conflict(
            f"{f.path!r}: storage refused to assemble the parts ({exc.message}): a stored part does not"
            " match the digest its URL was issued for",
            code="part-digest-mismatch",
        ) from exc
    info = await storage.head(f.object_key)
    if info is None or info.size != f.ciphertext_size:
        raise Conflict(f"{f.path!r}: the assembled object has the wrong size", code="part-size-mismatch")


async def _check_put(storage: Storage, f: ArtifactFile, digests: dict[int, bytes]) -> None:
    """Does storage hold the object `f`'s single PUT was bound to? Raise Conflict if not."""
    info = await storage.head(f.object_key, checksum=True)
    if info is None:
        raise Conflict(f"{f.path!r}: part(s) 1 not uploaded yet", code="parts-missing")
    if info.size != f.ciphertext_size:
        raise Conflict(
            f"{f.path!r}: stored part 1 is {info.size} bytes, not {f.ciphertext_size}",
            code="part-size-mismatch",
        )
    # Its URL let storage take no other bytes; a store that reports the checksum confirms it.
    if info.checksum_sha256 is not None and info.checksum_sha256 != base64.b64encode(digests[1]).decode():
        raise Conflict(
            f"{f.path!r}: the stored object does not match the digest its URL was issued for",
            code="part-digest-mismatch",
        )


#: One lock per (database, artifact) being completed in this process; gone once unused.
_completing: weakref.WeakValueDictionary[tuple[int, str], asyncio.Lock] = weakref.WeakValueDictionary()


@contextlib.asynccontextmanager
async def _one_completion_at_a_time(db: Database, artifact_id: str) -> AsyncIterator[None]:
    key = (id(db), artifact_id)
    lock = _completing.get(key)
    if lock is None:
        lock = _completing[key] = asyncio.Lock()
    async with lock:  # the local `lock` keeps the entry alive while it is held
        yield


def _completed_meanwhile() -> Conflict:
    return Conflict("the upload was completed or aborted meanwhile", code="artifact-not-uploading")


async def complete(
    db: Database,
    storage: Storage,
    audit: AuditLog,
    ctx: Context,
    principal: Principal,
    artifact_id: str,
    *,
    manifest_json: Any,
    signature: bytes,
    now_ms: int,
) -> Artifact:
    """Verify the signed manifest against the records and storage, assemble, mark complete.

    Completions of one artifact run one at a time in this process, so the second reads the
    status the first committed and is refused with `artifact-complete` before storage is touched
    again. Across replicas they may overlap: assembly is repeatable (parts are bound to their
    digests), the final UPDATE is guarded by status, and a loser whose assembly stumbled over
    the winner's is told that the upload was completed meanwhile."""
    async with _one_completion_at_a_time(db, artifact_id):
        async with db.read() as conn:
            artifact = await visible_artifact(conn, principal, artifact_id)
            require_uploader(principal, artifact)
            files = await artifact_files(conn, artifact_id)
            digests = await part_digests(conn, artifact_id)
        manifest = Manifest.from_json(manifest_json)
        manifest.verify(signature, principal.signing_public_key)
        check_manifest(manifest, artifact, principal, files, digests)
        try:
            await _each(files, lambda f: _assemble(storage, artifact, f, digests[f.idx]))
        except Conflict:
            # Another replica's completion may have assembled (and removed the upload) meanwhile.
            async with db.read() as conn:
                now = await find_artifact(conn, artifact_id)
            if now is not None and now.status != "uploading":
                raise _completed_meanwhile() from None
            raise
        canonical = manifest.canonical()
        async with db.transaction() as conn:
            done = await conn.execute(
                "UPDATE artifacts SET status = 'complete', finished_at_ms = $1, manifest = $2,"
                " manifest_signature = $3, manifest_sha256 = $4 WHERE id = $5 AND status = 'uploading'",
                now_ms,
                canonical,
                signature,
                manifest.digest(),
                artifact_id,
            )
            if done != 1:
                raise _completed_meanwhile()
            await conn.execute(
                "UPDATE artifact_files SET upload_id = NULL WHERE artifact_id = $1", artifact_id
            )
            await audit.append(
                conn,
                ctx,
                action="artifact.complete",
                resource={"type": "artifact", "id": artifact_id, "sha256": manifest.digest().hex()},
                details={"files": len(files), "bytes": artifact.plaintext_bytes},
            )
            final = await find_artifact(conn, artifact_id)
        assert final is not None
        return final


async def remove_from_storage(storage: Storage, files: Sequence[ArtifactFile]) -> None:
    """Delete every file's object (and any multipart upload still open); a missing one is fine."""
    for f in files:
        if f.upload_id is not None:
            with contextlib.suppress(NotFound):
                await storage.abort_multipart(f.object_key, f.upload_id)
        # A file assembled before the rest failed is an object already.
        await storage.delete(f.object_key)


async def abort(
    db: Database,
    storage: Storage,
    audit: AuditLog,
    ctx: Context,
    principal: Principal,
    artifact_id: str,
    now_ms: int,
) -> Artifact:
    """The uploader gives up: parts removed from storage, the artifact marked aborted."""
    async with db.read() as conn:
        artifact = await visible_artifact(conn, principal, artifact_id)
        require_uploader(principal, artifact)
    return await abort_artifact(db, storage, audit, ctx, artifact, now_ms, action="artifact.abort")


async def abort_artifact(
    db: Database,
    storage: Storage,
    audit: AuditLog,
    ctx: Context,
    artifact: Artifact,
    now_ms: int,
    *,
    action: str,
) -> Artifact:
    """End `artifact`'s upload for a caller that has decided it may (the uploader, the sweeper, the
    revoker of its upload link): mark it aborted with audit event `action`, then clear storage."""
    async with db.transaction() as conn:
        changed = await conn.execute(
            "UPDATE artifacts SET status = 'aborted', finished_at_ms = $1"
            " WHERE id = $2 AND status = 'uploading'",
            now_ms,
            artifact.id,
        )
        if changed != 1:
            raise Conflict("the upload was completed or aborted meanwhile", code="artifact-not-uploading")
        files = await artifact_files(conn, artifact.id)
        await audit.append(
            conn,
            ctx,
            action=action,
            resource={"type": "artifact", "id": artifact.id},
            details={"files": len(files), "age_ms": now_ms - artifact.created_at_ms},
        )
    # After the commit: a failure here leaves parts that the store's own lifecycle or a later
    # sweep removes, never an artifact that claims to be live without its parts.
    try:
        await remove_from_storage(storage, files)
    except ExchangeError as exc:
        log.warning("artifact %s aborted, but removing its parts failed: %s", artifact.id, exc.code)
    async with db.read() as conn:
        final = await find_artifact(conn, artifact.id)
    assert final is not None
    return final


async def sweep_abandoned(
    db: Database, storage: Storage, audit: AuditLog, *, now_ms: int, abandon_after_s: int, limit: int = 100
) -> list[str]:
    """Abort uploads started more than `abandon_after_s` ago; return their ids."""
    cutoff = now_ms - abandon_after_s * 1000
    rows = await db.fetchall(
        SELECT_ARTIFACT
        + " WHERE a.status = 'uploading' AND a.created_at_ms <= $1 ORDER BY a.created_at_ms LIMIT $2",
        cutoff,
        limit,
    )
    aborted = []
    for row in rows:
        artifact = Artifact.from_row(row)
        try:
            await abort_artifact(
                db, storage, audit, Context(actor=SYSTEM), artifact, now_ms, action="artifact.abandon"
            )
        except Conflict:
            continue  # completed or aborted meanwhile
        aborted.append(artifact.id)
    return aborted


async def sweep_returned(db: Database, storage: Storage, *, now_ms: int, limit: int = 100) -> int:
    """Delete again the objects of aborted or deleted artifacts that a PUT URL issued before the
    end could still have put back, once no such URL works any more; the number deleted."""
    rows = await db.fetchall(
        "SELECT f.artifact_id, f.idx, f.object_key, f.put_until_ms,"
        " (a.status = 'aborted' OR a.deleted_at_ms IS NOT NULL) AS gone"
        " FROM artifact_files f JOIN artifacts a ON a.id = f.artifact_id"
        " WHERE f.put_until_ms IS NOT NULL AND f.put_until_ms <= $1 ORDER BY f.put_until_ms LIMIT $2",
        now_ms,
        limit,
    )
    deleted = 0
    for row in rows:
        # An artifact still uploading or complete keeps its object; its URLs are simply over.
        if row["gone"]:
            await storage.delete(row["object_key"])
            deleted += 1
        # Guarded: a URL issued meanwhile (still uploading) keeps its own, later time.
        await db.execute(
            "UPDATE artifact_files SET put_until_ms = NULL WHERE artifact_id = $1 AND idx = $2"
            " AND put_until_ms = $3",
            row["artifact_id"],
            row["idx"],
            row["put_until_ms"],
        )
    return deleted
