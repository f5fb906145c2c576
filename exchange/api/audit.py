"""Handlers for auditors: the log's key, checkpoints, proofs, entries and filtered queries.

Everything but the verifier key needs the auditor or admin role. Entries (exports) and
filtered queries are themselves recorded as `audit.export` and `audit.query` events; reads of
checkpoints and proofs are not, since they reveal nothing about events and verifiers fetch them
all the time. A filtered query can show what matched, with inclusion proofs, but never that
nothing else did: only a full-range export proves completeness.

Before the app serves anything, the publisher checks the whole stored log
(`services.auditcheck`); a damaged log does not stop the service from starting, it makes it
fail closed: writes answer 503 `audit-log-damaged`, `/readyz` names it, no checkpoint is signed.
A mismatch a read finds (a row whose column contradicts its leaf, a missing tree node) does the
same, and that read answers 503 too instead of serving the row.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import re
from collections.abc import Iterator

from aiohttp import web

from ..errors import AuditLogDamaged, NotFound, ValidationError
from ..format.note import Signer
from ..services import auditlog as svc
from ..services import auditreads as reads
from ..services.principals import require_role
from ..settings import Settings
from .keys import AUDIT, CLOCK, DB, SETTINGS
from .routing import CTX, PRINCIPAL, Route, path_param, query_param
from .schemas import INT, STR, Schema, obj

__all__ = ["PUBLISHER", "ROUTES", "SIGNER", "fail_closed_on_damage", "schemas", "start_publisher"]

log = logging.getLogger("exchange.api")

SIGNER = web.AppKey("log_signer", Signer)
PUBLISHER = web.AppKey("log_publisher", svc.Publisher)
_AUDITOR_ROLES = reads.AUDITOR_ROLES
_OUTCOMES = ("allowed", "denied", "error")
#: "<checkpoint size>.<idx of the last row returned>": every page stays pinned to one checkpoint.
_CURSOR = re.compile(r"([0-9]{1,19})\.([0-9]{1,19})")
#: Sizes, indices and times are BIGINT columns.
_MAX_INT = 2**63 - 1


async def start_publisher(app: web.Application, signer: Signer) -> svc.Publisher:
    """The checkpoint publisher, after the log's start check (api/lifetime.py runs it). Every
    replica has one; it signs only while this replica holds the signer lease, which its task
    (`Publisher.run_forever`) takes at once if no other replica holds it."""
    settings = app[SETTINGS]
    app[SIGNER] = signer
    log.info("audit log verifier key: %s", signer.verifier_key())
    publisher = app[PUBLISHER] = svc.Publisher(app[DB], app[AUDIT], signer, settings, app[CLOCK])
    # A damaged log is no reason not to start: the service runs failed closed and says why.
    with contextlib.suppress(AuditLogDamaged):
        await publisher.check_at_start()
    return publisher


@contextlib.contextmanager
def fail_closed_on_damage(app: web.Application) -> Iterator[None]:
    """What a read finds wrong with the stored log stops this process's appends, as the checks do."""
    try:
        yield
    except AuditLogDamaged as exc:
        app[AUDIT].fail_closed(exc)
        raise


def _int(request: web.Request, name: str, default: int | None = None) -> int:
    raw = request.query.get(name)
    if raw is None:
        if default is None:
            raise ValidationError(f"query parameter '{name}' is required", field=name)
        return default
    if not raw.isascii() or not raw.isdigit() or len(raw) > 19 or int(raw) > _MAX_INT:
        raise ValidationError(f"query parameter '{name}' must be an integer from 0 to 2^63 - 1", field=name)
    return int(raw)


def _b64(hashes: list[bytes]) -> list[str]:
    return [base64.b64encode(h).decode("ascii") for h in hashes]


def _checkpoint_json(size: int, note: bytes) -> dict[str, object]:
    return {"size": size, "note": note.decode("utf-8")}


