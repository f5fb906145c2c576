"""What a refusal costs: its place in the audit log, bounded, and its source's failure budget.

Every refusal is accounted for in the audit log, but a client without credentials must not be
able to grow the log at will: each leaf is permanent. So the pipeline and the link redemption
routes both hand every refusal to `record`, which decides how it is written:

* A refusal of a request that authenticated as a principal is appended as one event, always:
  it names who asked, and that principal answers for it.
* Any other refusal (unsigned, failed authentication, unknown route, refused enrolment, refused
  link redemption) is counted under its key, (source, route, code, status), in the current
  window of `refusal_log_window_s` (windows are aligned to the clock, shared by all keys). The
  first `refusal_log_allowance_events` of a key in a window are appended one event each, as
  every refusal used to be; the rest are only counted. A rate-limited refusal (429) is never
  appended on its own: it is the flood itself. When the window has ended, a background task
  appends one `http.refusals` event per key that had refusals only counted (reason: the code;
  details: source, action, route, status, `recorded` alone, `suppressed`, and the window's
  `window_start_ms` and `window_end_ms`), so that the events of a key plus its summaries'
  `suppressed` equal the refusals it was answered. What is pending is flushed on shutdown too.
* The keys counted in a window are bounded (`refusal_log_max_keys`): further keys (many
  sources at once) fold into one summary whose source is `other`, never appended alone.
* A source is an IPv4 address or an IPv6 /64 (`ratelimit.source_key`), and each has a failure
  budget (`auth_failure_*`, a token bucket): every refused unauthenticated request to a route
  that is not public (`auth="none"`: health, the OpenAPI document, link redemption with its own
  buckets) takes a token. While its bucket is empty, the source's requests to routes needing a
  signature (or checking their own, as enrolment does) and to unknown routes are answered 429
  by `gate`, before the body is read, a signature checked or the database touched, and only
  after `auth_failure_delay_s`, so that a flood on N connections gets N answers a second (at
  1 s) rather than the event loop's attention. Requests that authenticate never take a token,
  so signed traffic from other sources is untouched. Nor is signed traffic from the spent
  source itself (a NAT shared with whoever floods): a request whose `keyid` has signed a request
  from this source before (`signed_from`; the last 10,000 pairs, per replica) still goes on to
  have its signature checked.

If an event meant to stand alone cannot be appended (database unavailable), its refusal is
counted instead, so the summary still carries it once the database is back.

What this module does not do: share anything between replicas. The counts and budgets are memory
of one process, so with N replicas a source gets N allowances and N budgets, and one key may
have a summary from each replica for one window (their sum is still exact). Counts not yet
flushed are lost if the process is killed rather than stopped: at most one window's worth. Moving
them into the shared database is later work; `record`, `gate` and the `RefusalLedger` interface
are meant to stay as they are.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..errors import DependencyError, RateLimited
from ..services.audit import SYSTEM, Context, Entry, Outcome, record_alone
from .keys import AUDIT, CLOCK, DB, SETTINGS
from .metrics import METRICS
from .ratelimit import TokenBuckets, source_key
from .routing import CTX, PRINCIPAL, Route

__all__ = [
    "FAILURES",
    "LEDGER",
    "RefusalKey",
    "RefusalLedger",
    "Summary",
    "final_flush",
    "flush",
    "flush_forever",
    "gate",
    "record",
    "setup_ledger",
    "signed_from",
]

log = logging.getLogger("exchange.api.refusals")

#: The action of a window's summary of one key.
SUMMARY_ACTION = "http.refusals"
#: The source of the summary that holds the keys beyond `refusal_log_max_keys`.
OTHER_SOURCE = "other"
#: How often, at most, the background task looks for ended windows.
_FLUSH_TICK_S = 1.0
#: (source, key id) pairs remembered as having signed a request successfully.
_MAX_SIGNERS = 10_000
#: The keyid parameter of a Signature-Input header, read without parsing the structured field.
_KEYID = re.compile(r';\s*keyid="([^"\\]{1,256})"')


@dataclass(frozen=True)
class RefusalKey:
    """What refusals are counted under: who (a source), where (route), and which refusal."""

    source: str
    action: str
    route: str | None
    code: str
    status: int


#: The one key that every key beyond the table's bound is folded into.
OTHER = RefusalKey(OTHER_SOURCE, "*", None, "*", 0)


@dataclass
class _Tally:
    recorded: int = 0
    suppressed: int = 0


@dataclass(frozen=True)
class Summary:
    """One key's refusals in one window that were counted and not appended alone."""

    key: RefusalKey
    recorded: int
    suppressed: int
    window_start_ms: int
    window_end_ms: int

    def to_entry(self) -> Entry:
        key = self.key
        details: dict[str, Any] = {
            "source": key.source,
            "recorded": self.recorded,
            "suppressed": self.suppressed,
            "window_start_ms": self.window_start_ms,
            "window_end_ms": self.window_end_ms,
        }
        if key != OTHER:
            details |= {"action": key.action, "route": key.route, "status": key.status}
        outcome: Outcome = "error" if key.status >= 500 else "denied"
        reason = None if key == OTHER else key.code
        return Entry(SUMMARY_ACTION, outcome, reason, details=details, actor=SYSTEM)


