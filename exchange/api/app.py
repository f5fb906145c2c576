"""The application factory and the request pipeline every route goes through.

`create_app(settings)` builds the app from the route table; one cleanup context opens and closes
every resource (database, storage client, background tasks). First, `api.forwarded` puts the
client's address in `request.remote` when the peer is a trusted proxy (`trusted_proxies`), so that
every limit and audit event downstream names the client. The pipeline middleware gives each
request an id and an audit context, enforces the body limit, authenticates (unless the route
says otherwise), parses and validates the JSON body against the route's schema, and turns every
error into a problem detail — accounting for each refusal through `api.refusals`, which also
answers 429 up front to a source that has spent its budget of refused unauthenticated requests.
It also counts each request into the app's metrics (`api.metrics`, by route template), sets
`REQUEST_ID` for the logs written while the request is handled, and keeps the requests in flight
(`IN_FLIGHT`) so that a stopping server can let them finish (`server.run_until_stopped`).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import secrets
import time
from collections.abc import Callable

from aiohttp import web

from ..errors import BodyTimeout, ExchangeError, PayloadTooLarge, RateLimited, ValidationError
from ..services.audit import Context
from ..settings import Settings
from . import (
    artifacts,
    audit,
    auditproofs,
    findings,
    forwarded,
    health,
    links,
    metrics,
    pages,
    principals,
    refusals,
    tiles,
    uploadlinks,
)
from .auth import authenticate, require_active
from .keys import AUDIT, CLOCK, OPENAPI, SETTINGS, VALIDATORS
from .lifetime import lifetime
from .openapi import build_document
from .problems import from_exchange_error, from_http_exception, internal_error, problem_response
from .routing import BODY, CTX, PRINCIPAL, ROUTE, Handler, Route
from .schemas import Schema
from .validation import BodyValidator, parse_json_object

__all__ = ["IN_FLIGHT", "REQUEST_ID", "ROUTES", "InFlight", "create_app"]

log = logging.getLogger("exchange.api")
#: One line per request (method, route template, status, time), at INFO; `exchange serve` turns
#: it on with `log_format=json`, where each line carries its request id.
access_log = logging.getLogger("exchange.access")

#: The API, by subject. Each module has ROUTES and schemas(settings); adding one here is all it takes.
MODULES = (health, principals, audit, artifacts, links, uploadlinks, findings, auditproofs, tiles, pages)
ROUTES: list[Route] = [route for module in MODULES for route in module.ROUTES]


def components(settings: Settings) -> dict[str, Schema]:
    """Every module's schemas, by name; a name defined twice is a bug caught at start-up."""
    merged: dict[str, Schema] = {}
    for module in MODULES:
        for name, schema in module.schemas(settings).items():
            if name in merged:
                raise RuntimeError(f"schema {name} is defined twice")
            merged[name] = schema
    return merged


_ROUTE_BY_HANDLER = web.AppKey("route_by_resource", dict[tuple[str, str], Route])
#: User agents and request ids from clients are cut to this length before they are recorded.
_MAX_HEADER_ECHO = 256


#: The id of the request being handled, for log records (`server`'s JSON format writes it).
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("exchange_request_id", default=None)


class InFlight:
    """The tasks of the requests inside the pipeline, so that shutting down can wait for them."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[object]] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> asyncio.Task[object] | None:
        task = asyncio.current_task()
        if task is not None:
            self.tasks.add(task)
            self._idle.clear()
        return task

    def leave(self, task: asyncio.Task[object] | None) -> None:
        self.tasks.discard(task)
        if not self.tasks:
            self._idle.set()

    async def drain(self, timeout_s: float) -> int:
        """Wait until no request is in flight, at most `timeout_s`; cancel the ones left and
        return how many there were."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            pass
        left = list(self.tasks)
        for task in left:
            task.cancel()
        return len(left)


IN_FLIGHT = web.AppKey("in_flight", InFlight)


def system_clock() -> int:
    return time.time_ns() // 1_000_000


def _request_context(request: web.Request) -> Context:
    supplied = request.headers.get("X-Request-Id", "")
    # Accept a client's request id only if it is short and plain; otherwise make one.
    if not (0 < len(supplied) <= 64 and supplied.replace("-", "").replace("_", "").isalnum()):
        supplied = secrets.token_hex(8)
    ua = request.headers.get("User-Agent")
    return Context(ip=request.remote, user_agent=ua[:_MAX_HEADER_ECHO] if ua else None, request_id=supplied)


async def _read_body(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"the request body is over the limit of {limit} bytes")
    # The whole body within one deadline, not per chunk: a client sending a byte a second would
    # otherwise hold its connection (and this task) for as long as it likes.
    timeout_s = request.app[SETTINGS].http_body_timeout_s
    try:
        async with asyncio.timeout(timeout_s):
            return await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise PayloadTooLarge(f"the request body is over the limit of {limit} bytes") from exc
    except TimeoutError as exc:
        raise BodyTimeout(f"the request body did not arrive within {timeout_s:g} s; send it faster") from exc


