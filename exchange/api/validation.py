"""Strict JSON request bodies, validated against the schemas the OpenAPI document publishes.

One schema serves both: the document at /openapi.json and the check a handler's body must pass,
so the two cannot drift. Parsing is strict beyond JSON itself: duplicate keys, NaN and Infinity,
and a top level that is not an object are refused. Error messages name the field and the rule,
never echo the value (a refused value may be a secret, such as an invite code).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any

from jsonschema import Draft202012Validator, FormatChecker
from jsonschema import ValidationError as SchemaError
from jsonschema.exceptions import best_match

from ..errors import AgeError, NoteError, UnsupportedMediaType, ValidationError
from ..format import age
from ..format.note import b64decode_canonical

__all__ = ["FORMATS", "BodyValidator", "b64decode_field", "b64encode", "parse_json_object"]

#: The string formats our schemas use, checked where a body is validated: a value the schema
#: admits is one the handler accepts. Only these: JSON Schema's own formats stay annotations.
FORMATS = FormatChecker(formats=())


@FORMATS.checks("age-recipient", raises=AgeError)
def _age_recipient(value: object) -> bool:
    """An X25519 age recipient: `age1…` in Bech32 with a valid checksum, a point of the curve."""
    if isinstance(value, str):
        age.parse_recipient(value)
    return True


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValidationError(f"duplicate key {key[:64]!r} in JSON body")
        seen[key] = value
    return seen


def _reject_constant(name: str) -> Any:
    raise ValidationError(f"{name} is not allowed in JSON bodies")


def parse_json_object(body: bytes, content_type: str) -> dict[str, Any]:
    if content_type != "application/json":
        raise UnsupportedMediaType("send the body as application/json")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValidationError("body is not UTF-8") from exc
    try:
        value = json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise ValidationError(
            f"body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from exc
    except RecursionError as exc:
        raise ValidationError("body is nested too deeply") from exc
    if not isinstance(value, dict):
        raise ValidationError("body must be a JSON object")
    return value


def _where(error: SchemaError) -> str:
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    return f"field {path.lstrip('.')!r}" if path else "body"


def _describe(error: SchemaError) -> str:
    where = _where(error)
    kind = error.validator
    rule: Any = error.validator_value
    schema = error.schema if isinstance(error.schema, Mapping) else {}
    instance: Any = error.instance
    if kind == "additionalProperties":
        extra = sorted(set(instance) - set(schema.get("properties", {})))
        names = ", ".join(repr(n[:64]) for n in extra[:5])
        return f"unknown field{'s' if len(extra) > 1 else ''} {names} in {where}"
    if kind == "required":
        missing = [r for r in rule if r not in instance]
        return f"{where} is missing required field {missing[0]!r}" if missing else f"{where} is incomplete"
    if kind == "type":
        return f"{where} must be of type {rule if isinstance(rule, str) else ' or '.join(rule)}"
    if kind == "enum":
        return f"{where} must be one of: {', '.join(map(str, rule))}"
    if kind == "maxLength":
        return f"{where} is longer than {rule} characters"
    if kind == "minLength":
        return f"{where} is shorter than {rule} characters"
    if kind in ("pattern", "format"):
        hint = schema.get("x-pattern-hint") or "it has characters that are not allowed"
        return f"{where} is not valid: {hint}"
    if kind in ("minimum", "exclusiveMinimum"):
        return f"{where} must be at least {rule + (1 if kind == 'exclusiveMinimum' else 0)}"
    if kind in ("maximum", "exclusiveMaximum"):
        return f"{where} must be at most {rule}"
    return f"{where} is not valid ({kind})"


class BodyValidator:
    """Validates parsed bodies against one JSON Schema (2020-12, as OpenAPI 3.1 uses)."""

    def __init__(self, schema: Mapping[str, Any]) -> None:
        Draft202012Validator.check_schema(schema)
        self._validator = Draft202012Validator(schema, format_checker=FORMATS)

    def validate(self, value: Any) -> None:
        error = best_match(self._validator.iter_errors(value))
        if error is not None:
            raise ValidationError(_describe(error), field=_where(error))


def b64decode_field(value: str, field: str) -> bytes:
    """The bytes of a base64 body field, spelt canonically (standard alphabet, padded, no stray
    bits: one text per value, as `format.note` requires of signatures), or ValidationError naming
    the field."""
    try:
        return b64decode_canonical(value, what=f"field {field!r}")
    except NoteError:
        raise ValidationError(f"field {field!r} is not canonical base64", field=field) from None


def b64encode(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")
