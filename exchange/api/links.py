"""Handlers for grants, download links, and their redemption under `/l/TOKEN`.

Grants and link management are signed requests like any other. Redemption is not signed: the
token in the path is the capability (`auth="none"`), and a proof of the recipient's key (the
link's challenge, decrypted) opens its download session. Each redemption request is
rate-limited per client source (a malformed token costs its source a token too) and per link,
by token buckets every replica shares (`api.ratelimit`: one statement for both, apart from the
redemption's own transaction, since a refused redemption must still cost its tokens), its token
parsed strictly before anything is looked up, and every refusal answered here — a uniform
`link-unavailable` for any state of a token — is accounted for in the log (`api/refusals.py`)
with the precise reason, the source IP and the user agent, naming the link's id when the token
matched one; never the token. The link's page (`api/pages.py`) prints commands that no
uploader's name reaches.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ..errors import ExchangeError, RateLimited, ValidationError
from ..format.note import Signer
from ..services import grants as grants_svc
from ..services import links as svc
from ..services import tokens
from ..settings import Settings
from . import pages, refusals
from .keys import AUDIT, CLOCK, DB, SETTINGS, STORAGE
from .metrics import METRICS
from .problems import from_exchange_error, problem_response
from .ratelimit import SharedBuckets, source_key, take_each
from .routing import BODY, CTX, PRINCIPAL, ROUTE, Route, path_param, query_param
from .schemas import INT, STR, Schema, name_schema, obj
from .validation import b64decode_field, b64encode

__all__ = ["ROUTES", "fetch_commands", "schemas", "setup_limits", "setup_proof_keys"]

IP_BUCKETS = web.AppKey("redeem_ip_buckets", SharedBuckets)
LINK_BUCKETS = web.AppKey("redeem_link_buckets", SharedBuckets)
PROOF_KEYS = web.AppKey("link_proof_keys", svc.ProofKeys)

#: Redemption answers carry the capability in their URLs: never cached, never sent on as a referrer.
_NO_STORE = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}


def setup_limits(app: web.Application) -> None:
    """The redemption token buckets, in the shared database (api/lifetime.py, once DB is open)."""
    settings = app[SETTINGS]
    app[IP_BUCKETS] = SharedBuckets(
        app[DB],
        kind="redeem-ip",
        per_min=settings.redeem_ip_requests_per_min,
        burst=settings.redeem_ip_burst_requests,
        clock=app[CLOCK],
    )
    app[LINK_BUCKETS] = SharedBuckets(
        app[DB],
        kind="redeem-link",
        per_min=settings.redeem_link_requests_per_min,
        burst=settings.redeem_link_burst_requests,
        clock=app[CLOCK],
    )


def setup_proof_keys(app: web.Application, signer: Signer) -> None:
    """The key link proofs are made and checked with (see `format.linkproof`), from the log key."""
    app[PROOF_KEYS] = svc.ProofKeys.from_signer(signer, max_age_s=app[SETTINGS].link_proof_max_age_s)


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
        header=b64decode_field(body["header"], "header"),
        expires_at_ms=None if until is None else now + int(until) * 1000,
        now_ms=now,
        max_downloads=body.get("max_downloads"),
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
    """Account for a refused redemption as the pipeline does its refusals (`api.refusals`),
    naming the link when the token matched one."""
    link_id = exc.link_id if isinstance(exc, tokens.LinkRefused) else None
    await refusals.record(request, request[ROUTE], exc.audit_reason, exc.status, link_id=link_id)


def _redemption(fn: Redeemer) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    kind = fn.__name__.lstrip("_")  # view, challenge, session, header, file, receipt

    async def handler(request: web.Request) -> web.StreamResponse:
        app = request.app
        redemptions = app[METRICS].redemptions
        try:
            from_here = (app[IP_BUCKETS], source_key(request.remote), "from this address")  # IPv6: its /64
            try:
                token_hash = tokens.parse_token(request.match_info["token"])  # nothing looked up before this
            except ExchangeError:
                await take_each([from_here])  # a malformed token costs its source a token all the same
                raise
            # One statement for both buckets, the source's first (its refusal is the one named).
            await take_each([from_here, (app[LINK_BUCKETS], token_hash, "for this link")])
            response = await fn(request, token_hash)
        except ExchangeError as exc:
            redemptions.labels(kind, "refused").inc()
            await _record_refusal(request, exc)
            headers = dict(_NO_STORE)
            if isinstance(exc, RateLimited):
                headers["Retry-After"] = str(exc.extra.get("retry_after_s", 60))
            return problem_response(from_exchange_error(exc, request[CTX].request_id), headers=headers)
        redemptions.labels(kind, "ok").inc()
        return response

    handler.__name__ = fn.__name__
    return handler


def _file_summary(r: svc.Redemption) -> list[dict[str, Any]]:
    return [
        {"index": f.idx, "path": f.path, "size": f.plaintext_size, "ciphertext_size": f.ciphertext_size}
        for f in r.files
    ]


def _credential(request: web.Request, body: dict[str, Any] | None = None) -> svc.Credential:
    source = body if body is not None else request.query
    proof, session = source.get("proof"), source.get("session")
    return svc.Credential(
        proof=proof if isinstance(proof, str) else None, session=session if isinstance(session, str) else None
    )


async def _view(request: web.Request, token_hash: bytes) -> web.StreamResponse:
    app = request.app
    html_page = pages.wants_html(request)
    now = app[CLOCK]()
    r = await svc.view(app[DB], app[AUDIT], request[CTX], token_hash, now, html=html_page)
    base = link_url(app[SETTINGS], request.match_info["token"])
    data = {
        "link": r.link.id,
        "artifact": r.artifact.to_json(),
        "recipient": r.link.recipient.name,
        "recipient_age": r.link.recipient.age_recipient,
        "expires_at_ms": r.link.expires_at_ms,
        "max_downloads": r.link.max_downloads,
        "downloads": r.link.downloads,
        "files": _file_summary(r),
        "challenge_url": f"{base}/challenge",
        "header_url": f"{base}/header",
        "file_urls": [f"{base}/files/{f.idx}" for f in r.files],
        "commands": fetch_commands(base, [f.idx for f in r.files]),
    }
    if html_page:
        text = pages.link_page(data, recipient_org=r.link.recipient.org_name, now_ms=now)
        return web.Response(text=text, content_type="text/html", headers=pages.PAGE_HEADERS)
    return web.json_response(data, headers=_NO_STORE)


def fetch_commands(base: str, indices: list[int], key_file: str = "key.txt") -> dict[str, Any]:
    """The commands a recipient pastes to fetch and decrypt a link's files: with exchange, and
    with nothing but curl and age.

    Inert whatever the uploader named things: no name, path or kind appears in a command. The
    exchange CLI writes the artifact's real names itself (refusing `/`, `..` and control
    characters); the curl commands write `file-N`, names the recipient's side chose, and the page
    shows which path each N is. One proof (the challenge, decrypted) opens one counted session, and
    every command carries it, so a whole artifact is one download however many files it has."""
    url = pages.inert_url(base)
    key = shlex.quote(key_file)
    proof = f"P=\"$(curl -sfS '{url}/challenge' | age -d -i {key})\""
    files = [
        f'{{ curl -sfS "{url}/header?proof=$P"; curl -sfSL "{url}/files/{i}?proof=$P"; }}'
        f" | age -d -i {key} > file-{i}"
        for i in indices
    ]
    return {"exchange": f"exchange download '{url}' -o DIR", "curl": [proof, *files]}


async def _challenge(request: web.Request, token_hash: bytes) -> web.StreamResponse:
    app = request.app
    _, sealed = await svc.challenge(
        app[DB], app[AUDIT], request[CTX], token_hash, app[CLOCK](), request.app[PROOF_KEYS]
    )
    return web.Response(body=sealed, content_type="application/octet-stream", headers=_NO_STORE)


async def _session(request: web.Request, token_hash: bytes) -> web.StreamResponse:
    app = request.app
    ttl = app[SETTINGS].link_presign_ttl_s
    opened = await svc.open_session(
        app[DB],
        app[STORAGE],
        app[AUDIT],
        request[CTX],
        token_hash,
        app[CLOCK](),
        _credential(request, request.get(BODY) or {}),
        app[PROOF_KEYS],
        ttl_s=ttl,
    )
    r = opened.redemption
    signed = r.artifact.manifest, r.artifact.manifest_signature
    assert signed[0] is not None and signed[1] is not None
    files = [
        f.to_json()
        | {
            "url": opened.urls[f.idx],
            "part_sha256": [b64encode(r.digests[f.idx][n]) for n in range(1, f.part_count + 1)],
        }
        for f in r.files
    ]
    data = r.artifact.to_json() | {
        "link": r.link.id,
        "session": r.session,
        "files": files,
        "manifest": json.loads(signed[0]),
        "manifest_signature": b64encode(signed[1]),
        "header": b64encode(opened.header),
        "uploader": opened.uploader
        | {"signing_public_key": b64encode(opened.uploader["signing_public_key"])},
        "recipient": {"name": r.link.recipient.name, "age_recipient": r.link.recipient.age_recipient},
        "expires_at_ms": opened.expires_at_ms,
        "expires_in_s": ttl,
    }
    return web.json_response(data, headers=_NO_STORE)


async def _header(request: web.Request, token_hash: bytes) -> web.StreamResponse:
    app = request.app
    header = await svc.header(
        app[DB], app[AUDIT], request[CTX], token_hash, app[CLOCK](), _credential(request), app[PROOF_KEYS]
    )
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
        _credential(request),
        app[PROOF_KEYS],
        index=int(raw_index),
        range_header=request.headers.get("Range"),
        ttl_s=app[SETTINGS].link_presign_ttl_s,
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
        signature=b64decode_field(body["signature"], "signature"),
    )
    return web.json_response(answer, status=201)


view_link = _redemption(_view)
link_challenge = _redemption(_challenge)
open_session = _redemption(_session)
link_header = _redemption(_header)
link_file = _redemption(_file)
post_receipt = _redemption(_receipt)

_ID = (path_param("id", "artifact id"),)
_TOKEN = (path_param("token", "the link's token (exl1_…)"),)
_CREDENTIAL = (
    query_param(
        "proof",
        "the decrypted challenge: proves the recipient's key (opens the session on first use)",
        {"type": "string", "pattern": r"^exp1_[A-Za-z0-9_-]{75}$"},
    ),
    query_param("session", "a download session opened by a proof", {"type": "string"}),
)

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
        "GET",
        "/l/{token}/challenge",
        link_challenge,
        "link.challenge",
        "A fresh proof for the link's recipient, as an age file only the recipient's key decrypts;"
        " counts nothing. The decrypted proof opens one download session.",
        "redeem",
        auth="none",
        parameters=_TOKEN,
        errors=(404, 429),
    ),
    Route(
        "POST",
        "/l/{token}/session",
        open_session,
        "link.session",
        "Open a counted download session with a proof (or continue one, uncounted, with its id or"
        " the same proof): presigned GETs, header, manifest",
        "redeem",
        auth="none",
        body="LinkSessionRequest",
        response="LinkSession",
        parameters=_TOKEN,
        errors=(403, 404, 429),
    ),
    Route(
        "GET",
        "/l/{token}/header",
        link_header,
        "link.header",
        "The age header for the link's recipient (raw bytes), within a session",
        "redeem",
        auth="none",
        parameters=(*_TOKEN, *_CREDENTIAL),
        errors=(403, 404, 429),
    ),
    Route(
        "GET",
        "/l/{token}/files/{index}",
        link_file,
        "link.file",
        "307 to a presigned GET of one file, within a session: the first request with a fresh"
        " ?proof= opens (and counts) it",
        "redeem",
        auth="none",
        status=307,
        parameters=(*_TOKEN, path_param("index", "file index"), *_CREDENTIAL),
        errors=(403, 404, 416, 429),
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
        "max_downloads": {**opt_int, "description": "downloads by id this grant gives (null: no limit)"},
        "downloads": {"type": "integer", "description": "download sessions it has opened"},
        "needs_regrant": {
            "type": "boolean",
            "description": "active, but the grantee re-enrolled with new keys: its uploader grants again",
        },
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
                "max_downloads": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": 1_000_000,
                    "description": "bound the downloads by id (each a counted session); none: no limit",
                },
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
                "challenge_url": STR,
                "header_url": STR,
                "file_urls": {"type": "array", "items": STR},
                "commands": obj(
                    {"exchange": STR, "curl": {"type": "array", "items": STR}}, ["exchange", "curl"]
                ),
            },
            [
                "link",
                "artifact",
                "recipient",
                "expires_at_ms",
                "files",
                "challenge_url",
                "header_url",
                "file_urls",
                "commands",
            ],
        ),
        "LinkSessionRequest": obj(
            {"proof": {"type": "string", "pattern": r"^exp1_[A-Za-z0-9_-]{75}$"}, "session": session_pattern},
            [],
        )
        | {"maxProperties": 1, "description": "a proof (from the challenge) or a session, not both"},
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