@web.middleware
async def pipeline(request: web.Request, handler: Handler) -> web.StreamResponse:
    app = request.app
    request[CTX] = ctx = _request_context(request)
    info = request.match_info
    route = (
        app[_ROUTE_BY_HANDLER].get((request.method, info.route.resource.canonical))
        if (info.route.resource is not None)
        else None
    )
    started = time.perf_counter()
    token = REQUEST_ID.set(ctx.request_id)
    in_flight = app[IN_FLIGHT]
    task = in_flight.enter()
    status = 500  # what a cancelled or crashed request counts as
    try:
        response = await _handle(request, handler, route)
        status = response.status
        return response
    except web.HTTPException as exc:  # a redirect raised by a handler: aiohttp answers it
        status = exc.status
        raise
    finally:
        in_flight.leave(task)
        seconds = time.perf_counter() - started
        path = route.path if route is not None else None
        app[metrics.METRICS].observe_request(path, request.method, status, seconds)
        if access_log.isEnabledFor(logging.INFO):
            # The route's template, never the path: a path may carry a link token.
            access_log.info(
                "%s %s %d %.1f ms", request.method[:16], path or "(unmatched)", status, seconds * 1000
            )
        REQUEST_ID.reset(token)


async def _handle(request: web.Request, handler: Handler, route: Route | None) -> web.StreamResponse:
    app = request.app
    ctx = request[CTX]
    try:
        refused = request.get(forwarded.FORWARDED_REFUSAL)
        if refused is not None:  # a trusted proxy's unusable X-Forwarded-For: nothing else is done
            raise refused
        await refusals.gate(request, route)  # before the body, the signature and the database
        if route is None:
            response = await handler(request)  # aiohttp's own 404/405 handlers
        elif route.page is not None and pages.wants_page(request):
            request[ROUTE] = route
            response = await route.page(request)  # a browser's help page, instead of a 401
        else:
            request[ROUTE] = route
            body = await _read_body(request, app[SETTINGS].max_body_bytes)
            if route.auth == "signature":
                principal = await authenticate(request)
                request[PRINCIPAL] = principal
                request[CTX] = ctx = Context(
                    actor=principal.actor, ip=ctx.ip, user_agent=ctx.user_agent, request_id=ctx.request_id
                )
                require_active(principal)
                refusals.signed_from(request, principal.key_id)
            if route.body:
                parsed = parse_json_object(body, request.content_type)
                app[VALIDATORS][route.body].validate(parsed)
                request[BODY] = parsed
            response = await handler(request)
    except ExchangeError as exc:
        await refusals.record(request, route, exc.audit_reason, exc.status)
        retry = exc.extra.get("retry_after_s") if isinstance(exc, RateLimited) else None
        headers = {"Retry-After": str(retry)} if retry is not None else None
        response = problem_response(from_exchange_error(exc, ctx.request_id), headers=headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        problem = from_http_exception(exc, ctx.request_id)
        await refusals.record(request, route, problem["code"], exc.status)
        # Keep what the refusal must carry (RFC 9110: a 405 lists the allowed methods in Allow).
        kept = {k: v for k, v in exc.headers.items() if k in ("Allow",)}
        response = problem_response(problem, headers=kept)
    except (asyncio.CancelledError, KeyboardInterrupt):
        raise
    except Exception:
        log.exception("unhandled error in request %s", ctx.request_id)
        response = problem_response(internal_error(ctx.request_id))
    if not response.prepared:
        response.headers["X-Request-Id"] = ctx.request_id or ""
    return response


def create_app(settings: Settings, *, clock: Callable[[], int] = system_clock) -> web.Application:
    if not settings.s3_endpoint:
        raise ValidationError("settings.s3_endpoint is empty: the service needs an S3 store")
    # The client's address first: the pipeline's refusal gate, limits and audit context use it.
    app = web.Application(
        middlewares=[forwarded.middleware, pipeline], client_max_size=settings.max_body_bytes
    )
    app[SETTINGS] = settings
    app[forwarded.TRUSTED_PROXIES] = forwarded.TrustedProxies.from_settings(settings)
    app[CLOCK] = clock
    app[IN_FLIGHT] = InFlight()
    counted = metrics.setup(app, clock)
    app[AUDIT] = metrics.CountingAuditLog(origin=settings.log_origin, clock=clock, metrics=counted)
    schemas = components(settings)
    app[VALIDATORS] = {r.body: BodyValidator(schemas[r.body]) for r in ROUTES if r.body}
    app[OPENAPI] = build_document(ROUTES, schemas, settings)
    by_resource: dict[tuple[str, str], Route] = {}
    for route in ROUTES:
        added = app.router.add_route(route.method, route.path, route.handler)
        # Keyed as requests find it: a pattern ("{index:.+}") is dropped from the canonical path.
        assert added.resource is not None
        by_resource[(route.method, added.resource.canonical)] = route
    app[_ROUTE_BY_HANDLER] = by_resource
    app.cleanup_ctx.append(lifetime)  # everything opened, run and closed: api/lifetime.py
    return app
