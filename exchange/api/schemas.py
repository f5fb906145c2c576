"""JSON Schemas (2020-12) of request and response bodies: the API's contract.

Request schemas are closed (`additionalProperties: false`) and bound every string, so unknown
fields, wrong types and over-long values are refused before a handler runs. Some bounds come
from settings, so the schemas are built per app from its `Settings`.
"""

from __future__ import annotations

from typing import Any

from ..services.principals import ROLES
from ..settings import Settings

__all__ = ["components"]

Schema = dict[str, Any]

#: Names of principals and organisations: printable ASCII without spaces, starting alphanumeric.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]*$"
NAME_HINT = "use letters, digits and . _ @ - only, starting with a letter or digit"


def name_schema(settings: Settings) -> Schema:
    return {
        "type": "string",
        "minLength": 1,
        "maxLength": settings.name_max_chars,
        "pattern": NAME_PATTERN,
        "x-pattern-hint": NAME_HINT,
    }


def _obj(properties: dict[str, Schema], required: list[str], *, closed: bool = True) -> Schema:
    schema: Schema = {"type": "object", "properties": properties, "required": required}
    if closed:
        schema["additionalProperties"] = False
    return schema


_INT = {"type": "integer"}
_STR = {"type": "string"}


def components(settings: Settings) -> dict[str, Schema]:
    name = name_schema(settings)
    role = {"type": "string", "enum": list(ROLES)}
    principal = _obj(
        {
            "id": _STR,
            "name": _STR,
            "org": _STR,
            "role": role,
            "status": {"type": "string", "enum": ["active", "disabled"]},
            "key_id": _STR,
            "signing_public_key": {"type": "string", "description": "Ed25519 public key, base64"},
            "age_recipient": {"type": "string", "description": "X25519 age recipient, age1…"},
            "created_at_ms": _INT,
        },
        ["id", "name", "org", "role", "status", "key_id", "signing_public_key", "age_recipient"],
    )
    org = _obj({"id": _STR, "name": _STR, "created_at_ms": _INT}, ["id", "name", "created_at_ms"])
    return {
        "Problem": {
            "type": "object",
            "description": "RFC 9457 problem detail",
            "properties": {
                "type": _STR,
                "title": _STR,
                "status": _INT,
                "detail": _STR,
                "code": _STR,
                "request_id": _STR,
            },
            "required": ["type", "title", "status", "detail", "code"],
        },
        "Health": _obj({"status": _STR, "checks": {"type": "object"}}, ["status"], closed=False),
        "Principal": principal,
        "PrincipalList": _obj(
            {"items": {"type": "array", "items": principal}, "next_cursor": {"type": ["string", "null"]}},
            ["items", "next_cursor"],
        ),
        "Org": org,
        "OrgList": _obj({"items": {"type": "array", "items": org}}, ["items"]),
        "OrgCreate": _obj({"name": name}, ["name"]),
        "InviteCreate": _obj(
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
        "Invite": _obj(
            {
                "id": _STR,
                "code": {"type": "string", "description": "one-time code; shown once, stored hashed"},
                "role": role,
                "org": _STR,
                "expires_at_ms": _INT,
            },
            ["id", "code", "role", "org", "expires_at_ms"],
        ),
        "Enroll": _obj(
            {
                "code": {"type": "string", "minLength": 1, "maxLength": 128},
                "name": name,
                "signing_public_key": {
                    "type": "string",
                    "minLength": 44,
                    "maxLength": 44,
                    "pattern": r"^[A-Za-z0-9+/]{43}=$",
                    "x-pattern-hint": "an Ed25519 public key in base64 (32 bytes)",
                },
                "age_recipient": {
                    "type": "string",
                    "minLength": 10,
                    "maxLength": 100,
                    "pattern": r"^age1[02-9ac-hj-np-z]+$",
                    "x-pattern-hint": "an age X25519 recipient (age1…)",
                },
            },
            ["code", "name", "signing_public_key", "age_recipient"],
        ),
    }