class RefusalLedger:
    """The counts of the current window, and the summaries of ended windows not yet appended.

    Pure bookkeeping over a clock (milliseconds): no I/O. Not thread-safe; one event loop.
    """

    def __init__(self, *, window_s: int, allowance: int, max_keys: int, clock: Callable[[], int]) -> None:
        self.window_ms = window_s * 1000
        self.allowance = allowance
        self.max_keys = max_keys
        self._clock = clock
        self._start = self._window_of(clock())
        self._tallies: dict[RefusalKey, _Tally] = {}
        self._ended: list[Summary] = []
        #: Held while summaries are being appended, so that two flushes never write one twice.
        self.lock = asyncio.Lock()

    def _window_of(self, now_ms: int) -> int:
        return now_ms - now_ms % self.window_ms

    def admit(self, key: RefusalKey, *, alone: bool) -> bool:
        """Count one refusal under `key`; True if it is to be appended as an event of its own."""
        self._roll(self._clock())
        tally = self._tallies.get(key)
        if tally is None:
            if len(self._tallies) >= self.max_keys:
                key, alone = OTHER, False
                tally = self._tallies.setdefault(OTHER, _Tally())
            else:
                tally = self._tallies[key] = _Tally()
        if alone and tally.recorded < self.allowance:
            tally.recorded += 1
            return True
        tally.suppressed += 1
        return False

    def rescind(self, key: RefusalKey) -> None:
        """A refusal `admit` let stand alone could not be appended: count it instead."""
        tally = self._tallies.get(key)
        if tally is not None and tally.recorded:
            tally.recorded -= 1
        self.admit(key, alone=False)

    def due(self, *, final: bool = False) -> list[Summary]:
        """Take the summaries of the windows that have ended (and of the current one if `final`)."""
        now = self._clock()
        self._roll(now)
        if final:
            self._close(now)
        taken, self._ended = self._ended, []
        return taken

    def restore(self, summaries: list[Summary]) -> None:
        """Give back summaries that could not be appended, to be tried again with the next ones.

        They stay bounded: beyond `max_keys` waiting, the rest fold into one `other` summary.
        """
        waiting = summaries + self._ended
        if len(waiting) > self.max_keys:
            kept, folded = waiting[: self.max_keys - 1], waiting[self.max_keys - 1 :]
            waiting = [
                *kept,
                Summary(
                    OTHER,
                    recorded=sum(s.recorded for s in folded),
                    suppressed=sum(s.suppressed for s in folded),
                    window_start_ms=min(s.window_start_ms for s in folded),
                    window_end_ms=max(s.window_end_ms for s in folded),
                ),
            ]
        self._ended = waiting

    @property
    def pending(self) -> int:
        """Refusals counted but not yet in an appended summary."""
        return sum(t.suppressed for t in self._tallies.values()) + sum(s.suppressed for s in self._ended)

    def _roll(self, now_ms: int) -> None:
        if now_ms >= self._start + self.window_ms:
            self._close(self._start + self.window_ms)
            self._start = self._window_of(now_ms)

    def _close(self, end_ms: int) -> None:
        self._ended.extend(
            Summary(key, tally.recorded, tally.suppressed, self._start, end_ms)
            for key, tally in self._tallies.items()
            if tally.suppressed
        )
        self._tallies = {}
        self._start = end_ms


