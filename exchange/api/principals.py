"""Handlers for identity: who am I, organisations, invites, enrolment, principals, and a
principal's key rotation (its new keys, its own headers listed and re-wrapped)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..errors import BadSignature, UnknownKey, ValidationError
from ..identity import PublicKeys
from ..services import keyrotation
from ..services import principals as svc
from ..settings import Settings
from .auth import authenticate_with_key
from .keys import AUDIT, CLOCK, DB, SETTINGS
from .routing import BODY, CTX, PRINCIPAL, Route, page_limit, path_param, query_param
from .schemas import INT, STR, Schema, name_schema, obj
from .validation import b64decode_field, b64encode

__all__ = ["ROUTES", "schemas"]


async def whoami(request: web.Request) -> web.Response:
    return web.json_response(svc.principal_json(request[PRINCIPAL]))


async def create_org(request: web.Request) -> web.Response:
    app = request.app
    org = await svc.create_org(
        app[DB], app[AUDIT], request[CTX], request[PRINCIPAL], request[BODY]["name"], app[CLOCK]()
    )
    return web.json_response({"id": org.id, "name": org.name, "created_at_ms": org.created_at_ms}, status=201)


async def list_orgs(request: web.Request) -> web.Response:
    svc.require_role(request[PRINCIPAL], "admin", "auditor")
    orgs = await svc.list_orgs(request.app[DB])
    return web.json_response(
        {"items": [{"id": o.id, "name": o.name, "created_at_ms": o.created_at_ms} for o in orgs]}
    )


async def create_invite(request: web.Request) -> web.Response:
    app, body = request.app, request[BODY]
    invite, code = await svc.create_invite(
        app[DB],
        app[AUDIT],
        request[CTX],
        request[PRINCIPAL],
        role=body["role"],
        org_name=body["org"],
        lifetime_s=body.get("expires_in_s", app[SETTINGS].invite_default_lifetime_s),
        now_ms=app[CLOCK](),
    )
    return web.json_response(
        {
            "id": invite.id,
            "code": code,
            "role": invite.role,
            "org": invite.org_name,
            "expires_at_ms": invite.expires_at_ms,
        },
        status=201,
    )


async def create_reenroll_invite(request: web.Request) -> web.Response:
    app, body = request.app, request[BODY]
    invite, code = await svc.create_reenroll_invite(
        app[DB],
        app[AUDIT],
        request[CTX],
        request[PRINCIPAL],
        name=request.match_info["name"],
        lifetime_s=body.get("expires_in_s", app[SETTINGS].invite_default_lifetime_s),
        now_ms=app[CLOCK](),
    )
    return web.json_response(
        {
            "id": invite.id,
            "code": code,
            "role": invite.role,
            "org": invite.org_name,
            "expires_at_ms": invite.expires_at_ms,
            "reenroll": request.match_info["name"],
        },
        status=201,
    )


async def enroll(request: web.Request) -> web.Response:
    """Register the caller's keys with an invite; the request is signed by the key it registers."""
    app, body = request.app, request[BODY]
    keys = PublicKeys(
        signing_public_key=b64decode_field(body["signing_public_key"], "signing_public_key"),
        age_recipient=body["age_recipient"],
    )
    try:
        await authenticate_with_key(request, keys.key_id, keys.signing_public_key)
    except UnknownKey as exc:
        raise BadSignature("enrolment must be signed by the signing key it registers") from exc
    principal = await svc.enroll(
        app[DB],
        app[AUDIT],
        request[CTX],
        code=body["code"],
        name=body["name"],
        keys=keys,
        now_ms=app[CLOCK](),
    )
    return web.json_response(svc.principal_json(principal), status=201)


