"""The OpenAPI 3.1 document, built from the route table and the schemas — never by hand."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from .. import __version__
from ..settings import Settings
from .routing import Route
from .schemas import Schema

__all__ = ["build_document"]

_COMMON_ERRORS = {
    400: "Invalid input",
    401: "Not authenticated",
    408: "Body not received in time",
    413: "Body too large",
    415: "Not JSON",
    429: "Too many requests (see Retry-After)",
}
_ERROR_TEXT = {403: "Forbidden", 404: "Not found", 409: "Conflict", 503: "Unavailable"}


def _problem(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }


def _operation(route: Route) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": route.operation_id,
        "summary": route.summary,
        "tags": [route.tag],
    }
    if route.parameters:
        op["parameters"] = list(route.parameters)
    if route.body:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{route.body}"}}},
        }
    ok: dict[str, Any] = {"description": "Success"}
    if route.response:
        ok["content"] = {"application/json": {"schema": {"$ref": f"#/components/schemas/{route.response}"}}}
    responses: dict[str, Any] = {str(route.status): ok}
    statuses = (
        set(route.errors)
        | ({400, 413, 415} if route.body else set())
        | ({400} if route.parameters else set())
    )
    if route.body:
        statuses.add(408)  # the body did not arrive within EXCHANGE_HTTP_BODY_TIMEOUT_S
    if route.auth != "none":
        # Unauthenticated refusals spend the source's failure budget; once it is spent, the
        # source's requests to these routes are refused up front (api/refusals.py).
        statuses |= {401, 429}
    for status in sorted(statuses):
        responses[str(status)] = _problem(_COMMON_ERRORS.get(status) or _ERROR_TEXT.get(status, "Error"))
    op["responses"] = responses
    if route.auth == "none":
        op["security"] = []
    return op


def build_document(routes: Sequence[Route], schemas: dict[str, Schema], settings: Settings) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        # A path parameter with a pattern ("{index:.+}", several segments) is documented by name.
        path = re.sub(r"\{(\w+):[^{}]+\}", r"{\1}", route.path)
        paths.setdefault(path, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "exchange",
            "version": __version__,
            "description": (
                "Hands pre-release model artifacts to named testers, end-to-end encrypted, and keeps a"
                " verifiable log of every access. Requests are signed with RFC 9421 HTTP Message"
                " Signatures (Ed25519) covering @method, @target-uri and content-digest, with created,"
                " nonce and keyid parameters."
            ),
        },
        "servers": [{"url": settings.effective_public_url}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "httpMessageSignature": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "Signature",
                    "description": "RFC 9421 signature; see Signature-Input for its parameters",
                }
            },
        },
        "security": [{"httpMessageSignature": []}],
    }
