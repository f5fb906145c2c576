"""Handlers for grants, download links, and their redemption under `/l/TOKEN`.

Grants and link management are signed requests like any other. Redemption is not: the token in
the path is the capability (`auth="none"`). Each redemption request is rate-limited per client
IP (before the token is even parsed) and per link, its token parsed strictly before anything is
looked up, and every refusal answered here — a uniform `link-unavailable` for any state of a
token — with an audit event that keeps the precise reason, the source IP and the user agent.
The event names the link's id when the token matched one; never the token.
"""

from __future__ import annotations

import base64
import binascii
import html
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from aiohttp import web

from ..errors import DependencyError, ExchangeError, ValidationError
from ..services import grants as grants_svc
from ..services import links as svc
from ..services.principals import get_principal
from ..settings import Settings
from .keys import AUDIT, CLOCK, DB, SETTINGS, STORAGE
from .problems import from_exchange_error, problem_response
from .ratelimit import RateLimited, TokenBuckets
from .routing import BODY, CTX, PRINCIPAL, ROUTE, Route, path_param, query_param
from .schemas import INT, STR, Schema, name_schema, obj

__all__ = ["ROUTES", "rate_limits", "schemas"]

IP_BUCKETS = web.AppKey("redeem_ip_buckets", TokenBuckets)
LINK_BUCKETS = web.AppKey("redeem_link_buckets", TokenBuckets)

_HTML_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}
#: Redemption answers carry the capability in their URLs: never cached, never sent on as a referrer.
_NO_STORE = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}


