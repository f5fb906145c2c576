"""Liveness, readiness and the API description: the routes that need no signature."""

from __future__ import annotations

import asyncio

from aiohttp import web

from ..errors import AuditLogDamaged, ExchangeError
from ..settings import Settings
from .keys import AUDIT, DB, OPENAPI, SETTINGS, STORAGE
from .problems import problem_body, problem_response
from .routing import CTX, Route
from .schemas import Schema, common_schemas

__all__ = ["ROUTES", "schemas"]


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when the database and the storage both answer within the storage timeout, and the
    audit log passed this process's integrity checks (a damaged log does not heal by waiting)."""
    timeout = request.app[SETTINGS].storage_timeout_s
    checks: dict[str, str] = {}

    async def check(name: str, probe: asyncio.Future[None] | asyncio.Task[None]) -> None:
        try:
            await asyncio.wait_for(probe, timeout)
            checks[name] = "ok"
        except TimeoutError:
            checks[name] = "timeout"
        except ExchangeError as exc:
            checks[name] = exc.code

    await asyncio.gather(
        check("database", asyncio.ensure_future(request.app[DB].ping())),
        check("storage", asyncio.ensure_future(request.app[STORAGE].ping())),
    )
    damaged = request.app[AUDIT].damage is not None
    if damaged:  # named only when failing, so the healthy answer keeps its documented shape
        checks["audit-log"] = AuditLogDamaged.code
    if all(v == "ok" for v in checks.values()):
        return web.json_response({"status": "ready", "checks": checks})
    failing = ", ".join(f"{k}: {v}" for k, v in checks.items() if v != "ok")
    if damaged:
        # The cause (which event, which column) is in the service's log, not in a public answer.
        detail = f"the audit log failed its integrity check; writes are refused ({failing})"
        body = problem_body(
            status=503,
            code=AuditLogDamaged.code,
            title=AuditLogDamaged.title,
            detail=detail,
            request_id=request[CTX].request_id,
            checks=checks,
        )
        return problem_response(body)
    body = problem_body(
        status=503,
        code="not-ready",
        title="Service not ready",
        detail=f"a dependency is not answering ({failing})",
        request_id=request[CTX].request_id,
        checks=checks,
    )
    return problem_response(body, headers={"Retry-After": "5"})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI])


ROUTES = [
    Route(
        "GET",
        "/healthz",
        healthz,
        "health.live",
        "Liveness: the process answers",
        "health",
        auth="none",
        response="Health",
    ),
    Route(
        "GET",
        "/readyz",
        readyz,
        "health.ready",
        "Readiness: database and storage answer, and the audit log passed its integrity checks",
        "health",
        auth="none",
        response="Health",
        errors=(503,),
    ),
    Route("GET", "/openapi.json", openapi, "openapi", "This API's OpenAPI 3.1 document", "meta", auth="none"),
]


def schemas(settings: Settings) -> dict[str, Schema]:
    return common_schemas(settings)
