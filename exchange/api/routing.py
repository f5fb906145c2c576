"""The route table: each endpoint once, with what it needs, from which the app and the OpenAPI
document are both built.

Authentication is on by default: a route that needs no signature says `auth="none"`, and the
one route that verifies a signature against a key carried in its own body (enrolment) says
`auth="self"` and calls the verifier itself. A signed route a person may open in a browser (an
upload link) names a `page` for a browser that signs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from aiohttp import web

from ..errors import ValidationError
from ..services.audit import Context
from ..services.principals import Principal

__all__ = ["BODY", "CTX", "PRINCIPAL", "ROUTE", "Route"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
T = TypeVar("T")


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    operation_id: str
    summary: str
    tag: str
    auth: Literal["signature", "none", "self"] = "signature"
    #: Name of the request body's schema (from its module's schemas()), if it takes a JSON body.
    body: str | None = None
    #: Name of the success response's schema, and its status.
    response: str | None = None
    status: int = 200
    #: OpenAPI parameter objects for the query string and path.
    parameters: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    #: Error statuses worth documenting beyond the ones every route can give.
    errors: tuple[int, ...] = ()
    #: Audit action name for refusals of this route (and for its own events, by convention).
    action: str = ""
    #: What a browser that signs nothing is shown instead of a 401 (`api.pages.wants_page`): a
    #: help page saying what the URL is and how to use it. It runs unauthenticated, so it must
    #: look nothing up.
    page: Handler | None = None

    @property
    def audit_action(self) -> str:
        return self.action or self.operation_id


# Per-request values the pipeline middleware sets for handlers.
CTX = web.RequestKey("exchange.ctx", Context)
PRINCIPAL = web.RequestKey("exchange.principal", Principal)
BODY = web.RequestKey("exchange.body", dict)
ROUTE = web.RequestKey("exchange.route", Route)


def page_limit(request: web.Request, default: int, maximum: int) -> int:
    """The `limit` query parameter of a list endpoint, within 1..maximum."""
    try:
        limit = int(request.query.get("limit", default))
    except ValueError:
        raise ValidationError("query parameter 'limit' must be an integer", field="limit") from None
    if not 1 <= limit <= maximum:
        raise ValidationError(f"query parameter 'limit' must be between 1 and {maximum}", field="limit")
    return limit


def time_cursor(request: web.Request) -> tuple[int, str] | None:
    """The `cursor` of a list ordered by (created_at_ms, id), newest first: `MS:ID`, as the
    previous page's `next_cursor` gave it; None on the first page."""
    text = request.query.get("cursor")
    if not text:
        return None
    ms, _, ident = text.partition(":")
    if not (ms.isascii() and ms.isdigit() and len(ms) <= 18) or not ident:
        raise ValidationError("query parameter 'cursor' is not a cursor this service gave", field="cursor")
    return int(ms), ident


def time_page(
    items: Sequence[T], limit: int, key: Callable[[T], tuple[int, str]]
) -> tuple[Sequence[T], str | None]:
    """A page of `limit` items out of `limit + 1` fetched, and the cursor to the next (None: last)."""
    if len(items) <= limit:
        return items, None
    page = items[:limit]
    ms, ident = key(page[-1])
    return page, f"{ms}:{ident}"


@asynccontextmanager
async def running(work: Coroutine[Any, Any, None]) -> AsyncIterator[None]:
    """Run a background task for the life of the block (a cleanup context), then cancel it."""
    task = asyncio.create_task(work)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def query_param(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


def path_param(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string"},
    }
