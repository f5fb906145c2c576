"""Handlers for artifacts: start an upload, part URLs, resume, complete, abort, list, download.

Bytes never pass through here: uploads and downloads go to storage through presigned URLs. The
handlers parse, call `services.uploads` (the multipart lifecycle) or `services.artifacts` (the
catalogue), and serialise; what may happen is decided there.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

from aiohttp import web

from ..errors import DependencyError, ValidationError
from ..format.manifest import KINDS, MANIFEST_TYPE, MAX_PARTS, check_path
from ..services import artifacts as svc
from ..services import deletion, downloads, findings, records, uploadlinks, uploads
from ..settings import Settings
from .keys import AUDIT, CLOCK, DB, SETTINGS, STORAGE
from .routing import (
    BODY,
    CTX,
    PRINCIPAL,
    Route,
    page_limit,
    path_param,
    query_param,
    time_cursor,
    time_page,
)
from .schemas import INT, STR, Schema, name_schema, obj
from .validation import b64decode_field, b64encode

__all__ = ["ROUTES", "schemas", "sweep_forever", "sweep_once"]

log = logging.getLogger("exchange.api")

_STATUSES = ("uploading", "complete", "aborted", "deleted")


def _limits(settings: Settings) -> uploads.Limits:
    return uploads.Limits(
        min_part_bytes=settings.upload_min_part_bytes,
        max_files=settings.artifact_max_files,
        max_bytes=settings.artifact_max_bytes,
        max_part_urls=settings.upload_part_urls_max,
    )


def _detail(artifact: records.Artifact, files: list[records.ArtifactFile]) -> dict[str, Any]:
    data = artifact.to_json() | {"files": [f.to_json() for f in files]}
    signed = records.manifest_of(artifact)
    if signed is not None:
        manifest, signature = signed
        data["manifest"] = manifest.to_json()
        data["manifest_signature"] = b64encode(signature)
    return data


async def create_artifact(request: web.Request) -> web.Response:
    app, body = request.app, request[BODY]
    name = body["name"]
    if "/" in name:
        raise ValidationError("field 'name' must not contain '/'", field="name")
    check_path(name)
    files = [
        uploads.FileDeclaration(
            path=f["path"], size=f["size"], nonce=b64decode_field(f["nonce"], "files[].nonce")
        )
        for f in body["files"]
    ]
    headers = {h["principal"]: b64decode_field(h["header"], "headers[].header") for h in body["headers"]}
    if len(headers) != len(body["headers"]):
        raise ValidationError("two headers name the same principal")
    now = app[CLOCK]()
    claim = None
    if "upload_link" in body and "finding" in body:
        raise ValidationError("an upload goes through an upload link or to a finding, not both")
    if "upload_link" in body:
        token_hash = uploadlinks.parse_upload_token(body["upload_link"])
        claim = uploadlinks.claim(request[PRINCIPAL], token_hash, now)
    elif "finding" in body:
        settings = app[SETTINGS]
        claim = findings.claim(
            request[PRINCIPAL],
            body["finding"]["on"],
            body["finding"]["part"],
            clearinghouse=settings.finding_clearinghouse,
            body_max_bytes=settings.finding_body_max_bytes,
            now_ms=now,
        )
    artifact, created = await uploads.create(
        app[DB],
        app[AUDIT],
        request[CTX],
        request[PRINCIPAL],
        name=name,
        kind=body["kind"],
        files=files,
        headers=headers,
        limits=_limits(app[SETTINGS]),
        now_ms=now,
        claim=claim,
    )
    return web.json_response(_detail(artifact, created), status=201)


async def list_artifacts(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    q = request.query
    limit = page_limit(request, settings.page_size_default, settings.page_size_max)
    status = q.get("status")
    if status is not None and status not in _STATUSES:
        raise ValidationError(f"query parameter 'status' must be one of: {', '.join(_STATUSES)}")
    items = await svc.list_artifacts(
        request.app[DB],
        request[PRINCIPAL],
        status=status,
        limit=limit + 1,
        after=time_cursor(request),
        now_ms=request.app[CLOCK](),
    )
    page, cursor = time_page(items, limit, lambda a: (a.created_at_ms, a.id))
    return web.json_response({"items": [a.to_json() for a in page], "next_cursor": cursor})


async def get_artifact(request: web.Request) -> web.Response:
    app = request.app
    artifact, files = await svc.get(
        app[DB], request[PRINCIPAL], request.match_info["id"], now_ms=app[CLOCK]()
    )
    return web.json_response(_detail(artifact, files))


async def abort_upload(request: web.Request) -> web.Response:
    app = request.app
    artifact = await uploads.abort(
        app[DB],
        app[STORAGE],
        app[AUDIT],
        request[CTX],
        request[PRINCIPAL],
        request.match_info["id"],
        app[CLOCK](),
    )
    return web.json_response(artifact.to_json())


async def delete_artifact(request: web.Request) -> web.Response:
    app = request.app
    artifact = await deletion.delete_artifact(
        app[DB],
        app[STORAGE],
        app[AUDIT],
        request[CTX],
        request[PRINCIPAL],
        request.match_info["id"],
        reason=request[BODY].get("reason"),
        now_ms=app[CLOCK](),
    )
    return web.json_response(artifact.to_json())


async def part_urls(request: web.Request) -> web.Response:
    app = request.app
    settings = app[SETTINGS]
    wanted = []
    for p in request[BODY]["parts"]:
        digest = b64decode_field(p["sha256"], "parts[].sha256")
        if len(digest) != 32:
            raise ValidationError("field 'parts[].sha256' must be a 32-byte SHA-256", field="parts[].sha256")
        wanted.append((p["file"], p["number"], digest))
    now = app[CLOCK]()
    urls = await uploads.issue_part_urls(
        app[DB],
        app[STORAGE],
        app[AUDIT],
        request[CTX],
        request[PRINCIPAL],
        request.match_info["id"],
        wanted,
        limits=_limits(settings),
        ttl_s=settings.presign_ttl_s,
        now_ms=now,
    )
    return web.json_response(
        {
            "parts": [
                {
                    "file": u.file,
                    "number": u.number,
                    "size": u.size,
                    "method": u.request.method,
                    "url": u.request.url,
                    "headers": u.request.headers,
                }
                for u in urls
            ],
            "expires_at_ms": now + settings.presign_ttl_s * 1000,
        }
    )


async def upload_status(request: web.Request) -> web.Response:
    app = request.app
    artifact, files, digests, stored = await uploads.upload_status(
        app[DB], app[STORAGE], request[PRINCIPAL], request.match_info["id"]
    )
    return web.json_response(
        {
            "id": artifact.id,
            "status": artifact.status,
            "part_size": artifact.part_size,
            "files": [
                {
                    "index": f.idx,
                    "path": f.path,
                    "recorded": [
                        {"number": n, "sha256": b64encode(d)}
                        for n, d in sorted(digests.get(f.idx, {}).items())
                    ],
                    "stored": [{"number": p.number, "size": p.size} for p in stored.get(f.idx, [])],
                }
                for f in files
            ],
        }
    )


async def complete_upload(request: web.Request) -> web.Response:
    app, body = request.app, request[BODY]
    artifact = await uploads.complete(
        app[DB],
        app[STORAGE],
        app[AUDIT],
        request[CTX],
        request[PRINCIPAL],
        request.match_info["id"],
        manifest_json=body["manifest"],
        signature=b64decode_field(body["signature"], "signature"),
        now_ms=app[CLOCK](),
    )
    return web.json_response(artifact.to_json())


async def get_header(request: web.Request) -> web.Response:
    app = request.app
    artifact, header = await svc.get_header(
        app[DB], app[AUDIT], request[CTX], request[PRINCIPAL], request.match_info["id"], now_ms=app[CLOCK]()
    )
    return web.json_response({"artifact": artifact.id, "header": b64encode(header)})


async def download(request: web.Request) -> web.Response:
    app = request.app
    settings = app[SETTINGS]
    now = app[CLOCK]()
    artifact, files, digests, urls, session = await svc.download_urls(
        app[DB],
        app[STORAGE],
        app[AUDIT],
        request[CTX],
        request[PRINCIPAL],
        request.match_info["id"],
        ttl_s=settings.presign_ttl_s,
        now_ms=now,
        session=_session_param(request),
    )
    data = _detail(artifact, files)
    data["session"] = session
    for entry, f in zip(data["files"], files, strict=True):
        entry["url"] = urls[f.idx]
        entry["part_sha256"] = [b64encode(digests[f.idx][n]) for n in range(1, f.part_count + 1)]
    data["expires_at_ms"] = now + settings.presign_ttl_s * 1000
    data["expires_in_s"] = settings.presign_ttl_s
    return web.json_response(data)


def _session_param(request: web.Request) -> str | None:
    session = request.query.get("session")
    if session is not None and not _SESSION_ID.fullmatch(session):
        raise ValidationError("query parameter 'session' is not a session id", field="session")
    return session


_SESSION_ID = re.compile(r"ses_[0-9a-f]{20}")


async def download_receipt(request: web.Request) -> web.Response:
    app, body = request.app, request[BODY]
    recorded = await downloads.record_receipt(
        app[DB],
        app[AUDIT],
        request[CTX],
        request[PRINCIPAL],
        request.match_info["id"],
        session=body["session"],
        signature=b64decode_field(body["signature"], "signature"),
        now_ms=app[CLOCK](),
    )
    return web.json_response(recorded, status=201)


_ID = (path_param("id", "artifact id"),)

ROUTES = [
    Route(
        "POST",
        "/v1/artifacts",
        create_artifact,
        "artifact.create",
        "Start an upload: declare files, sizes and nonces, with one age header per recipient (developer)",
        "artifacts",
        body="ArtifactCreate",
        response="ArtifactDetail",
        status=201,
        errors=(403, 409),
    ),
    Route(
        "GET",
        "/v1/artifacts",
        list_artifacts,
        "artifact.list",
        "List the organisation's artifacts, newest first",
        "artifacts",
        response="ArtifactList",
        parameters=(
            query_param("status", "only this status", {"type": "string", "enum": list(_STATUSES)}),
            query_param("limit", "page size", {"type": "integer", "minimum": 1}),
            query_param("cursor", "next_cursor of the previous page", {"type": "string"}),
        ),
    ),
    Route(
        "GET",
        "/v1/artifacts/{id}",
        get_artifact,
        "artifact.get",
        "One artifact: its files and, once complete, the signed manifest",
        "artifacts",
        response="ArtifactDetail",
        parameters=_ID,
        errors=(404,),
    ),
    Route(
        "DELETE",
        "/v1/artifacts/{id}",
        abort_upload,
        "artifact.abort",
        "Abort an unfinished upload and remove its parts (the uploader)",
        "artifacts",
        response="Artifact",
        parameters=_ID,
        errors=(403, 404, 409),
    ),
    Route(
        "POST",
        "/v1/artifacts/{id}/delete",
        delete_artifact,
        "artifact.delete",
        "Delete a complete artifact: its stored objects removed, its records and events kept as a"
        " tombstone, its links dead (developers of its organisation, admins). Again, on one whose"
        " objects remain, finishes removing them",
        "artifacts",
        body="ArtifactDelete",
        response="Artifact",
        parameters=_ID,
        errors=(403, 404, 409),
    ),
    Route(
        "POST",
        "/v1/artifacts/{id}/parts",
        part_urls,
        "artifact.parts",
        "Presigned part URLs, each bound to the part's size and SHA-256 (the uploader)",
        "artifacts",
        body="PartURLRequest",
        response="PartURLs",
        parameters=_ID,
        errors=(403, 404, 409),
    ),
    Route(
        "GET",
        "/v1/artifacts/{id}/parts",
        upload_status,
        "artifact.upload_status",
        "Recorded part digests and the parts storage holds, to resume an upload (the uploader)",
        "artifacts",
        response="UploadStatus",
        parameters=_ID,
        errors=(403, 404, 409),
    ),
    Route(
        "POST",
        "/v1/artifacts/{id}/complete",
        complete_upload,
        "artifact.complete",
        "Complete an upload with the uploader's signed manifest",
        "artifacts",
        body="ArtifactComplete",
        response="Artifact",
        parameters=_ID,
        errors=(403, 404, 409),
    ),
    Route(
        "GET",
        "/v1/artifacts/{id}/header",
        get_header,
        "artifact.header",
        "The caller's own age header for the artifact (recipients)",
        "artifacts",
        response="ArtifactHeader",
        parameters=_ID,
        errors=(403, 404, 409),
    ),
    Route(
        "GET",
        "/v1/artifacts/{id}/download",
        download,
        "artifact.download",
        "Presigned GETs for the artifact's files, with their part digests (recipients), in a"
        " download session: opened (and counted against a grant that bounds its downloads), or,"
        " with `session`, renewed without counting",
        "artifacts",
        response="ArtifactDownload",
        parameters=(
            *_ID,
            query_param("session", "renew this download session's URLs (not counted)", {"type": "string"}),
        ),
        errors=(403, 404, 409),
    ),
    Route(
        "POST",
        "/v1/artifacts/{id}/receipt",
        download_receipt,
        "artifact.download.receipt",
        "The downloader's signed receipt of a download session by id (format.receipt, `via grant`)",
        "artifacts",
        body="DownloadReceipt",
        response="DownloadReceiptRecorded",
        parameters=_ID,
        status=201,
        errors=(403, 404, 409),
    ),
]


def schemas(settings: Settings) -> dict[str, Schema]:
    b64_32 = {"type": "string", "pattern": r"^[A-Za-z0-9+/]{43}=$", "x-pattern-hint": "32 bytes in base64"}
    b64_16 = {"type": "string", "pattern": r"^[A-Za-z0-9+/]{22}==$", "x-pattern-hint": "16 bytes in base64"}
    kind = {"type": "string", "enum": list(KINDS)}
    status = {"type": "string", "enum": list(_STATUSES)}
    count = {"type": "integer", "minimum": 0}
    artifact_props: dict[str, Schema] = {
        "id": STR,
        "org": STR,
        "name": STR,
        "kind": kind,
        "status": status,
        "created_by": STR,
        "created_at_ms": INT,
        "finished_at_ms": {"type": ["integer", "null"]},
        "part_size": INT,
        "file_count": INT,
        "size": {"type": "integer", "description": "plaintext bytes over all files"},
    }
    artifact_required = list(artifact_props)
    artifact_props["deleted"] = obj(
        {
            "at_ms": INT,
            "by": {"type": ["string", "null"]},
            "reason": {"type": ["string", "null"]},
            "storage_purged": {"type": "boolean", "description": "false while its objects still wait to go"},
        },
        ["at_ms", "by", "reason", "storage_purged"],
    )
    file_props: dict[str, Schema] = {
        "index": INT,
        "path": STR,
        "size": INT,
        "ciphertext_size": INT,
        "part_count": INT,
        "nonce": STR,
        "object": {"type": "string", "description": "storage key (the server's; names live in metadata)"},
    }
    file_schema = obj(file_props, list(file_props))
    detail_props = artifact_props | {
        "files": {"type": "array", "items": file_schema},
        "manifest": {"type": "object", "description": f"{MANIFEST_TYPE}, once complete"},
        "manifest_signature": {
            "type": "string",
            "description": "Ed25519 over the canonical manifest, base64",
        },
    }
    download_file = obj(
        file_props
        | {
            "url": {"type": "string", "description": "presigned GET; use Range requests"},
            "part_sha256": {"type": "array", "items": STR, "description": "each part's SHA-256, base64"},
        },
        [*file_props, "url", "part_sha256"],
    )
    return {
        "ArtifactDelete": obj(
            {
                "reason": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": 500,
                    "description": "why, for the log",
                }
            },
            [],
        ),
        "Artifact": obj(artifact_props, artifact_required),
        "ArtifactDetail": obj(detail_props, [*artifact_required, "files"]),
        "ArtifactList": obj(
            {
                "items": {"type": "array", "items": obj(artifact_props, artifact_required)},
                "next_cursor": {"type": ["string", "null"]},
            },
            ["items", "next_cursor"],
        ),
        "ArtifactDownload": obj(
            detail_props
            | {
                "files": {"type": "array", "items": download_file},
                "expires_at_ms": INT,
                "expires_in_s": {"type": "integer", "description": "URL lifetime; ask again before it ends"},
                "session": {
                    "type": "string",
                    "description": "the download session: renew with it, sign its receipt",
                },
            },
            [
                *artifact_required,
                "files",
                "manifest",
                "manifest_signature",
                "expires_at_ms",
                "expires_in_s",
                "session",
            ],
        ),
        "DownloadReceipt": obj(
            {
                "session": {"type": "string", "pattern": r"^ses_[0-9a-f]{20}$"},
                "signature": {
                    "type": "string",
                    "pattern": r"^[A-Za-z0-9+/]{86}==$",
                    "x-pattern-hint": "an Ed25519 signature in base64 (64 bytes)",
                },
            },
            ["session", "signature"],
        ),
        "DownloadReceiptRecorded": obj(
            {
                "artifact": STR,
                "received_at_ms": INT,
                "via": STR,
                "session": STR,
                "recipient": STR,
                "recipient_key_id": STR,
                "manifest_sha256": STR,
                "signature": STR,
            },
            ["artifact", "received_at_ms", "session", "recipient", "manifest_sha256", "signature"],
        ),
        "ArtifactHeader": obj(
            {"artifact": STR, "header": {"type": "string", "description": "age header, base64"}},
            ["artifact", "header"],
        ),
        "ArtifactCreate": obj(
            {
                "name": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": 255,
                    "description": "shown in listings and used as the download's file or directory name",
                },
                "kind": kind,
                "files": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": settings.artifact_max_files,
                    "items": obj(
                        {
                            "path": {"type": "string", "minLength": 1, "maxLength": 4096},
                            "size": {"type": "integer", "minimum": 0},
                            "nonce": b64_16,
                        },
                        ["path", "size", "nonce"],
                    ),
                },
                "headers": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 10_000,
                    "items": obj(
                        {
                            "principal": name_schema(settings),
                            "header": {"type": "string", "minLength": 1, "maxLength": 4096},
                        },
                        ["principal", "header"],
                    ),
                },
                "upload_link": {
                    "type": "string",
                    "maxLength": 64,
                    "description": "the token of an upload link (exu1_…): upload into its organisation",
                },
                "finding": obj(
                    {
                        "on": {"type": "string", "minLength": 1, "maxLength": 64},
                        "part": {"type": "string", "enum": list(findings.PARTS)},
                    },
                    ["on", "part"],
                ),
            },
            ["name", "kind", "files", "headers"],
        ),
        "PartURLRequest": obj(
            {
                "parts": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": settings.upload_part_urls_max,
                    "items": obj(
                        {
                            "file": count | {"maximum": settings.artifact_max_files - 1},
                            "number": {"type": "integer", "minimum": 1, "maximum": MAX_PARTS},
                            "sha256": b64_32,
                        },
                        ["file", "number", "sha256"],
                    ),
                }
            },
            ["parts"],
        ),
        "PartURLs": obj(
            {
                "parts": {
                    "type": "array",
                    "items": obj(
                        {
                            "file": INT,
                            "number": INT,
                            "size": INT,
                            "method": STR,
                            "url": STR,
                            "headers": {"type": "object", "additionalProperties": STR},
                        },
                        ["file", "number", "size", "method", "url", "headers"],
                    ),
                },
                "expires_at_ms": INT,
            },
            ["parts", "expires_at_ms"],
        ),
        "UploadStatus": obj(
            {
                "id": STR,
                "status": status,
                "part_size": INT,
                "files": {
                    "type": "array",
                    "items": obj(
                        {
                            "index": INT,
                            "path": STR,
                            "recorded": {
                                "type": "array",
                                "items": obj({"number": INT, "sha256": STR}, ["number", "sha256"]),
                            },
                            "stored": {
                                "type": "array",
                                "items": obj({"number": INT, "size": INT}, ["number", "size"]),
                            },
                        },
                        ["index", "path", "recorded", "stored"],
                    ),
                },
            },
            ["id", "status", "part_size", "files"],
        ),
        "ArtifactComplete": obj(
            {
                "manifest": {"type": "object", "description": f"{MANIFEST_TYPE}, see the manifest docs"},
                "signature": {
                    "type": "string",
                    "pattern": r"^[A-Za-z0-9+/]{86}==$",
                    "x-pattern-hint": "an Ed25519 signature in base64 (64 bytes)",
                },
            },
            ["manifest", "signature"],
        ),
    }


# -- the sweeper ----------------------------------------------------------------------------------


async def sweep_once(app: web.Application) -> list[str]:
    """Abort abandoned uploads, finish purging deleted artifacts, and delete again what a PUT URL
    issued before either could have put back; the ids of the artifacts aborted or purged."""
    settings = app[SETTINGS]
    aborted = await uploads.sweep_abandoned(
        app[DB],
        app[STORAGE],
        app[AUDIT],
        now_ms=app[CLOCK](),
        abandon_after_s=settings.upload_abandon_after_s,
    )
    purged = await deletion.purge_pending(app[DB], app[STORAGE], app[AUDIT], now_ms=app[CLOCK]())
    returned = await uploads.sweep_returned(app[DB], app[STORAGE], now_ms=app[CLOCK]())
    if returned:
        log.info(
            "deleted %d object(s) of aborted or deleted artifacts again, once their PUT URLs expired",
            returned,
        )
    return aborted + purged


async def sweep_forever(app: web.Application) -> None:
    """The background task that aborts uploads left unfinished longer than
    `upload_abandon_after_s` (api/lifetime.py runs it)."""
    interval = app[SETTINGS].upload_sweep_interval_s
    while True:
        await asyncio.sleep(interval)
        try:
            aborted = await sweep_once(app)
            if aborted:
                log.info("aborted %d abandoned upload(s)", len(aborted))
        except DependencyError as exc:
            log.warning("abandoned-upload sweep skipped: %s", exc.code)
