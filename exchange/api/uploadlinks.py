"""Handlers for upload links: made by a receiving organisation's developer, used by one uploader.

`GET /u/TOKEN` is signed by the link's uploader (an upload's manifest must be signed by a key the
service knows, so an upload link is never a bearer capability): it answers what the upload must
be — kind, maximum size, the recipients to encrypt to. Anyone else, and any token that is
unknown, expired, revoked or spent, gets the one `link-unavailable` answer; the audit event keeps
the precise reason. The upload itself is the ordinary `POST /v1/artifacts` with `upload_link`.
A browser that opens the URL (asking for HTML, signing nothing) is shown a static help page
instead of a 401: what an upload link is and the command that uses it (`api/pages.py`).
"""

from __future__ import annotations

from aiohttp import web

from ..format.manifest import KINDS
from ..services import uploadlinks as svc
from ..settings import Settings
from . import pages
from .keys import AUDIT, CLOCK, DB, SETTINGS, STORAGE
from .routing import BODY, CTX, PRINCIPAL, Route, page_limit, path_param, query_param
from .schemas import INT, STR, Schema, name_schema, obj

__all__ = ["ROUTES", "schemas", "upload_link_url"]

_NO_STORE = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}


def upload_link_url(settings: Settings, token: str) -> str:
    return f"{settings.effective_public_url}/u/{token}"


async def create_upload_link(request: web.Request) -> web.Response:
    app, body = request.app, request[BODY]
    settings = app[SETTINGS]
    now = app[CLOCK]()
    link, token = await svc.create(
        app[DB],
        app[AUDIT],
        request[CTX],
        request[PRINCIPAL],
        uploader_name=body["uploader"],
        kind=body["kind"],
        max_bytes=body["max_bytes"],
        max_bytes_limit=settings.artifact_max_bytes,
        note=body.get("note", ""),
        lifetime_s=int(body.get("expires_in_s", settings.link_default_lifetime_s)),
        max_lifetime_s=settings.link_max_lifetime_s,
        now_ms=now,
    )
    return web.json_response(
        link.to_json(now) | {"url": upload_link_url(settings, token)}, status=201, headers=_NO_STORE
    )


async def list_upload_links(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    limit = page_limit(request, settings.page_size_max, settings.page_size_max)
    items = await svc.list_upload_links(request.app[DB], request[PRINCIPAL], limit=limit)
    now = request.app[CLOCK]()
    return web.json_response({"items": [link.to_json(now) for link in items]})


async def revoke_upload_link(request: web.Request) -> web.Response:
    app = request.app
    now = app[CLOCK]()
    link = await svc.revoke(
        app[DB],
        app[STORAGE],
        app[AUDIT],
        request[CTX],
        request[PRINCIPAL],
        request.match_info["id"],
        now_ms=now,
    )
    return web.json_response(link.to_json(now))


async def view_upload_link(request: web.Request) -> web.Response:
    app = request.app
    now = app[CLOCK]()
    token_hash = svc.parse_upload_token(request.match_info["token"])  # nothing looked up before this
    link, recipients, status = await svc.inspect(
        app[DB], app[AUDIT], request[CTX], request[PRINCIPAL], token_hash, now
    )
    data = link.to_json(now) | {
        "recipients": [{"name": name, "age_recipient": r} for name, r in recipients.items()],
        "artifact_status": status,
    }
    return web.json_response(data, headers=_NO_STORE)


async def upload_link_page(request: web.Request) -> web.Response:
    """What a browser that opens an upload link is shown (`Route.page`): what the link is and the
    command that uses it. A static help page on purpose: the token is checked for its form (so
    that the URL in the command is exactly one the service could have made) but not looked up —
    no database work, no audit event, the same page for a live link as for a dead one, so that
    opening a URL in a browser tells nobody anything about it."""
    token = request.match_info["token"]
    svc.parse_upload_token(token)  # pure: a malformed token gets the uniform 404
    page = pages.upload_link_page(upload_link_url(request.app[SETTINGS], token))
    return web.Response(text=page, content_type="text/html", headers=pages.PAGE_HEADERS)


_LINK_STATES = ["active", "expired", "revoked", "used"]

ROUTES = [
    Route(
        "POST",
        "/v1/upload-links",
        create_upload_link,
        "upload_link.create",
        "An upload link into the caller's organisation for one uploader; the URL is shown only here",
        "upload-links",
        body="UploadLinkCreate",
        response="UploadLinkCreated",
        status=201,
        errors=(403, 404, 409),
    ),
    Route(
        "GET",
        "/v1/upload-links",
        list_upload_links,
        "upload_link.list",
        "Upload links of the caller's organisation, and those bound to the caller, newest first",
        "upload-links",
        response="UploadLinkList",
        parameters=(query_param("limit", "page size", {"type": "integer", "minimum": 1}),),
    ),
    Route(
        "DELETE",
        "/v1/upload-links/{id}",
        revoke_upload_link,
        "upload_link.revoke",
        "Revoke an upload link at once; an upload it started that is still running is aborted",
        "upload-links",
        response="UploadLink",
        parameters=(path_param("id", "upload link id"),),
        errors=(404, 409),
    ),
    Route(
        "GET",
        "/u/{token}",
        view_upload_link,
        "upload_link.view",
        "What an upload through this link must be (signed by its uploader): kind, size, recipients."
        " A browser that signs nothing gets an HTML page saying how to use the link instead",
        "upload-links",
        response="UploadLinkView",
        parameters=(path_param("token", "the upload link's token (exu1_…)"),),
        errors=(404,),
        page=upload_link_page,
    ),
]


def schemas(settings: Settings) -> dict[str, Schema]:
    opt_int = {"type": ["integer", "null"]}
    opt_str = {"type": ["string", "null"]}
    props: dict[str, Schema] = {
        "id": STR,
        "org": STR,
        "uploader": STR,
        "kind": STR,
        "max_bytes": INT,
        "note": STR,
        "created_by": STR,
        "created_at_ms": INT,
        "expires_at_ms": INT,
        "revoked_at_ms": opt_int,
        "artifact": opt_str,
        "used_at_ms": opt_int,
        "state": {"type": "string", "enum": _LINK_STATES},
    }
    link = obj(props, list(props))
    recipient = obj({"name": STR, "age_recipient": STR}, ["name", "age_recipient"])
    return {
        "UploadLinkCreate": obj(
            {
                "uploader": name_schema(settings),
                "kind": {"type": "string", "enum": list(KINDS)},
                "max_bytes": {"type": "integer", "minimum": 1, "maximum": settings.artifact_max_bytes},
                "note": {"type": "string", "maxLength": 1000},
                "expires_in_s": {"type": "integer", "minimum": 1, "maximum": settings.link_max_lifetime_s},
            },
            ["uploader", "kind", "max_bytes"],
        ),
        "UploadLink": link,
        "UploadLinkCreated": obj(props | {"url": STR}, [*props, "url"]),
        "UploadLinkList": obj({"items": {"type": "array", "items": link}}, ["items"]),
        "UploadLinkView": obj(
            props | {"recipients": {"type": "array", "items": recipient}, "artifact_status": opt_str},
            [*props, "recipients", "artifact_status"],
        ),
    }