class _Signers:
    """The (source, key id) pairs that signed a request successfully, most recent last; bounded."""

    def __init__(self, max_pairs: int) -> None:
        self._pairs: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._max = max_pairs

    def add(self, source: str, key_id: str) -> None:
        pair = (source, key_id)
        if pair in self._pairs:
            self._pairs.move_to_end(pair)
            return
        self._pairs[pair] = None
        if len(self._pairs) > self._max:
            self._pairs.popitem(last=False)

    def __contains__(self, pair: object) -> bool:
        return pair in self._pairs


LEDGER = web.AppKey("refusal_ledger", RefusalLedger)
#: Per source: refused unauthenticated requests (the failure budget).
FAILURES = web.AppKey("auth_failure_buckets", TokenBuckets)
SIGNERS = web.AppKey("recent_signers", _Signers)


async def gate(request: web.Request, route: Route | None) -> None:
    """Refuse up front (RateLimited) a request from a source that has spent its failure budget,
    unless its route is public or it names a key that signed from this source before. Takes no
    token: only refusals do."""
    if route is not None and route.auth == "none":
        return
    source = source_key(request.remote)
    try:
        request.app[FAILURES].check(source, "refused from this address")
    except RateLimited:
        if route is not None and route.auth == "signature":
            found = _KEYID.search(request.headers.get("Signature-Input", "")[:4096])
            if found and (source, found.group(1)) in request.app[SIGNERS]:
                return
        # Answer late. A flood that sends its next request when the last is answered (most do)
        # slows to one request per connection per delay, and leaves the event loop to the other
        # sources; waiting costs this request's task and nothing else.
        delay_s = request.app[SETTINGS].auth_failure_delay_s
        if delay_s:
            await asyncio.sleep(delay_s)
        raise


def signed_from(request: web.Request, key_id: str) -> None:
    """Remember that `key_id` signed this request successfully, for `gate`."""
    request.app[SIGNERS].add(source_key(request.remote), key_id)


async def record(
    request: web.Request, route: Route | None, code: str, status: int, *, link_id: str | None = None
) -> None:
    """Account for one refusal: in the log (alone or counted, see the module's docstring) and,
    if it was unauthenticated and its route is not public, against its source's failure budget.

    The event names the route's template, never the path as sent: paths may carry capabilities.
    """
    app = request.app
    ctx = request[CTX]
    authenticated = PRINCIPAL in request
    action = route.audit_action if route else "http.request"
    key: RefusalKey | None = None
    if not authenticated:
        source = source_key(request.remote)
        if 400 <= status < 500 and status != 429 and (route is None or route.auth != "none"):
            app[FAILURES].spend(source)
        key = RefusalKey(source, action, route.path if route else None, code, status)
        if not app[LEDGER].admit(key, alone=status != 429):
            return
    outcome: Outcome = "error" if status >= 500 else "denied"
    details = {"method": request.method[:16], "route": route.path if route else None, "status": status}
    resource = {"type": "link", "id": link_id} if link_id else None
    try:
        await record_alone(app[DB], app[AUDIT], ctx, [Entry(action, outcome, code, resource, details)])
    except DependencyError as exc:
        # exc.code says why: database-unavailable, or audit-log-damaged (the log failed closed).
        if key is not None:
            app[LEDGER].rescind(key)
            log.warning("refusal %s of request %s counted, not recorded: %s", code, ctx.request_id, exc.code)
        else:
            log.warning("could not record refusal %s of request %s: %s", code, ctx.request_id, exc.code)


