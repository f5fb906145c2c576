"""JSON Schemas (2020-12) of request and response bodies: the API's contract.

Each API module publishes `schemas(settings)` beside its `ROUTES`; `components()` gathers them
with the common ones here. Request schemas are closed (`additionalProperties: false`) and bound
every string, so unknown fields, wrong types and over-long values are refused before a handler
runs. Some bounds come from settings, so the schemas are built per app from its `Settings`.
"""

from __future__ import annotations

from typing import Any

from ..settings import Settings

__all__ = ["INT", "STR", "Schema", "common_schemas", "name_schema", "obj"]

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


def obj(properties: dict[str, Schema], required: list[str], *, closed: bool = True) -> Schema:
    schema: Schema = {"type": "object", "properties": properties, "required": required}
    if closed:
        schema["additionalProperties"] = False
    return schema


INT: Schema = {"type": "integer"}
STR: Schema = {"type": "string"}


def common_schemas(settings: Settings) -> dict[str, Schema]:
    return {
        "Problem": {
            "type": "object",
            "description": "RFC 9457 problem detail",
            "properties": {
                "type": STR,
                "title": STR,
                "status": INT,
                "detail": STR,
                "code": STR,
                "request_id": STR,
            },
            "required": ["type", "title", "status", "detail", "code"],
        },
        "Health": obj({"status": STR, "checks": {"type": "object"}}, ["status"], closed=False),
    }