async def list_principals(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    q = request.query
    limit = page_limit(request, settings.page_size_default, settings.page_size_max)
    role = q.get("role")
    if role is not None and role not in svc.ROLES:
        raise ValidationError(f"query parameter 'role' must be one of: {', '.join(svc.ROLES)}", field="role")
    items = await svc.list_principals(
        request.app[DB], org=q.get("org"), role=role, limit=limit + 1, after=q.get("cursor")
    )
    more = len(items) > limit
    items = items[:limit]
    return web.json_response(
        {
            "items": [svc.principal_json(p) for p in items],
            "next_cursor": items[-1].name if more else None,
        }
    )


def _key_json(key: keyrotation.KeyRecord) -> dict[str, Any]:
    return {
        "key_id": key.key_id,
        "signing_public_key": b64encode(key.signing_public_key),
        "age_recipient": key.age_recipient,
        "valid_from_ms": key.valid_from_ms,
        "valid_until_ms": key.valid_until_ms,
    }


async def get_principal(request: web.Request) -> web.Response:
    """One principal, with the keys it held before (what they signed still verifies)."""
    principal = await svc.get_principal(request.app[DB], request.match_info["name"])
    history = await keyrotation.key_history(request.app[DB], principal.id)
    previous = [_key_json(k) for k in history if k.valid_until_ms is not None]
    return web.json_response(svc.principal_json(principal) | {"previous_keys": previous})


async def rotate_keys(request: web.Request) -> web.Response:
    """Replace the caller's keys: signed by the old key, the new signing key's proof in the body."""
    app, body = request.app, request[BODY]
    keys = PublicKeys(
        signing_public_key=b64decode_field(body["signing_public_key"], "signing_public_key"),
        age_recipient=body["age_recipient"],
    )
    principal = await keyrotation.rotate(
        app[DB],
        app[AUDIT],
        request[CTX],
        request[PRINCIPAL],
        keys,
        b64decode_field(body["proof"], "proof"),
        now_ms=app[CLOCK](),
    )
    return web.json_response(svc.principal_json(principal))


async def own_headers(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    limit = page_limit(request, settings.page_size_default, settings.page_size_max)
    items = await keyrotation.own_headers(
        request.app[DB],
        request.app[AUDIT],
        request[CTX],
        request[PRINCIPAL],
        limit=limit + 1,
        after=request.query.get("cursor"),
    )
    more = len(items) > limit
    items = items[:limit]
    return web.json_response(
        {
            "items": [
                {"artifact": h.artifact_id, "header": b64encode(h.header), "created_at_ms": h.created_at_ms}
                for h in items
            ],
            "next_cursor": items[-1].artifact_id if more else None,
        }
    )


async def rewrap_header(request: web.Request) -> web.Response:
    app = request.app
    header = b64decode_field(request[BODY]["header"], "header")
    artifact_id = request.match_info["id"]
    await keyrotation.rewrap(app[DB], app[AUDIT], request[CTX], request[PRINCIPAL], artifact_id, header)
    return web.json_response({"artifact": artifact_id, "header": b64encode(header)})


async def _set_status(request: web.Request, status: str) -> web.Response:
    app = request.app
    principal = await svc.set_status(
        app[DB],
        app[AUDIT],
        request[CTX],
        request[PRINCIPAL],
        request.match_info["name"],
        status,
        reason=request[BODY].get("reason"),
    )
    return web.json_response(svc.principal_json(principal))


async def disable_principal(request: web.Request) -> web.Response:
    return await _set_status(request, "disabled")


async def enable_principal(request: web.Request) -> web.Response:
    return await _set_status(request, "active")


ROUTES = [
    Route(
        "GET",
        "/v1/whoami",
        whoami,
        "whoami",
        "The principal that signed this request",
        "principals",
        response="Principal",
    ),
    Route(
        "POST",
        "/v1/orgs",
        create_org,
        "org.create",
        "Create an organisation (admin)",
        "principals",
        body="OrgCreate",
        response="Org",
        status=201,
        errors=(403, 409),
    ),
    Route(
        "GET",
        "/v1/orgs",
        list_orgs,
        "org.list",
        "List organisations (admin, auditor)",
        "principals",
        response="OrgList",
        errors=(403,),
    ),
    Route(
        "POST",
        "/v1/invites",
        create_invite,
        "invite.create",
        "Issue a one-time invite (admin)",
        "principals",
        body="InviteCreate",
        response="Invite",
        status=201,
        errors=(403, 404),
    ),
    Route(
        "POST",
        "/v1/enroll",
        enroll,
        "principal.enroll",
        "Register public keys with an invite; signed by the key being registered",
        "principals",
        auth="self",
        body="Enroll",
        response="Principal",
        status=201,
        errors=(403, 409),
    ),
    Route(
        "GET",
        "/v1/principals",
        list_principals,
        "principal.list",
        "List principals and their public keys",
        "principals",
        response="PrincipalList",
        parameters=(
            query_param("org", "only this organisation", {"type": "string"}),
            query_param("role", "only this role", {"type": "string", "enum": list(svc.ROLES)}),
            query_param("limit", "page size", {"type": "integer", "minimum": 1}),
            query_param("cursor", "next_cursor of the previous page", {"type": "string"}),
        ),
    ),
    Route(
        "GET",
        "/v1/principals/{name}",
        get_principal,
        "principal.get",
        "One principal and its public keys",
        "principals",
        response="Principal",
        parameters=(path_param("name", "principal name"),),
        errors=(404,),
    ),
    Route(
        "POST",
        "/v1/principals/{name}/disable",
        disable_principal,
        "principal.disable",
        "Disable (offboard) a principal: its signatures refused at once, links to it dead (admin)",
        "principals",
        body="StatusChange",
        response="Principal",
        parameters=(path_param("name", "principal name"),),
        errors=(403, 404, 409),
    ),
    Route(
        "POST",
        "/v1/principals/{name}/enable",
        enable_principal,
        "principal.enable",
        "Re-enable a disabled principal (admin)",
        "principals",
        body="StatusChange",
        response="Principal",
        parameters=(path_param("name", "principal name"),),
        errors=(403, 404, 409),
    ),
    Route(
        "POST",
        "/v1/principals/{name}/reenroll-invite",
        create_reenroll_invite,
        "invite.reenroll",
        "Issue a one-time invite that replaces a principal's lost keys; its headers go (admin)",
        "principals",
        body="ReenrollInviteCreate",
        response="Invite",
        status=201,
        parameters=(path_param("name", "principal name"),),
        errors=(403, 404),
    ),
    Route(
        "POST",
        "/v1/principals/me/keys",
        rotate_keys,
        "principal.rotate",
        "Replace the caller's keys; signed by the old key, with the new signing key's proof",
        "principals",
        body="KeyRotation",
        response="Principal",
        errors=(400, 409),
    ),
    Route(
        "GET",
        "/v1/principals/me/headers",
        own_headers,
        "principal.headers",
        "The caller's own age headers, to re-wrap after a key rotation",
        "principals",
        response="OwnHeaderList",
        parameters=(
            query_param("limit", "page size", {"type": "integer", "minimum": 1}),
            query_param("cursor", "next_cursor of the previous page", {"type": "string"}),
        ),
    ),
    Route(
        "PUT",
        "/v1/artifacts/{id}/header",
        rewrap_header,
        "artifact.rewrap",
        "Replace the caller's own age header of the artifact (re-wrapped for its new age key)",
        "artifacts",
        body="HeaderRewrap",
        response="ArtifactHeader",
        parameters=(path_param("id", "artifact id"),),
        errors=(400, 404, 409),
    ),
]


def schemas(settings: Settings) -> dict[str, Schema]:
    name = name_schema(settings)
    role = {"type": "string", "enum": list(svc.ROLES)}
    principal = obj(
        {
            "id": STR,
            "name": STR,
            "org": STR,
            "role": role,
            "status": {"type": "string", "enum": ["active", "disabled"]},
            "key_id": STR,
            "signing_public_key": {"type": "string", "description": "Ed25519 public key, base64"},
            "age_recipient": {"type": "string", "description": "X25519 age recipient, age1…"},
            "created_at_ms": INT,
            "previous_keys": {
                "type": "array",
                "description": "keys held before a rotation (GET /v1/principals/{name} only): what"
                " they signed still verifies; none of them authenticates",
                "items": obj(
                    {
                        "key_id": STR,
                        "signing_public_key": STR,
                        "age_recipient": STR,
                        "valid_from_ms": INT,
                        "valid_until_ms": INT,
                    },
                    ["key_id", "signing_public_key", "age_recipient", "valid_from_ms", "valid_until_ms"],
                ),
            },
        },
        ["id", "name", "org", "role", "status", "key_id", "signing_public_key", "age_recipient"],
    )
    signing_key = {
        "type": "string",
        "minLength": 44,
        "maxLength": 44,
        "pattern": r"^[A-Za-z0-9+/]{43}=$",
        "x-pattern-hint": "an Ed25519 public key in base64 (32 bytes)",
    }
    age_recipient = {
        "type": "string",
        "format": "age-recipient",
        "minLength": 62,
        "maxLength": 62,
        "pattern": r"^age1[02-9ac-hj-np-z]{58}$",
        "x-pattern-hint": "an age X25519 recipient (age1…) with a valid Bech32 checksum",
        "description": "an X25519 age recipient, age1… in Bech32 (BIP 173) with a valid"
        " checksum, encoding a point of Curve25519; anything else is refused with 400",
    }
    org = obj({"id": STR, "name": STR, "created_at_ms": INT}, ["id", "name", "created_at_ms"])
    return {
        "Principal": principal,
        "PrincipalList": obj(
            {"items": {"type": "array", "items": principal}, "next_cursor": {"type": ["string", "null"]}},
            ["items", "next_cursor"],
        ),
        "Org": org,
        "OrgList": obj({"items": {"type": "array", "items": org}}, ["items"]),
        "OrgCreate": obj({"name": name}, ["name"]),
        "StatusChange": obj(
            {
                "reason": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": 500,
                    "description": "why, for the audit log (it is logged as given)",
                }
            },
            [],
        ),
        "InviteCreate": obj(
            {
                "role": role,
                "org": name,
                "expires_in_s": {
                    "type": "integer",
                    "minimum": 60,
                    "maximum": settings.invite_max_lifetime_s,
                    "description": f"lifetime in seconds (default {settings.invite_default_lifetime_s})",
                },
            },
            ["role", "org"],
        ),
        "ReenrollInviteCreate": obj(
            {
                "expires_in_s": {
                    "type": "integer",
                    "minimum": 60,
                    "maximum": settings.invite_max_lifetime_s,
                    "description": f"lifetime in seconds (default {settings.invite_default_lifetime_s})",
                },
            },
            [],
        ),
        "Invite": obj(
            {
                "id": STR,
                "code": {"type": "string", "description": "one-time code; shown once, stored hashed"},
                "role": role,
                "org": STR,
                "expires_at_ms": INT,
                "reenroll": {"type": "string", "description": "the principal whose keys it replaces"},
            },
            ["id", "code", "role", "org", "expires_at_ms"],
        ),
        "Enroll": obj(
            {
                "code": {"type": "string", "minLength": 1, "maxLength": 128},
                "name": name,
                "signing_public_key": signing_key,
                "age_recipient": age_recipient,
            },
            ["code", "name", "signing_public_key", "age_recipient"],
        ),
        "KeyRotation": obj(
            {
                "signing_public_key": signing_key,
                "age_recipient": age_recipient,
                "proof": {
                    "type": "string",
                    "minLength": 88,
                    "maxLength": 88,
                    "description": "the new signing key's Ed25519 signature (base64) over the text"
                    " 'exchange key rotation v1' / 'principal ID' / 'old KEYID' / 'new KEYID' / 'age"
                    " RECIPIENT', each line ending in a line feed",
                },
            },
            ["signing_public_key", "age_recipient", "proof"],
        ),
        "OwnHeaderList": obj(
            {
                "items": {
                    "type": "array",
                    "items": obj(
                        {"artifact": STR, "header": STR, "created_at_ms": INT},
                        ["artifact", "header", "created_at_ms"],
                    ),
                },
                "next_cursor": {"type": ["string", "null"]},
            },
            ["items", "next_cursor"],
        ),
        "HeaderRewrap": obj(
            {
                "header": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": 4096,
                    "description": "age header, base64",
                }
            },
            ["header"],
        ),
    }
