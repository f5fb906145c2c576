"""Prometheus metrics: one registry per app, and the listener that serves it apart from the API.

`setup(app)` (from `create_app`) makes a `Metrics` under `METRICS`: requests by route template,
method and status, request durations, link redemptions by kind and outcome, audit appends,
refusal summaries, the age of the latest published checkpoint (every replica follows it),
whether this replica holds the checkpoint signer lease and its term's fence, witness latency,
and database and storage latency. The pipeline, `links._redemption`, `refusals.flush`, the publisher's
witness calls, `Storage._run` and the database wrapper (`TimedDatabase`) feed it.
`start_metrics_site(app, host=…, port=…)` serves `/metrics` (Prometheus text format) on a
listener of its own, started by `exchange serve` when `metrics_port` is set.

Every label value is bounded: routes are the route table's templates (never a raw path, which
may carry a link token; anything unrouted is `unmatched`), methods the standard ones or
`other`, witnesses the configured URLs, operations the names of the calls wrapped.

What this module does not do: authenticate scrapes (the listener is for the operator's network:
loopback by default, never the API's port); add up across replicas (each has its own registry,
as Prometheus expects); or count what was rolled back: an audit append is counted when it is
written inside its transaction, so a transaction that then fails still counts it.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from ..db import Connection, Database
from ..services.audit import AuditLog, Context, Entry

__all__ = ["METRICS", "CountingAuditLog", "Metrics", "TimedDatabase", "start_metrics_site"]

#: Methods kept as they are in the `method` label; any other becomes `other`.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: Seconds: from a cached read to a slow witness or a large presign batch.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The app's registry and every metric in it."""

    def __init__(self, clock: Callable[[], int]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "exchange_http_requests", "HTTP requests answered", ["route", "method", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "exchange_http_request_duration_seconds",
            "Time from a request's headers to its handler's response",
            ["route", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.redemptions = Counter(
            "exchange_link_redemptions",
            "Link redemption requests by kind (view, challenge, session, header, file, receipt) and outcome",
            ["kind", "outcome"],
            registry=r,
        )
        self.audit_appends = Counter("exchange_audit_appends", "Audit events appended", registry=r)
        self.refusal_summaries = Counter(
            "exchange_refusal_summaries", "Refusal summary events appended (http.refusals)", registry=r
        )
        self.witness_seconds = Histogram(
            "exchange_witness_request_seconds",
            "Duration of one add-checkpoint call to a witness",
            ["witness"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.database_seconds = Histogram(
            "exchange_database_seconds",
            "Time a database read connection or write transaction was held (op: read, transaction, execute)",
            ["op"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.storage_seconds = Histogram(
            "exchange_storage_seconds",
            "Duration of one call to object storage, by call",
            ["op"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._clock = clock
        #: When the latest published checkpoint was stored (ms since the epoch), once known.
        self.checkpoint_at_ms: int | None = None
        age = Gauge(
            "exchange_checkpoint_age_seconds",
            "Seconds since the latest published checkpoint was stored (NaN before the first)",
            registry=r,
        )
        age.set_function(self._checkpoint_age_s)
        #: The fence (term) of the checkpoint signer lease this replica holds now, or None.
        self.signer_fence: Callable[[], int | None] = lambda: None
        signer = Gauge(
            "exchange_audit_signer",
            "1 while this replica holds the checkpoint signer lease (signs and appends heartbeats), else 0",
            registry=r,
        )
        signer.set_function(lambda: 0.0 if self.signer_fence() is None else 1.0)
        fence = Gauge(
            "exchange_audit_signer_fence",
            "The fence (term number) of the signer lease this replica holds (NaN while it holds none)",
            registry=r,
        )
        fence.set_function(self._signer_fence)

    def _checkpoint_age_s(self) -> float:
        if self.checkpoint_at_ms is None:
            return math.nan
        return max(0.0, (self._clock() - self.checkpoint_at_ms) / 1000)

    def _signer_fence(self) -> float:
        fence = self.signer_fence()
        return math.nan if fence is None else float(fence)

    def observe_request(self, route: str | None, method: str, status: int, seconds: float) -> None:
        label = route if route is not None else "unmatched"
        method = method if method in _METHODS else "other"
        self.requests.labels(label, method, str(status)).inc()
        self.request_seconds.labels(label, method).observe(seconds)

    def observe_storage(self, op: str, seconds: float) -> None:
        self.storage_seconds.labels(op).observe(seconds)

    def observe_witness(self, url: str, seconds: float) -> None:
        self.witness_seconds.labels(url).observe(seconds)

    def scrape(self) -> bytes:
        return generate_latest(self.registry)


METRICS = web.AppKey("metrics", Metrics)


class CountingAuditLog(AuditLog):
    """The audit log, counting the events it appends into `exchange_audit_appends_total`."""

    def __init__(self, *, origin: str, clock: Callable[[], int], metrics: Metrics) -> None:
        super().__init__(origin=origin, clock=clock)
        self._metrics = metrics

    async def append_many(self, conn: Connection, ctx: Context, entries: Sequence[Entry]) -> list[int]:
        indices = await super().append_many(conn, ctx, entries)
        self._metrics.audit_appends.inc(len(indices))
        return indices


class TimedDatabase(Database):
    """A database whose reads, transactions and single statements are timed; all else is the
    wrapped one's. Times are how long the connection was held: the caller's work inside a
    transaction (and waiting for the pool or SQLite's write lock) counts."""

    def __init__(self, inner: Database, metrics: Metrics) -> None:
        self.inner = inner
        self.dialect = inner.dialect
        self._seconds = metrics.database_seconds

    @asynccontextmanager
    async def _timed(self, op: str, cm: AbstractAsyncContextManager[Connection]) -> AsyncIterator[Connection]:
        start = time.perf_counter()
        try:
            async with cm as conn:
                yield conn
        finally:
            self._seconds.labels(op).observe(time.perf_counter() - start)

    def transaction(self) -> AbstractAsyncContextManager[Connection]:
        return self._timed("transaction", self.inner.transaction())

    def read(self) -> AbstractAsyncContextManager[Connection]:
        return self._timed("read", self.inner.read())

    async def execute(self, sql: str, *args: Any) -> int:
        start = time.perf_counter()
        try:
            return await self.inner.execute(sql, *args)
        finally:
            self._seconds.labels("execute").observe(time.perf_counter() - start)

    async def close(self) -> None:
        await self.inner.close()

    async def ping(self) -> None:
        await self.inner.ping()

    def __getattr__(self, name: str) -> Any:
        # Anything a backend has beyond the interface (only reached for names not found here).
        return getattr(self.inner, name)


def setup(app: web.Application, clock: Callable[[], int]) -> Metrics:
    metrics = app[METRICS] = Metrics(clock)
    return metrics


async def _scrape(request: web.Request) -> web.Response:
    body = request.app[_SCRAPED].scrape()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


_SCRAPED = web.AppKey("scraped", Metrics)


async def start_metrics_site(app: web.Application, *, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve `app`'s metrics at `/metrics` on `host:port` (0: a free port); return the runner
    (the caller cleans it up) and the port bound. Nothing else is served there."""
    scrape_app = web.Application()
    scrape_app[_SCRAPED] = app[METRICS]
    scrape_app.router.add_get("/metrics", _scrape)
    runner = web.AppRunner(scrape_app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = runner.addresses[0][1] if runner.addresses else port
    return runner, int(bound)