async def vkey(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    return web.json_response(
        {
            "origin": settings.log_origin,
            "vkey": request.app[SIGNER].verifier_key(),
            "witness_vkeys": list(settings.witness_vkeys),
            "witness_quorum": settings.witness_quorum,
        }
    )


async def get_checkpoint(request: web.Request) -> web.Response:
    require_role(request[PRINCIPAL], *_AUDITOR_ROLES)
    latest = await svc.latest_checkpoint(request.app[DB])
    if latest is None:
        raise NotFound("no checkpoint has been published yet")
    return web.json_response(_checkpoint_json(*latest))


async def get_checkpoint_at(request: web.Request) -> web.Response:
    require_role(request[PRINCIPAL], *_AUDITOR_ROLES)
    raw = request.match_info["size"]
    if not raw.isascii() or not raw.isdigit() or len(raw) > 19 or int(raw) > _MAX_INT:
        raise ValidationError("the tree size must be an integer from 0 to 2^63 - 1", field="size")
    note = await svc.checkpoint_at(request.app[DB], int(raw))
    if note is None:
        raise NotFound(f"no checkpoint was published at size {int(raw)}")
    return web.json_response(_checkpoint_json(int(raw), note))


async def inclusion_proof(request: web.Request) -> web.Response:
    index, size = _int(request, "index"), _int(request, "size")
    with fail_closed_on_damage(request.app):
        proof = await reads.inclusion_proof(request.app[DB], request[PRINCIPAL], index=index, size=size)
    return web.json_response({"index": index, "size": size, "proof": _b64(proof)})


async def consistency_proof(request: web.Request) -> web.Response:
    old, new = _int(request, "old"), _int(request, "new")
    with fail_closed_on_damage(request.app):
        proof = await reads.consistency_proof(request.app[DB], request[PRINCIPAL], old=old, new=new)
    return web.json_response({"old": old, "new": new, "proof": _b64(proof)})


async def entries(request: web.Request) -> web.StreamResponse:
    """The exact leaves of [start, end) as JSON Lines: one canonical event per line."""
    app = request.app
    start, end = _int(request, "start"), _int(request, "end")
    await reads.begin_export(
        app[DB],
        app[AUDIT],
        request[CTX],
        request[PRINCIPAL],
        start=start,
        end=end,
        limit=app[SETTINGS].audit_export_max_entries,
    )
    response = web.StreamResponse(headers={"Content-Type": "application/jsonl"})
    response.headers["X-Request-Id"] = request[CTX].request_id or ""
    await response.prepare(request)
    chunk: list[bytes] = []
    async for leaf in reads.export_entries(app[DB], app[AUDIT], start=start, end=end):
        chunk.append(leaf + b"\n")
        if len(chunk) >= 1000:
            await response.write(b"".join(chunk))
            chunk = []
    if chunk:
        await response.write(b"".join(chunk))
    await response.write_eof()
    return response


def _filter(request: web.Request) -> svc.Filter:
    q = request.query
    outcome = q.get("outcome")
    if outcome is not None and outcome not in _OUTCOMES:
        raise ValidationError(
            f"query parameter 'outcome' must be one of: {', '.join(_OUTCOMES)}", field="outcome"
        )
    resource_type = resource_id = None
    if q.get("resource"):
        resource_type, _, rid = q["resource"].partition(":")
        resource_id = rid or None
    return svc.Filter(
        actor_id=q.get("actor") or None,
        org=q.get("org") or None,
        action=q.get("action") or None,
        resource_type=resource_type or None,
        resource_id=resource_id,
        outcome=outcome,
        since_ms=_int(request, "since") if "since" in q else None,
        until_ms=_int(request, "until") if "until" in q else None,
    )


async def query_events(request: web.Request) -> web.Response:
    """One page of matching events, pinned to a checkpoint size; optionally with inclusion proofs."""
    app = request.app
    settings = app[SETTINGS]
    limit = _int(request, "limit", settings.page_size_default)
    if not 1 <= limit <= settings.page_size_max:
        raise ValidationError(
            f"query parameter 'limit' must be between 1 and {settings.page_size_max}", field="limit"
        )
    where = _filter(request)
    after, size = -1, None
    if "cursor" in request.query:
        cursor = _CURSOR.fullmatch(request.query["cursor"])
        if cursor is None or max(int(cursor.group(1)), int(cursor.group(2))) > _MAX_INT:
            raise ValidationError("the cursor is not one this service issued", field="cursor")
        size, after = int(cursor.group(1)), int(cursor.group(2))
    elif "size" in request.query:
        size = _int(request, "size")
    with_proofs = request.query.get("proofs") in ("1", "true")
    with fail_closed_on_damage(app):
        page = await reads.query_page(
            app[DB],
            app[AUDIT],
            request[CTX],
            request[PRINCIPAL],
            where,
            size=size,
            after=after,
            limit=limit,
            with_proofs=with_proofs,
        )
    items = []
    for idx, leaf in page.rows:
        item: dict[str, object] = {"idx": idx, "leaf": leaf.decode("utf-8")}
        if with_proofs:
            item["proof"] = _b64(page.proofs[idx])
        items.append(item)
    return web.json_response(
        {
            "checkpoint": _checkpoint_json(page.size, page.note),
            "items": items,
            "next_cursor": page.next_cursor,
        }
    )


_SIZE = {"type": "integer", "minimum": 0}
ROUTES = [
    Route(
        "GET",
        "/v1/audit/vkey",
        vkey,
        "audit.vkey",
        "The log's checkpoint verifier key (signed-note vkey) and configured witnesses; no auth",
        "audit",
        auth="none",
        response="AuditVkey",
    ),
    Route(
        "GET",
        "/v1/audit/checkpoint",
        get_checkpoint,
        "audit.checkpoint",
        "The latest published checkpoint, with witness cosignatures (auditor, admin)",
        "audit",
        response="AuditCheckpoint",
        errors=(403, 404),
    ),
    Route(
        "GET",
        "/v1/audit/checkpoints/{size}",
        get_checkpoint_at,
        "audit.checkpoint.get",
        "The checkpoint published at a tree size (auditor, admin)",
        "audit",
        response="AuditCheckpoint",
        parameters=(path_param("size", "tree size"),),
        errors=(403, 404),
    ),
    Route(
        "GET",
        "/v1/audit/proof/inclusion",
        inclusion_proof,
        "audit.proof.inclusion",
        "RFC 9162 inclusion proof of one event in the tree of a size (auditor, admin)",
        "audit",
        response="AuditInclusionProof",
        parameters=(
            query_param("index", "the event's idx", _SIZE),
            query_param("size", "tree size", _SIZE),
        ),
        errors=(403,),
    ),
    Route(
        "GET",
        "/v1/audit/proof/consistency",
        consistency_proof,
        "audit.proof.consistency",
        "RFC 9162 consistency proof between two tree sizes (auditor, admin)",
        "audit",
        response="AuditConsistencyProof",
        parameters=(query_param("old", "old tree size", _SIZE), query_param("new", "new tree size", _SIZE)),
        errors=(403,),
    ),
    Route(
        "GET",
        "/v1/audit/entries",
        entries,
        "audit.export",
        "The exact canonical leaves of events [start, end) as JSON Lines (auditor, admin; logged)",
        "audit",
        parameters=(
            query_param("start", "first idx", _SIZE),
            query_param("end", "idx after the last", _SIZE),
        ),
        errors=(403,),
    ),
    Route(
        "GET",
        "/v1/audit/events",
        query_events,
        "audit.query",
        "Filtered events pinned to a checkpoint; cannot prove completeness (auditor, admin; logged)",
        "audit",
        response="AuditEventPage",
        parameters=(
            query_param("actor", "principal id or name", STR),
            query_param("org", "actor's organisation", STR),
            query_param("action", "action, e.g. invite.create", STR),
            query_param("resource", "TYPE or TYPE:ID", STR),
            query_param("outcome", "allowed, denied or error", {"type": "string", "enum": list(_OUTCOMES)}),
            query_param("since", "from this time, ms since the epoch", _SIZE),
            query_param("until", "before this time, ms since the epoch", _SIZE),
            query_param("size", "checkpoint size to pin to (default: the latest)", _SIZE),
            query_param("proofs", "1: add an inclusion proof to every row", STR),
            query_param("limit", "page size", {"type": "integer", "minimum": 1}),
            query_param("cursor", "next_cursor of the previous page", STR),
        ),
        errors=(403, 404),
    ),
]


def schemas(settings: Settings) -> dict[str, Schema]:
    hashes = {"type": "array", "items": {"type": "string", "description": "SHA-256, base64"}}
    checkpoint = obj(
        {"size": INT, "note": {"type": "string", "description": "signed note: checkpoint and cosignatures"}},
        ["size", "note"],
    )
    return {
        "AuditVkey": obj(
            {
                "origin": STR,
                "vkey": STR,
                "witness_vkeys": {"type": "array", "items": STR},
                "witness_quorum": INT,
            },
            ["origin", "vkey", "witness_vkeys", "witness_quorum"],
        ),
        "AuditCheckpoint": checkpoint,
        "AuditInclusionProof": obj({"index": INT, "size": INT, "proof": hashes}, ["index", "size", "proof"]),
        "AuditConsistencyProof": obj({"old": INT, "new": INT, "proof": hashes}, ["old", "new", "proof"]),
        "AuditEventPage": obj(
            {
                "checkpoint": checkpoint,
                "items": {
                    "type": "array",
                    "items": obj(
                        {
                            "idx": INT,
                            "leaf": {"type": "string", "description": "the exact leaf"},
                            "proof": hashes,
                        },
                        ["idx", "leaf"],
                    ),
                },
                "next_cursor": {"type": ["string", "null"]},
            },
            ["checkpoint", "items", "next_cursor"],
        ),
    }