#: Recordings of parser refusals under way (fire and forget, but not garbage-collected midway).
_UNPARSED: set[asyncio.Task[None]] = set()


def record_unparsed(app: web.Application, ip: str | None, status: int, code: str) -> None:
    """Account for a request aiohttp's parser refused before any route or middleware saw it: like
    any unauthenticated refusal (allowance, then counted; it spends the source's failure budget),
    as action `http.request` with no route. Called from the connection's handler, which cannot
    wait: the counting is done here, and only a refusal within the allowance becomes a task
    that appends its event (a flood of garbage costs a count each, not a task each)."""
    if LEDGER not in app:  # the app is not started, or already stopped
        return
    source = source_key(ip)
    if 400 <= status < 500:
        app[FAILURES].spend(source)
    key = RefusalKey(source, "http.request", None, code, status)
    if not app[LEDGER].admit(key, alone=True):
        return
    task = asyncio.get_running_loop().create_task(_append_unparsed(app, key, ip))
    _UNPARSED.add(task)
    task.add_done_callback(_UNPARSED.discard)


async def _append_unparsed(app: web.Application, key: RefusalKey, ip: str | None) -> None:
    ctx = Context(ip=ip, request_id=secrets.token_hex(8))
    outcome: Outcome = "error" if key.status >= 500 else "denied"
    details = {"method": None, "route": None, "status": key.status}
    try:
        await record_alone(app[DB], app[AUDIT], ctx, [Entry(key.action, outcome, key.code, None, details)])
    except DependencyError as exc:
        app[LEDGER].rescind(key)
        log.warning("refusal %s of an unparsed request counted, not recorded: %s", key.code, exc.code)


async def flush(app: web.Application, *, final: bool = False) -> int:
    """Append the summaries of ended windows (and of the current one if `final`); return how
    many. On a database failure they are kept for the next flush, and DependencyError raised."""
    ledger = app[LEDGER]
    async with ledger.lock:
        summaries = ledger.due(final=final)
        if not summaries:
            return 0
        try:
            await record_alone(app[DB], app[AUDIT], Context(actor=SYSTEM), [s.to_entry() for s in summaries])
        except DependencyError:
            ledger.restore(summaries)
            raise
        app[METRICS].refusal_summaries.inc(len(summaries))
        return len(summaries)


async def _flush_forever(app: web.Application, tick_s: float) -> None:
    while True:
        await asyncio.sleep(tick_s)
        try:
            # Shielded: stopping the service must not cut off summaries already taken from the
            # ledger; the final flush waits for this one (the lock) before it writes the rest.
            await asyncio.shield(flush(app))
        except DependencyError as exc:
            log.warning("refusal summaries kept for later: %s", exc.code)


def setup_ledger(app: web.Application) -> None:
    """The ledger, the failure budgets and the memory of recent signers (api/lifetime.py)."""
    settings = app[SETTINGS]
    app[LEDGER] = RefusalLedger(
        window_s=settings.refusal_log_window_s,
        allowance=settings.refusal_log_allowance_events,
        max_keys=settings.refusal_log_max_keys,
        clock=app[CLOCK],
    )
    app[FAILURES] = TokenBuckets(
        per_min=settings.auth_failure_requests_per_min,
        burst=settings.auth_failure_burst_requests,
        clock=app[CLOCK],
    )
    app[SIGNERS] = _Signers(_MAX_SIGNERS)


async def flush_forever(app: web.Application) -> None:
    """The background task that writes the summaries of ended windows."""
    await _flush_forever(app, min(_FLUSH_TICK_S, float(app[SETTINGS].refusal_log_window_s)))


async def final_flush(app: web.Application) -> None:
    """At shutdown, after the flusher stopped and before the database closes: the rest."""
    try:
        await flush(app, final=True)
    except DependencyError as exc:
        log.warning("%d counted refusals not summarised at shutdown: %s", app[LEDGER].pending, exc.code)
