"""The auditors' console's local web server: one page, its static files, and a JSON API.

It runs on the auditor's own machine, bound to 127.0.0.1, and signs its calls to the exchange
service with the auditor's identity: the private key stays in this process, the browser sees
only verified JSON (`console.data`). Who may talk to it:

* The address it prints holds a one-time key (32 random bytes). `GET /?key=KEY` with that key,
  once, answers 303 to `/` with a session cookie (`exchange_console`: new random bytes,
  HttpOnly, SameSite=Strict); the key is then spent. Keys and cookies are compared in constant
  time. Anything else without the cookie is 401.
* The Host header must name this server (`127.0.0.1:PORT` or `localhost:PORT`), else 421: a
  page elsewhere cannot reach it by rebinding a DNS name to 127.0.0.1.
* Only GET and HEAD (405 otherwise): the console reads, it never changes anything.
* Every response carries a strict CSP (no inline script or style), no-referrer, nosniff,
  no-store and same-origin opener isolation. Errors are RFC 9457 problem details.

No access log is kept, and nothing here logs a URL's query string: the key travels in one.

What this module does not do: verify anything (`console.data` does), or serve anything but the
files under `static/` and the routes below.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from ..errors import AuditEventUnverified, AuthError, ExchangeError, PermissionDenied, ValidationError
from .data import Console, parse_filters, parse_span

__all__ = ["COOKIE", "CSP", "SECURITY_HEADERS", "STATIC", "Access", "create_console_app"]

log = logging.getLogger("exchange.console")

STATIC = Path(__file__).parent / "static"
#: As the service names its problems: this prefix and the problem's code.
PROBLEM_TYPE_PREFIX = "urn:exchange:problem:"
COOKIE = "exchange_console"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
}
#: What the console serves from static/, by suffix; any other file is not served.
CONTENT_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
    ".json": "application/json",
    ".map": "application/json",
    ".txt": "text/plain",
}
_TEXT = {".html", ".js", ".mjs", ".css", ".svg", ".json", ".map", ".txt"}
_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_ARTIFACT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_IDX = re.compile(r"[0-9]{1,16}")

_UNAUTHORISED_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>exchange audit console</title></head>
<body><h1>Not signed in</h1>
<p>Open the address the console printed when it started (it holds a one-time key), or start
<code>exchange audit console</code> again for a new one.</p></body></html>
"""

ACCESS: web.AppKey[Access] = web.AppKey("console_access")
CONSOLE: web.AppKey[Console] = web.AppKey("console_data")


def _token() -> str:
    return secrets.token_urlsafe(32)


class Access:
    """The one-time key, the one session it opens, and the port the Host header must name."""

    def __init__(self) -> None:
        self.key = _token()
        self.session: str | None = None
        self.port = 0

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/?key={self.key}"

    def redeem(self, offered: str) -> str | None:
        """A new session for the key, if `offered` is it and it was never used; None otherwise."""
        if self.session is not None or not hmac.compare_digest(offered.encode(), self.key.encode()):
            return None
        self.session = _token()
        return self.session

    def admits(self, cookie: str | None) -> bool:
        session = self.session
        return (
            session is not None
            and cookie is not None
            and hmac.compare_digest(cookie.encode(), session.encode())
        )

    def host_ok(self, host: str | None) -> bool:
        return host in (f"127.0.0.1:{self.port}", f"localhost:{self.port}")


def _problem(status: int, code: str, title: str, detail: str, **extra: Any) -> web.Response:
    """An RFC 9457 problem detail, shaped as the service's (`api/problems.py`), which this
    client-side server does not import."""
    body = {
        "type": PROBLEM_TYPE_PREFIX + code,
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
    }
    return web.Response(status=status, text=json.dumps(body | extra), content_type="application/problem+json")


