"""The one place errors become HTTP responses: RFC 9457 problem details.

Every error response is `application/problem+json` with `type` (a URN naming the problem's
stable code), `title`, `status`, `detail` (a sentence for a person), `code` and the request id.
A refused request (4xx) also leaves an audit event, written in its own transaction since the
refused change itself never happened. Unexpected exceptions are logged with their traceback on
the server and answered with a bare 500: no traceback, no internal URL reaches the client.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import web

from ..errors import ExchangeError

__all__ = ["PROBLEM_TYPE_PREFIX", "problem_body", "problem_response"]

log = logging.getLogger("exchange.api")

PROBLEM_TYPE_PREFIX = "urn:exchange:problem:"
PROBLEM_CONTENT_TYPE = "application/problem+json"


def problem_body(
    *, status: int, code: str, title: str, detail: str, request_id: str | None, **extra: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_PREFIX + code,
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
    }
    if request_id:
        body["request_id"] = request_id
    body.update({k: v for k, v in extra.items() if k not in body})
    return body


def problem_response(body: dict[str, Any], *, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=int(body["status"]),
        text=json.dumps(body),
        content_type=PROBLEM_CONTENT_TYPE,
        headers=headers,
    )


def from_exchange_error(exc: ExchangeError, request_id: str | None) -> dict[str, Any]:
    return problem_body(
        status=exc.status,
        code=exc.code,
        title=exc.title,
        detail=exc.message,
        request_id=request_id,
        **exc.extra,
    )


# aiohttp's own refusals (unknown route, wrong method, body over client_max_size), by status.
_HTTP_CODES = {
    404: ("not-found", "Not found", "no such endpoint"),
    405: ("method-not-allowed", "Method not allowed", "this endpoint does not accept that method"),
    413: ("payload-too-large", "Request body too large", "the request body is over the size limit"),
}


def from_http_exception(exc: web.HTTPException, request_id: str | None) -> dict[str, Any]:
    code, title, detail = _HTTP_CODES.get(
        exc.status, ("bad-request" if exc.status < 500 else "internal-error", exc.reason, exc.reason)
    )
    return problem_body(status=exc.status, code=code, title=title, detail=detail, request_id=request_id)


def internal_error(request_id: str | None) -> dict[str, Any]:
    return problem_body(
        status=500,
        code="internal-error",
        title="Internal error",
        detail="the service failed to handle this request; it has been logged under this request id",
        request_id=request_id,
    )
