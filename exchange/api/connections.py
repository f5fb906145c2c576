"""The connection guard: deadlines for slow clients and caps on open connections.

aiohttp reads a request's headers with no deadline of its own: a client that sends half a header
and then nothing, or one byte a minute, holds its connection (a file descriptor and a parser) for
as long as aiohttp's keep-alive timer allows, an hour by default. A thousand such clients cost
the attacker nothing. This module bounds every connection that is not inside a request:

- **header timeout** (`http_header_timeout_s`): a new connection must deliver a request's
  complete headers this long after it opened; on a kept-alive connection, this long after the
  first byte of its next request. Otherwise it is closed.
- **idle timeout** (`http_keepalive_timeout_s`): a kept-alive connection that sends nothing this
  long after its last response is closed (aiohttp's own keep-alive timer is set to the same).
- **caps**: at most `http_max_connections` open connections in total and
  `http_max_connections_per_source` from one source (an IPv4 address, or an IPv6 /64, since one
  host commonly holds a whole /64). A connection over either cap is closed at once, before
  aiohttp sees it. A peer inside `trusted_proxies` is under the total cap only: a reverse proxy
  multiplexes many clients onto its connections and enforces the per-source cap itself (the
  generated HAProxy configuration of `dev.replicas` does, from the same setting).

How: `start_site` serves an app through a site whose protocol factory wraps each of aiohttp's
connection handlers in `_GuardedProtocol`, which admits or refuses the connection and notes each
byte that arrives while no request is under way. A middleware placed first in the app notes when
a request's headers were complete (aiohttp hands the request to the app as soon as they are) and
when its response was written. One watchdog task per site closes connections past their deadline.

What this module does not do: time out request bodies (`api/app.py` reads every body within
`http_body_timeout_s`) or slow handlers; limit request rates (`api/ratelimit.py`); or count
connections per client behind a proxy: it sees only the proxy's connections (requests learn the
client's address from `api/forwarded.py`, after a connection is admitted).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from yarl import URL

from ..settings import Settings
from . import refusals
from .forwarded import TrustedProxies
from .problems import internal_error, problem_body, problem_response
from .ratelimit import source_key
from .routing import Handler

__all__ = ["ConnectionGuard", "GuardedSite", "source_of", "start_site"]

log = logging.getLogger("exchange.connections")

#: How often the guard reports what it closed and refused, at most.
_REPORT_INTERVAL_S = 10.0


def source_of(peername: Any) -> str:
    """The key connections are counted under: the per-source key of `ratelimit.source_key` (an
    IPv4 address, or the /64 of an IPv6 address)."""
    if not isinstance(peername, tuple) or not peername or not isinstance(peername[0], str):
        return source_key(None)  # a Unix socket, or a peer that was gone before we asked
    return source_key(peername[0])


class _Connection:
    """What the guard knows of one admitted connection."""

    __slots__ = ("active", "close", "deadline", "idle", "source")

    def __init__(self, source: str, close: Callable[[], None], deadline: float) -> None:
        self.source = source
        self.close = close
        #: Requests of this connection inside the app (more than one only for an instant, when a
        #: pipelined request starts before the previous one's bookkeeping ran).
        self.active = 0
        #: When the connection is closed unless a request reaches the app first; None while one
        #: is inside it.
        self.deadline: float | None = deadline
        #: Waiting after a response with no byte of the next request yet (the idle timeout runs).
        self.idle = False


class ConnectionGuard:
    """Admits connections under the caps, tracks their deadlines, and closes them when missed."""

    def __init__(
        self,
        *,
        header_timeout_s: float,
        keepalive_timeout_s: float,
        max_connections: int,
        max_connections_per_source: int,
        trusted_proxies: TrustedProxies | None = None,
    ) -> None:
        self.header_timeout_s = header_timeout_s
        self.keepalive_timeout_s = keepalive_timeout_s
        self.max_connections = max_connections
        self.max_connections_per_source = max_connections_per_source
        #: Peers under the total cap only (reverse proxies, which cap per source themselves).
        self.trusted_proxies = trusted_proxies if trusted_proxies is not None else TrustedProxies(())
        self._by_handler: dict[RequestHandler, _Connection] = {}
        self._per_source: dict[str, int] = {}
        self._watchdog: asyncio.Task[None] | None = None
        # Counted between reports, so that a flood makes one log line every few seconds.
        self._refused = 0
        self._slow = 0
        self._idle = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionGuard:
        return cls(
            header_timeout_s=settings.http_header_timeout_s,
            keepalive_timeout_s=settings.http_keepalive_timeout_s,
            max_connections=settings.http_max_connections,
            max_connections_per_source=settings.http_max_connections_per_source,
            trusted_proxies=TrustedProxies.from_settings(settings),
        )

    # -- the connection's side ------------------------------------------------------------------

    def admit(
        self, transport: asyncio.BaseTransport, make_handler: Callable[[], RequestHandler]
    ) -> RequestHandler | None:
        """A handler for a new connection, or None when it is over a cap."""
        peername = transport.get_extra_info("peername")
        source = source_of(peername)
        if len(self._by_handler) >= self.max_connections or (
            self._per_source.get(source, 0) >= self.max_connections_per_source
            and not self._is_proxy(peername)
        ):
            self._refused += 1
            return None
        handler = make_handler()
        now = asyncio.get_running_loop().time()
        self._by_handler[handler] = _Connection(source, handler.force_close, now + self.header_timeout_s)
        self._per_source[source] = self._per_source.get(source, 0) + 1
        return handler

    def _is_proxy(self, peername: Any) -> bool:
        return isinstance(peername, tuple) and bool(peername) and peername[0] in self.trusted_proxies

    def data_received(self, handler: RequestHandler) -> None:
        conn = self._by_handler.get(handler)
        if conn is not None and conn.idle:
            # The first byte of the next request: from now on it has the header timeout to finish.
            conn.idle = False
            conn.deadline = asyncio.get_running_loop().time() + self.header_timeout_s

    def release(self, handler: RequestHandler) -> None:
        conn = self._by_handler.pop(handler, None)
        if conn is None:
            return
        left = self._per_source[conn.source] - 1
        if left:
            self._per_source[conn.source] = left
        else:
            del self._per_source[conn.source]

    # -- the app's side -------------------------------------------------------------------------

    def _request_started(self, handler: RequestHandler) -> None:
        conn = self._by_handler.get(handler)
        if conn is not None:
            conn.active += 1
            conn.deadline = None
            conn.idle = False

    def _request_finished(self, handler: RequestHandler) -> None:
        conn = self._by_handler.get(handler)
        if conn is not None:
            conn.active -= 1
            if conn.active == 0:
                conn.idle = True
                conn.deadline = asyncio.get_running_loop().time() + self.keepalive_timeout_s

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """First in the app: the request's headers are complete; note when its response is done."""
        protocol = request.protocol
        if not isinstance(protocol, RequestHandler):
            return await handler(request)
        self._request_started(protocol)
        # aiohttp runs each request in a task of its own that also writes the response, so the
        # task's end is the response's end. Should a version run handlers in the connection's
        # own task, the handler's return is the nearest point this middleware can see.
        task = asyncio.current_task()
        if task is not None and task is not request.task:
            task.add_done_callback(lambda _: self._request_finished(protocol))
            return await handler(request)
        try:
            return await handler(request)
        finally:
            self._request_finished(protocol)

    # -- the watchdog ---------------------------------------------------------------------------

    def sweep(self, now: float) -> None:
        """Close every connection past its deadline."""
        late = [c for c in self._by_handler.values() if c.deadline is not None and c.deadline <= now]
        for conn in late:
            if conn.idle:
                self._idle += 1
            else:
                self._slow += 1
            conn.close()  # connection_lost follows, and releases it

    def _report(self) -> None:
        if self._slow or self._refused:
            log.warning(
                "closed %d connections that sent no complete request headers within %g s;"
                " refused %d connections over the caps (%d in total, %d per source); %d open",
                self._slow,
                self.header_timeout_s,
                self._refused,
                self.max_connections,
                self.max_connections_per_source,
                len(self._by_handler),
            )
        if self._idle:
            log.debug("closed %d idle keep-alive connections", self._idle)
        self._slow = self._refused = self._idle = 0

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        # A quarter of the shorter timeout, at most a second: a deadline is missed by that much.
        tick = min(1.0, self.header_timeout_s / 4, self.keepalive_timeout_s / 4)
        last_report = loop.time()
        while True:
            await asyncio.sleep(tick)
            now = loop.time()
            self.sweep(now)
            if now - last_report >= _REPORT_INTERVAL_S:
                self._report()
                last_report = now

    def start(self) -> None:
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().create_task(self._watch(), name="connection-guard")

    async def stop(self) -> None:
        task, self._watchdog = self._watchdog, None
        if task is not None:
            task.cancel()
            # `wait` never raises the task's own CancelledError, and lets ours through: a caller
            # being cancelled stays cancelled, one that is not is never mistaken for it.
            await asyncio.wait([task])
        self._report()