def _error(exc: ExchangeError) -> web.Response:
    """An error as the page sees it. The service's refusal of the auditor's own identity is the
    console's upstream failing (502), not the page's session (which 401 means here)."""
    if isinstance(exc, AuditEventUnverified):
        return _problem(
            409,
            exc.code,
            exc.title,
            exc.message,
            **{"class": exc.extra.get("check", "entries"), "idx": exc.extra.get("idx")},
        )
    if isinstance(exc, AuthError | PermissionDenied):
        return _problem(
            502, "service-refused", "The exchange service refused the auditor", f"the service: {exc.message}"
        )
    status = exc.status if 400 <= exc.status < 600 else 500
    return _problem(status, exc.code, exc.title, exc.message)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Host, method, then the key or the cookie; and every error as a problem detail."""
    access = request.app[ACCESS]
    if not access.host_ok(request.headers.get("Host")):
        return _problem(
            421, "misdirected", "Misdirected request", "this console answers only to its own address"
        )
    if request.method not in ("GET", "HEAD"):
        response = _problem(
            405, "method-not-allowed", "Method not allowed", "the console only reads: GET or HEAD"
        )
        response.headers["Allow"] = "GET, HEAD"
        return response
    if request.path == "/" and "key" in request.query:
        session = access.redeem(request.query["key"])
        if session is None:
            return _problem(401, "key-spent", "Unauthorised", "this key is wrong or was used already")
        response = web.Response(status=303, headers={"Location": "/"})
        response.set_cookie(COOKIE, session, httponly=True, samesite="Strict", path="/")
        return response
    if not access.admits(request.cookies.get(COOKIE)):
        if request.path == "/":
            return web.Response(
                status=401, text=_UNAUTHORISED_PAGE, content_type="text/html", charset="utf-8"
            )
        return _problem(401, "unauthorised", "Unauthorised", "open the address the console printed")
    try:
        return await handler(request)
    except ExchangeError as exc:
        return _error(exc)
    except web.HTTPException as exc:
        if exc.status == 404:
            return _problem(404, "not-found", "Not found", "no such page or file")
        return _problem(exc.status, "http-error", exc.reason, exc.reason)
    except Exception:
        log.exception("console: unexpected error answering %s %s", request.method, request.path)
        return _problem(500, "internal-error", "Internal error", "the console failed; see its terminal")


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(SECURITY_HEADERS)


def _static_file(relative: str) -> web.Response:
    parts = relative.split("/")
    if not parts or not all(_SEGMENT.fullmatch(p) for p in parts):
        raise web.HTTPNotFound()
    path = STATIC.joinpath(*parts)
    content_type = CONTENT_TYPES.get(path.suffix)
    try:
        resolved = path.resolve(strict=True)
        inside = resolved.is_relative_to(STATIC.resolve()) and resolved.is_file()
    except OSError:
        inside = False
    if content_type is None or not inside:
        raise web.HTTPNotFound()
    charset = "utf-8" if path.suffix in _TEXT else None
    return web.Response(body=resolved.read_bytes(), content_type=content_type, charset=charset)


async def index(request: web.Request) -> web.Response:
    return _static_file("index.html")


async def static(request: web.Request) -> web.Response:
    return _static_file(request.match_info["path"])


async def api_state(request: web.Request) -> web.Response:
    parse_span(request.query, allowed=())
    return web.json_response(await request.app[CONSOLE].state())


async def api_events(request: web.Request) -> web.Response:
    filters, limit, cursor = parse_filters(request.query)
    return web.json_response(await request.app[CONSOLE].events(filters, limit=limit, cursor=cursor))


async def api_timeline(request: web.Request) -> web.Response:
    parse_span(request.query, allowed=())
    artifact_id = request.match_info["artifact_id"]
    if not _ARTIFACT_ID.fullmatch(artifact_id):
        raise ValidationError("not an artifact id", field="artifact_id")
    return web.json_response(await request.app[CONSOLE].timeline(artifact_id))


async def api_charts(request: web.Request) -> web.Response:
    return web.json_response(await request.app[CONSOLE].charts(parse_span(request.query)))


async def api_export(request: web.Request) -> web.Response:
    fmt = request.query.get("format", "")
    if fmt not in ("jsonl", "csv"):
        raise ValidationError("query parameter 'format' must be jsonl or csv", field="format")
    filters, _, cursor = parse_filters(request.query, extra=("format",))
    if cursor is not None or "limit" in request.query:
        raise ValidationError("an export reads every page: no 'cursor' or 'limit'", field="cursor")
    body = await request.app[CONSOLE].export(filters, fmt)
    return web.Response(
        text=body,
        content_type="text/csv" if fmt == "csv" else "application/jsonl",
        charset="utf-8",
        headers={"Content-Disposition": f'attachment; filename="exchange-events.{fmt}"'},
    )


async def api_proof(request: web.Request) -> web.Response:
    parse_span(request.query, allowed=())
    raw = request.match_info["idx"]
    if not _IDX.fullmatch(raw):
        raise ValidationError("an event's idx is a decimal number", field="idx")
    data = await request.app[CONSOLE].proof(int(raw))
    return web.Response(
        body=data,
        content_type="text/plain",
        charset="utf-8",
        headers={"Content-Disposition": f'attachment; filename="event-{int(raw)}.tlog-proof"'},
    )


def create_console_app(console: Console, access: Access) -> web.Application:
    app = web.Application(middlewares=[guard])
    app[CONSOLE] = console
    app[ACCESS] = access
    app.on_response_prepare.append(_security_headers)
    app.router.add_get("/", index)
    app.router.add_get("/static/{path:.+}", static)
    app.router.add_get("/api/state", api_state)
    app.router.add_get("/api/events", api_events)
    app.router.add_get("/api/artifacts/{artifact_id}/timeline", api_timeline)
    app.router.add_get("/api/charts", api_charts)
    app.router.add_get("/api/export", api_export)
    app.router.add_get("/api/proof/{idx}", api_proof)
    return app