async def rate_limits(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: the redemption token buckets, per replica."""
    settings = app[SETTINGS]
    app[IP_BUCKETS] = TokenBuckets(
        per_min=settings.redeem_ip_requests_per_min, burst=settings.redeem_ip_burst_requests, clock=app[CLOCK]
    )
    app[LINK_BUCKETS] = TokenBuckets(
        per_min=settings.redeem_link_requests_per_min,
        burst=settings.redeem_link_burst_requests,
        clock=app[CLOCK],
    )
    yield


def _b64(value: str, field: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValidationError(f"field {field!r} is not base64", field=field) from None


def _b64s(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def link_url(settings: Settings, token: str) -> str:
    return f"{settings.effective_public_url}/l/{token}"


# -- grants ---------------------------------------------------------------------------------------


async def create_grant(request: web.Request) -> web.Response:
    app, body = request.app, request[BODY]
    now = app[CLOCK]()
    until = body.get("expires_in_s")
    grant = await grants_svc.grant(
        app[DB],
        app[AUDIT],
        request[CTX],
        request[PRINCIPAL],
        request.match_info["id"],
        grantee_name=body["principal"],
        header=_b64(body["header"], "header"),
        expires_at_ms=None if until is None else now + int(until) * 1000,
        now_ms=now,
    )
    return web.json_response(grant.to_json(), status=201)


async def list_grants(request: web.Request) -> web.Response:
    app = request.app
    items = await grants_svc.list_grants(
        app[DB], request[PRINCIPAL], request.match_info["id"], now_ms=app[CLOCK]()
    )
    return web.json_response({"items": [g.to_json() for g in items]})


async def revoke_grant(request: web.Request) -> web.Response:
    app = request.app
    grant, links = await grants_svc.revoke(
        app[DB],
        app[AUDIT],
        request[CTX],
        request[PRINCIPAL],
        request.match_info["id"],
        grantee_name=request.match_info["principal"],
        now_ms=app[CLOCK](),
    )
    return web.json_response(grant.to_json() | {"links_revoked": links})


# -- links ----------------------------------------------------------------------------------------


async def create_link(request: web.Request) -> web.Response:
    app, body = request.app, request[BODY]
    settings = app[SETTINGS]
    now = app[CLOCK]()
    link, token = await svc.create(
        app[DB],
        app[AUDIT],
        request[CTX],
        request[PRINCIPAL],
        body["artifact"],
        recipient_name=body["recipient"],
        lifetime_s=int(body.get("expires_in_s", settings.link_default_lifetime_s)),
        max_lifetime_s=settings.link_max_lifetime_s,
        max_downloads=body.get("max_downloads"),
        now_ms=now,
        allowed_networks=body.get("allowed_networks"),
    )
    return web.json_response(link.to_json(now) | {"url": link_url(settings, token)}, status=201)


async def list_links(request: web.Request) -> web.Response:
    app = request.app
    settings = app[SETTINGS]
    artifact = request.query.get("artifact") or None
    items = await svc.list_links(
        app[DB], request[PRINCIPAL], artifact_id=artifact, limit=settings.page_size_max
    )
    now = app[CLOCK]()
    return web.json_response({"items": [link.to_json(now) for link in items]})


async def revoke_link(request: web.Request) -> web.Response:
    app = request.app
    link = await svc.revoke(
        app[DB], app[AUDIT], request[CTX], request[PRINCIPAL], request.match_info["id"], now_ms=app[CLOCK]()
    )
    return web.json_response(link.to_json(app[CLOCK]()))


# -- redemption -----------------------------------------------------------------------------------

Redeemer = Callable[[web.Request, bytes], Awaitable[web.StreamResponse]]


async def _record_refusal(request: web.Request, exc: ExchangeError) -> None:
    app, route = request.app, request[ROUTE]
    link_id = exc.link_id if isinstance(exc, svc.LinkRefused) else None
    try:
        async with app[DB].transaction() as conn:
            await app[AUDIT].append(
                conn,
                request[CTX],
                action=route.audit_action,
                outcome="error" if exc.status >= 500 else "denied",
                reason=exc.audit_reason,
                resource={"type": "link", "id": link_id} if link_id else None,
                details={"method": request.method, "route": route.path, "status": exc.status},
            )
    except DependencyError:
        pass  # the answer is still a refusal; the pipeline logs the same for its own refusals


def _redemption(fn: Redeemer) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        app = request.app
        try:
            app[IP_BUCKETS].take(request.remote or "-", "from this address")
            token_hash = svc.parse_token(request.match_info["token"])  # nothing looked up before this
            app[LINK_BUCKETS].take(token_hash, "for this link")
            return await fn(request, token_hash)
        except ExchangeError as exc:
            await _record_refusal(request, exc)
            headers = dict(_NO_STORE)
            if isinstance(exc, RateLimited):
                headers["Retry-After"] = str(exc.extra.get("retry_after_s", 60))
            return problem_response(from_exchange_error(exc, request[CTX].request_id), headers=headers)

    handler.__name__ = fn.__name__
    return handler


def _file_summary(r: svc.Redemption) -> list[dict[str, Any]]:
    return [
        {"index": f.idx, "path": f.path, "size": f.plaintext_size, "ciphertext_size": f.ciphertext_size}
        for f in r.files
    ]


def _wants_html(request: web.Request) -> bool:
    accept = request.headers.get("Accept", "")
    return "text/html" in accept and "application/json" not in accept


async def _view(request: web.Request, token_hash: bytes) -> web.StreamResponse:
    app = request.app
    now = app[CLOCK]()
    r = await svc.resolve(app[DB], token_hash, now, ip=request[CTX].ip)
    async with app[DB].transaction() as conn:
        await app[AUDIT].append(
            conn,
            request[CTX],
            action="link.view",
            resource={"type": "artifact", "id": r.artifact.id},
            details={"link": r.link.id, "html": _wants_html(request)},
        )
    base = f"{app[SETTINGS].effective_public_url}/l/{request.match_info['token']}"
    data = {
        "link": r.link.id,
        "artifact": r.artifact.to_json(),
        "recipient": r.link.recipient.name,
        "recipient_age": r.link.recipient.age_recipient,
        "expires_at_ms": r.link.expires_at_ms,
        "max_downloads": r.link.max_downloads,
        "downloads": r.link.downloads,
        "files": _file_summary(r),
        "header_url": f"{base}/header",
        "file_urls": [f"{base}/files/{f.idx}" for f in r.files],
    }
    if _wants_html(request):
        return web.Response(text=_page(data, base), content_type="text/html", headers=_HTML_HEADERS)
    return web.json_response(data, headers=_NO_STORE)


def _utc(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _page(data: dict[str, Any], base: str) -> str:
    e = html.escape
    a = data["artifact"]
    rows = "\n".join(
        f"<tr><td>{f['index']}</td><td>{e(f['path'])}</td><td>{f['size']}</td></tr>" for f in data["files"]
    )
    q = quote(base, safe=":/")
    commands = [f"exchange download {q} -o DIR"] + [
        f"{{ curl -sfS {q}/header; curl -sfSL {q}/files/{f['index']}; }} | age -d -i key.txt"
        f" &gt; {e(f['path'].rsplit('/', 1)[-1])}"
        for f in data["files"]
    ]
    limit = "no limit" if data["max_downloads"] is None else f"{data['downloads']} of {data['max_downloads']}"
    return (
        "<!doctype html>\n<html lang=en><meta charset=utf-8><title>"
        f"{e(a['name'])} — exchange</title>\n<h1>{e(a['name'])}</h1>\n"
        f"<p>{e(a['kind'])} from {e(a['org'])}, {a['size']} bytes in {a['file_count']} file(s), for"
        f" {e(data['recipient'])}. Expires {_utc(data['expires_at_ms'])};"
        f" downloads used: {e(limit)}.</p>\n"
        "<table><tr><th>#</th><th>path</th><th>bytes</th></tr>\n"
        f"{rows}\n</table>\n<p>The files are encrypted for the recipient alone. To fetch and decrypt:</p>\n"
        "<pre>" + "\n".join(commands) + "</pre>\n</html>\n"
    )


async def _session(request: web.Request, token_hash: bytes) -> web.StreamResponse:
    app = request.app
    settings = app[SETTINGS]
    now = app[CLOCK]()
    body = request.get(BODY) or {}
    r = await svc.open_session(
        app[DB], app[AUDIT], request[CTX], token_hash, now, session=body.get("session")
    )
    _, header = await svc.header(app[DB], app[AUDIT], request[CTX], token_hash, now)
    uploader = await get_principal(app[DB], r.artifact.created_by_name)
    signed = r.artifact.manifest, r.artifact.manifest_signature
    assert signed[0] is not None and signed[1] is not None
    ttl = settings.presign_ttl_s
    files = [
        f.to_json()
        | {
            "url": app[STORAGE].presign_get(f.object_key, ttl_s=ttl),
            "part_sha256": [_b64s(r.digests[f.idx][n]) for n in range(1, f.part_count + 1)],
        }
        for f in r.files
    ]
    data = r.artifact.to_json() | {
        "link": r.link.id,
        "session": r.session,
        "files": files,
        "manifest": json.loads(signed[0]),
        "manifest_signature": _b64s(signed[1]),
        "header": _b64s(header),
        "uploader": {
            "name": uploader.name,
            "key_id": uploader.key_id,
            "signing_public_key": _b64s(uploader.signing_public_key),
        },
        "recipient": {"name": r.link.recipient.name, "age_recipient": r.link.recipient.age_recipient},
        "expires_at_ms": now + ttl * 1000,
        "expires_in_s": ttl,
    }
    return web.json_response(data, headers=_NO_STORE)


async def _header(request: web.Request, token_hash: bytes) -> web.StreamResponse:
    app = request.app
    _, header = await svc.header(app[DB], app[AUDIT], request[CTX], token_hash, app[CLOCK]())
    return web.Response(body=header, content_type="application/octet-stream", headers=_NO_STORE)


async def _file(request: web.Request, token_hash: bytes) -> web.StreamResponse:
    app = request.app
    raw_index = request.match_info["index"]
    if not (raw_index.isascii() and raw_index.isdigit() and len(raw_index) <= 9):
        raise ValidationError("the file index must be a whole number", field="index")
    url, session = await svc.file_url(
        app[DB],
        app[STORAGE],
        app[AUDIT],
        request[CTX],
        token_hash,
        app[CLOCK](),
        index=int(raw_index),
        session=request.query.get("session"),
        range_header=request.headers.get("Range"),
        ttl_s=app[SETTINGS].presign_ttl_s,
    )
    return web.Response(status=307, headers={"Location": url, "X-Exchange-Session": session, **_NO_STORE})


async def _receipt(request: web.Request, token_hash: bytes) -> web.StreamResponse:
    app, body = request.app, request[BODY]
    answer = await svc.receipt(
        app[DB],
        app[AUDIT],
        request[CTX],
        token_hash,
        app[CLOCK](),
        session=body["session"],
        signature=_b64(body["signature"], "signature"),
    )
    return web.json_response(answer, status=201)


view_link = _redemption(_view)
open_session = _redemption(_session)
link_header = _redemption(_header)
link_file = _redemption(_file)
post_receipt = _redemption(_receipt)

_ID = (path_param("id", "artifact id"),)
_TOKEN = (path_param("token", "the link's token (exl1_…)"),)

ROUTES = [
    Route(
        "POST",
        "/v1/artifacts/{id}/grants",
        create_grant,
        "artifact.grant",
        "Grant the artifact to a tester with an age header wrapped for it (developers of the owner)",
        "grants",
        body="GrantCreate",
        response="Grant",
        status=201,
        parameters=_ID,
        errors=(403, 404, 409),
    ),
    Route(
        "GET",
        "/v1/artifacts/{id}/grants",
        list_grants,
        "artifact.grants",
        "The artifact's grants",
        "grants",
        response="GrantList",
        parameters=_ID,
        errors=(404,),
    ),
    Route(
        "DELETE",
        "/v1/artifacts/{id}/grants/{principal}",
        revoke_grant,
        "artifact.revoke",
        "Revoke a grant: the tester's header is removed and its links die at once",
        "grants",
        response="Grant",
        parameters=(*_ID, path_param("principal", "the grantee's name")),
        errors=(403, 404),
    ),
    Route(
        "POST",
        "/v1/links",
        create_link,
        "link.create",
        "A download link for a recipient of a complete artifact; the URL is shown only here",
        "links",
        body="LinkCreate",
        response="LinkCreated",
        status=201,
        errors=(403, 404, 409),
    ),
    Route(
        "GET",
        "/v1/links",
        list_links,
        "link.list",
        "Links of the organisation's artifacts, and those bound to the caller, newest first",
        "links",
        response="LinkList",
        parameters=(query_param("artifact", "only links to this artifact", {"type": "string"}),),
    ),
    Route(
        "DELETE",
        "/v1/links/{id}",
        revoke_link,
        "link.revoke",
        "Revoke a link at once",
        "links",
        response="Link",
        parameters=(path_param("id", "link id"),),
        errors=(404, 409),
    ),
    Route(
        "GET",
        "/l/{token}",
        view_link,
        "link.view",
        "What a link holds (JSON, or an HTML page for browsers); counts nothing",
        "redeem",
        auth="none",
        response="LinkView",
        parameters=_TOKEN,
        errors=(404, 429),
    ),
    Route(
        "POST",
        "/l/{token}/session",
        open_session,
        "link.session",
        "Open a counted download session (or renew the URLs of one): presigned GETs, header, manifest",
        "redeem",
        auth="none",
        body="LinkSessionRequest",
        response="LinkSession",
        parameters=_TOKEN,
        errors=(404, 429),
    ),
    Route(
        "GET",
        "/l/{token}/header",
        link_header,
        "link.header",
        "The age header for the link's recipient (raw bytes)",
        "redeem",
        auth="none",
        parameters=_TOKEN,
        errors=(404, 429),
    ),
    Route(
        "GET",
        "/l/{token}/files/{index}",
        link_file,
        "link.file",
        "307 to a presigned GET of one file; without ?session= this opens (and counts) a download",
        "redeem",
        auth="none",
        status=307,
        parameters=(
            *_TOKEN,
            path_param("index", "file index"),
            query_param("session", "the download session", {"type": "string"}),
        ),
        errors=(404, 416, 429),
    ),
    Route(
        "POST",
        "/l/{token}/receipt",
        post_receipt,
        "artifact.receipt",
        "The recipient's Ed25519 signature over the manifest digest: the download's receipt",
        "redeem",
        auth="none",
        body="Receipt",
        response="ReceiptRecorded",
        status=201,
        parameters=_TOKEN,
        errors=(403, 404, 409, 429),
    ),
]


def schemas(settings: Settings) -> dict[str, Schema]:
    opt_int = {"type": ["integer", "null"]}
    grant_props: dict[str, Schema] = {
        "artifact": STR,
        "principal": STR,
        "granted_by": STR,
        "created_at_ms": INT,
        "expires_at_ms": opt_int,
        "revoked_at_ms": opt_int,
    }
    grant = obj(grant_props | {"links_revoked": INT}, list(grant_props))
    link_props: dict[str, Schema] = {
        "id": STR,
        "artifact": STR,
        "artifact_name": STR,
        "recipient": STR,
        "created_by": STR,
        "created_at_ms": INT,
        "expires_at_ms": INT,
        "max_downloads": opt_int,
        "downloads": INT,
        "revoked_at_ms": opt_int,
        "allowed_networks": {"type": ["array", "null"], "items": STR},
        "state": {"type": "string", "enum": ["active", "expired", "revoked", "used"]},
    }
    session_pattern = {"type": "string", "pattern": r"^ses_[0-9a-f]{32}$"}
    return {
        "GrantCreate": obj(
            {
                "principal": name_schema(settings),
                "header": {"type": "string", "minLength": 1, "maxLength": 4096},
                "expires_in_s": {"type": "integer", "minimum": 1, "maximum": 100 * 365 * 86400},
            },
            ["principal", "header"],
        ),
        "Grant": grant,
        "GrantList": obj({"items": {"type": "array", "items": grant}}, ["items"]),
        "LinkCreate": obj(
            {
                "artifact": {"type": "string", "minLength": 1, "maxLength": 64},
                "recipient": name_schema(settings),
                "expires_in_s": {"type": "integer", "minimum": 1, "maximum": settings.link_max_lifetime_s},
                "max_downloads": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
                "allowed_networks": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": svc.MAX_ALLOWED_NETWORKS,
                    "items": {"type": "string", "minLength": 1, "maxLength": 64},
                    "description": "redeem only from these addresses or CIDR networks",
                },
            },
            ["artifact", "recipient"],
        ),
        "Link": obj(link_props, list(link_props)),
        "LinkCreated": obj(link_props | {"url": STR}, [*link_props, "url"]),
        "LinkList": obj({"items": {"type": "array", "items": obj(link_props, list(link_props))}}, ["items"]),
        "LinkView": obj(
            {
                "link": STR,
                "artifact": {"type": "object"},
                "recipient": STR,
                "recipient_age": STR,
                "expires_at_ms": INT,
                "max_downloads": opt_int,
                "downloads": INT,
                "files": {"type": "array", "items": {"type": "object"}},
                "header_url": STR,
                "file_urls": {"type": "array", "items": STR},
            },
            ["link", "artifact", "recipient", "expires_at_ms", "files", "header_url", "file_urls"],
        ),
        "LinkSessionRequest": obj({"session": session_pattern}, []),
        "LinkSession": obj(
            {"session": STR, "link": STR, "header": STR, "expires_in_s": INT},
            ["session", "link"],
            closed=False,
        ),
        "Receipt": obj(
            {
                "session": session_pattern,
                "signature": {
                    "type": "string",
                    "pattern": r"^[A-Za-z0-9+/]{86}==$",
                    "x-pattern-hint": "an Ed25519 signature in base64 (64 bytes)",
                },
            },
            ["session", "signature"],
        ),
        "ReceiptRecorded": obj({"artifact": STR, "received_at_ms": INT}, ["artifact"], closed=False),
    }
