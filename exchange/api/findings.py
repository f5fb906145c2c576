"""Handlers for findings: submission, listing, the lifecycle, and passing access on.

A finding's body and attachments are uploaded first as artifacts (`POST /v1/artifacts` with
`finding: {on, part}`); these endpoints carry only metadata, references and encrypted notes.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..errors import ValidationError
from ..services import findings as svc
from ..settings import Settings
from .keys import AUDIT, CLOCK, DB, SETTINGS
from .routing import BODY, CTX, PRINCIPAL, Route, page_limit, path_param, query_param, time_cursor, time_page
from .schemas import INT, STR, Schema, name_schema, obj
from .validation import b64decode_field

__all__ = ["ROUTES", "schemas"]


def _detail(finding: svc.Finding, moves: list[svc.Move]) -> dict[str, Any]:
    return finding.to_json() | {"moves": [m.to_json() for m in moves]}


async def finding_recipients(request: web.Request) -> web.Response:
    app = request.app
    found = await svc.recipients(
        app[DB],
        request[PRINCIPAL],
        request.match_info["id"],
        clearinghouse=app[SETTINGS].finding_clearinghouse,
        now_ms=app[CLOCK](),
    )
    items = [{"name": name, "age_recipient": r, "why": why} for name, (r, why) in sorted(found.items())]
    return web.json_response({"recipients": items})


async def submit_finding(request: web.Request) -> web.Response:
    app, body = request.app, request[BODY]
    finding = await svc.submit(
        app[DB],
        app[AUDIT],
        request[CTX],
        request[PRINCIPAL],
        artifact_id=body["artifact"],
        body_id=body["body"],
        attachments_id=body.get("attachments"),
        title=body["title"],
        severity=body["severity"],
        category=body.get("category", "other"),
        now_ms=app[CLOCK](),
    )
    return web.json_response(finding.to_json(), status=201)


async def list_findings(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    q = request.query
    limit = page_limit(request, settings.page_size_default, settings.page_size_max)
    for name, allowed in (("status", svc.STATUSES), ("severity", svc.SEVERITIES)):
        if q.get(name) is not None and q[name] not in allowed:
            raise ValidationError(
                f"query parameter {name!r} must be one of: {', '.join(allowed)}", field=name
            )
    items = await svc.list_findings(
        request.app[DB],
        request[PRINCIPAL],
        artifact_id=q.get("artifact") or None,
        status=q.get("status"),
        severity=q.get("severity"),
        limit=limit + 1,
        after=time_cursor(request),
    )
    page, cursor = time_page(items, limit, lambda f: (f.created_at_ms, f.id))
    return web.json_response({"items": [f.to_json() for f in page], "next_cursor": cursor})


async def get_finding(request: web.Request) -> web.Response:
    finding, moves = await svc.get(request.app[DB], request[PRINCIPAL], request.match_info["id"])
    return web.json_response(_detail(finding, moves))


async def move_finding(request: web.Request) -> web.Response:
    app, body = request.app, request[BODY]
    note = body.get("note")
    finding, moves = await svc.move(
        app[DB],
        app[AUDIT],
        request[CTX],
        request[PRINCIPAL],
        request.match_info["id"],
        to=body["to"],
        note=None if note is None else b64decode_field(note, "note"),
        note_max_bytes=app[SETTINGS].finding_note_max_bytes,
        now_ms=app[CLOCK](),
    )
    return web.json_response(_detail(finding, moves))


async def share_finding(request: web.Request) -> web.Response:
    app, body = request.app, request[BODY]
    finding = await svc.share(
        app[DB],
        app[AUDIT],
        request[CTX],
        request[PRINCIPAL],
        request.match_info["id"],
        grantee_name=body["principal"],
        headers={part: b64decode_field(h, f"headers.{part}") for part, h in body["headers"].items()},
        now_ms=app[CLOCK](),
    )
    return web.json_response(finding.to_json())


_ID = (path_param("id", "finding id"),)

ROUTES = [
    Route(
        "GET",
        "/v1/artifacts/{id}/finding-recipients",
        finding_recipients,
        "finding.recipients",
        "Whom a finding on this artifact is encrypted to, besides its reporter",
        "findings",
        response="FindingRecipients",
        parameters=(path_param("id", "artifact id"),),
        errors=(403, 409),
    ),
    Route(
        "POST",
        "/v1/findings",
        submit_finding,
        "finding.submit",
        "Submit a finding whose encrypted body (and attachments) the reporter uploaded",
        "findings",
        body="FindingSubmit",
        response="Finding",
        status=201,
        errors=(403, 409),
    ),
    Route(
        "GET",
        "/v1/findings",
        list_findings,
        "finding.list",
        "Findings the caller may see, newest first",
        "findings",
        response="FindingList",
        parameters=(
            query_param("artifact", "only findings on this artifact", {"type": "string"}),
            query_param("status", "only this status", {"type": "string", "enum": list(svc.STATUSES)}),
            query_param("severity", "only this severity", {"type": "string", "enum": list(svc.SEVERITIES)}),
            query_param("limit", "page size", {"type": "integer", "minimum": 1}),
            query_param("cursor", "next_cursor of the previous page", {"type": "string"}),
        ),
    ),
    Route(
        "GET",
        "/v1/findings/{id}",
        get_finding,
        "finding.get",
        "One finding: its metadata and every move of its lifecycle (notes encrypted)",
        "findings",
        response="FindingDetail",
        parameters=_ID,
        errors=(404,),
    ),
    Route(
        "POST",
        "/v1/findings/{id}/moves",
        move_finding,
        "finding.move",
        "Move a finding along its lifecycle, with an optional encrypted note",
        "findings",
        body="FindingMove",
        response="FindingDetail",
        parameters=_ID,
        errors=(404, 409, 413),
    ),
    Route(
        "POST",
        "/v1/findings/{id}/share",
        share_finding,
        "finding.share",
        "Give a developer of the owning organisation the finding's keys, wrapped by the caller",
        "findings",
        body="FindingShare",
        response="Finding",
        parameters=_ID,
        errors=(403, 404, 409),
    ),
]


def schemas(settings: Settings) -> dict[str, Schema]:
    opt_str = {"type": ["string", "null"]}
    header = {"type": "string", "minLength": 1, "maxLength": 4096}
    props: dict[str, Schema] = {
        "id": STR,
        "artifact": STR,
        "artifact_name": STR,
        "org": STR,
        "reporter": STR,
        "reporter_org": STR,
        "body": STR,
        "attachments": opt_str,
        "title": STR,
        "severity": {"type": "string", "enum": list(svc.SEVERITIES)},
        "category": STR,
        "status": {"type": "string", "enum": list(svc.STATUSES)},
        "created_at_ms": INT,
        "updated_at_ms": INT,
    }
    finding = obj(props, list(props))
    move_props: dict[str, Schema] = {
        "seq": INT,
        "from": opt_str,
        "to": STR,
        "by": STR,
        "at_ms": INT,
        "note": opt_str,
    }
    # base64 of at most finding_note_max_bytes bytes
    note_chars = 4 * ((settings.finding_note_max_bytes + 2) // 3)
    return {
        "FindingRecipients": obj(
            {
                "recipients": {
                    "type": "array",
                    "items": obj(
                        {"name": STR, "age_recipient": STR, "why": STR}, ["name", "age_recipient", "why"]
                    ),
                }
            },
            ["recipients"],
        ),
        "FindingSubmit": obj(
            {
                "artifact": {"type": "string", "minLength": 1, "maxLength": 64},
                "body": {"type": "string", "minLength": 1, "maxLength": 64},
                "attachments": {"type": "string", "minLength": 1, "maxLength": 64},
                "title": {"type": "string", "minLength": 1, "maxLength": 200},
                "severity": {"type": "string", "enum": list(svc.SEVERITIES)},
                "category": {"type": "string", "minLength": 1, "maxLength": 100},
            },
            ["artifact", "body", "title", "severity"],
        ),
        "Finding": finding,
        "FindingList": obj(
            {"items": {"type": "array", "items": finding}, "next_cursor": opt_str}, ["items", "next_cursor"]
        ),
        "FindingDetail": obj(
            props | {"moves": {"type": "array", "items": obj(move_props, list(move_props))}},
            [*props, "moves"],
        ),
        "FindingMove": obj(
            {
                "to": {"type": "string", "enum": list(svc.STATUSES)},
                "note": {"type": "string", "minLength": 1, "maxLength": note_chars},
            },
            ["to"],
        ),
        "FindingShare": obj(
            {
                "principal": name_schema(settings),
                "headers": obj({"body": header, "attachments": header}, ["body"]),
            },
            ["principal", "headers"],
        ),
    }
