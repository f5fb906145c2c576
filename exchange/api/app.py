"""The application factory and the request pipeline every route goes through.

`create_app(settings)` builds the app from the route table; one cleanup context opens and closes
every resource (database, storage client, background tasks). The pipeline middleware gives each
request an id and an audit context, enforces the body limit, authenticates (unless the route
says otherwise), parses and validates the JSON body against the route's schema, and turns every
error into a problem detail — recording each refusal in the audit log.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from ..db import Database, connect, migrate
from ..errors import DependencyError, ExchangeError, PayloadTooLarge
from ..services.audit import AuditLog, Context, Outcome
from ..settings import Settings
from ..storage import Storage
from . import artifacts, audit, findings, health, links, principals, uploadlinks
from .auth import authenticate, purge_nonces
from .keys import AUDIT, CLOCK, DB, OPENAPI, SETTINGS, STORAGE, VALIDATORS
from .openapi import build_document
from .problems import from_exchange_error, from_http_exception, internal_error, problem_response
from .routing import BODY, CTX, PRINCIPAL, ROUTE, Handler, Route, running
from .schemas import Schema
from .validation import BodyValidator, parse_json_object

__all__ = ["ROUTES", "create_app"]

log = logging.getLogger("exchange.api")

#: The API, by subject. Each module has ROUTES and schemas(settings); adding one here is all it takes.
MODULES = (health, principals, audit, artifacts, links, uploadlinks, findings)
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


def system_clock() -> int:
    return time.time_ns() // 1_000_000


def _request_context(request: web.Request) -> Context:
    supplied = request.headers.get("X-Request-Id", "")
    # Accept a client's request id only if it is short and plain; otherwise make one.
    if not (0 < len(supplied) <= 64 and supplied.replace("-", "").replace("_", "").isalnum()):
        supplied = secrets.token_hex(8)
    ua = request.headers.get("User-Agent")
    return Context(ip=request.remote, user_agent=ua[:_MAX_HEADER_ECHO] if ua else None, request_id=supplied)


async def _record_refusal(request: web.Request, route: Route | None, code: str, status: int) -> None:
    """A refused request changes nothing but the log: one event, in a transaction of its own.

    The event names the route's template, never the path as sent: paths may carry capabilities.
    """
    app = request.app
    ctx = request[CTX]
    outcome: Outcome = "error" if status >= 500 else "denied"
    details = {"method": request.method[:16], "route": route.path if route else None, "status": status}
    try:
        async with app[DB].transaction() as conn:
            await app[AUDIT].append(
                conn,
                ctx,
                action=route.audit_action if route else "http.request",
                outcome=outcome,
                reason=code,
                details=details,
            )
    except DependencyError:
        log.warning("could not record refusal %s of request %s: database unavailable", code, ctx.request_id)


async def _read_body(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"the request body is over the limit of {limit} bytes")
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise PayloadTooLarge(f"the request body is over the limit of {limit} bytes") from exc


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
    try:
        if route is None:
            response = await handler(request)  # aiohttp's own 404/405 handlers
        else:
            request[ROUTE] = route
            body = await _read_body(request, app[SETTINGS].max_body_bytes)
            if route.auth == "signature":
                principal = await authenticate(request)
                request[PRINCIPAL] = principal
                request[CTX] = ctx = Context(
                    actor=principal.actor, ip=ctx.ip, user_agent=ctx.user_agent, request_id=ctx.request_id
                )
            if route.body:
                parsed = parse_json_object(body, request.content_type)
                app[VALIDATORS][route.body].validate(parsed)
                request[BODY] = parsed
            response = await handler(request)
    except ExchangeError as exc:
        await _record_refusal(request, route, exc.audit_reason, exc.status)
        response = problem_response(from_exchange_error(exc, ctx.request_id))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        problem = from_http_exception(exc, ctx.request_id)
        await _record_refusal(request, route, problem["code"], exc.status)
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


async def _resources(app: web.Application) -> AsyncIterator[None]:
    """Open every shared resource on start-up and close it on shutdown, in reverse order."""
    settings = app[SETTINGS]
    db: Database = await connect(settings.effective_database_url)
    try:
        await migrate(db)
        app[DB] = db
        storage = Storage(
            endpoint=settings.s3_endpoint,
            public_endpoint=settings.effective_s3_public_endpoint,
            region=settings.s3_region,
            bucket=settings.s3_bucket,
            access_key_id=settings.s3_access_key_id,
            secret_access_key=settings.s3_secret_access_key,
            timeout_s=settings.storage_timeout_s,
        )
        app[STORAGE] = storage
        try:
            async with running(_purge_nonces_forever(app)):
                yield
        finally:
            await storage.close()
    finally:
        await db.close()


async def _purge_nonces_forever(app: web.Application, interval_s: float = 60.0) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            await purge_nonces(app[DB], app[CLOCK]())
        except DependencyError:
            log.warning("nonce purge skipped: database unavailable")


def create_app(settings: Settings, *, clock: Callable[[], int] = system_clock) -> web.Application:
    if not settings.s3_endpoint:
        raise ValueError("settings.s3_endpoint is empty: the service needs an S3 store")
    app = web.Application(middlewares=[pipeline], client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[CLOCK] = clock
    app[AUDIT] = AuditLog(origin=settings.log_origin, clock=clock)
    schemas = components(settings)
    app[VALIDATORS] = {r.body: BodyValidator(schemas[r.body]) for r in ROUTES if r.body}
    app[OPENAPI] = build_document(ROUTES, schemas, settings)
    by_resource: dict[tuple[str, str], Route] = {}
    for route in ROUTES:
        app.router.add_route(route.method, route.path, route.handler)
        by_resource[(route.method, route.path)] = route
    app[_ROUTE_BY_HANDLER] = by_resource
    app.cleanup_ctx.append(_resources)
    app.cleanup_ctx.append(artifacts.sweep_abandoned_uploads)  # after _resources: it needs them
    app.cleanup_ctx.append(audit.publisher_ctx)  # after _resources: it needs the database
    app.cleanup_ctx.append(links.rate_limits)
    return app