#: Called with (peer address, status, code) for each request aiohttp itself refused.
ParserRefusal = Callable[[str | None, int, str], None]


class _ProblemHandler(RequestHandler):
    """aiohttp's connection handler, whose own refusals (a request its parser cannot read) are
    RFC 9457 problem details like every other refusal: not aiohttp's text/plain, which echoes
    the offending line back (it may hold a link token), and accounted for like the others."""

    def __init__(self, *args: Any, on_refusal: ParserRefusal, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._on_refusal = on_refusal

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # aiohttp's own: it logs (through the redacting filter) and refuses to answer twice.
        super().handle_error(request, status, exc, message)
        request_id = secrets.token_hex(8)
        if status >= 500:
            body = internal_error(request_id)
        else:
            body = problem_body(
                status=status,
                code="bad-request",
                title="Bad request",
                detail="the request is not valid HTTP/1.1 (its request line, a header or its framing"
                " could not be read); nothing was done",
                request_id=request_id,
            )
        response = problem_response(body, headers={"X-Request-Id": request_id})
        response.force_close()
        self._on_refusal(request.remote, status, str(body["code"]))
        return response


def _handler_factory(server: web.Server, on_refusal: ParserRefusal) -> Callable[[], RequestHandler]:
    """Make aiohttp's connection handlers as `web.Server` would, as `_ProblemHandler`s."""
    options = dict(getattr(server, "_kwargs", {}))  # the runner's handler options (keep-alive, limits)

    def make() -> RequestHandler:
        return _ProblemHandler(server, loop=asyncio.get_running_loop(), on_refusal=on_refusal, **options)

    return make


class _GuardedProtocol(asyncio.Protocol):
    """Stands between the transport and aiohttp's handler: admits, counts bytes, releases."""

    __slots__ = ("_guard", "_handler", "_make_handler")

    def __init__(self, guard: ConnectionGuard, make_handler: Callable[[], RequestHandler]) -> None:
        self._guard = guard
        self._make_handler = make_handler
        self._handler: RequestHandler | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        handler = self._guard.admit(transport, self._make_handler)
        if handler is None:
            # Over a cap: close before aiohttp sees the connection, so it costs no parser or task.
            transport.close()
            return
        self._handler = handler
        handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._handler is not None:
            self._guard.data_received(self._handler)
            self._handler.data_received(data)

    def eof_received(self) -> None:
        # aiohttp's handler ignores a half-close too: returning None lets the transport close.
        if self._handler is not None:
            self._handler.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handler is not None:
            self._guard.release(self._handler)
            self._handler.connection_lost(exc)
            self._handler = None

    def pause_writing(self) -> None:
        if self._handler is not None:
            self._handler.pause_writing()

    def resume_writing(self) -> None:
        if self._handler is not None:
            self._handler.resume_writing()


class GuardedSite(web.BaseSite):
    """A TCP site whose connections go through a `ConnectionGuard`."""

    __slots__ = ("_bound_port", "_guard", "_host", "_on_refusal", "_port")

    def __init__(
        self,
        runner: web.BaseRunner,
        guard: ConnectionGuard,
        *,
        host: str,
        port: int,
        on_refusal: ParserRefusal | None = None,
    ) -> None:
        super().__init__(runner)
        self._guard = guard
        self._on_refusal = on_refusal
        self._host = host
        self._port = port
        self._bound_port: int | None = None

    @property
    def port(self) -> int:
        """The port listened on (the one the system chose, when asked for port 0)."""
        return self._bound_port if self._bound_port is not None else self._port

    @property
    def name(self) -> str:
        return str(URL.build(scheme="http", host=self._host, port=self.port))

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None  # BaseSite refuses a runner that was not set up
        guard = self._guard
        make = _handler_factory(server, self._on_refusal) if self._on_refusal else server
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _GuardedProtocol(guard, make), self._host, self._port, backlog=self._backlog
        )
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port
        guard.start()

    async def stop(self) -> None:
        await self._guard.stop()
        await super().stop()


async def start_site(
    app: web.Application, settings: Settings, *, host: str | None = None, port: int | None = None
) -> tuple[web.AppRunner, GuardedSite]:
    """Serve `app` on `host:port` (default: the settings') behind a connection guard.

    The one way the service is served, by `exchange serve` and by tests alike. The caller owns
    the runner: `await runner.cleanup()` stops the site, the guard and the app.
    """
    guard = ConnectionGuard.from_settings(settings)
    # First, so that a request counts as started before any other middleware (or body read) runs.
    app.middlewares.insert(0, guard.middleware)
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=settings.http_keepalive_timeout_s)
    await runner.setup()
    try:
        site = GuardedSite(
            runner,
            guard,
            host=settings.host if host is None else host,
            port=settings.port if port is None else port,
            on_refusal=lambda ip, status, code: refusals.record_unparsed(app, ip, status, code),
        )
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, site
