"""What a refusal costs: its place in the audit log, bounded, and its source's failure budget —
both shared by every replica through the database.

Every refusal is accounted for in the audit log, but a client without credentials must not be
able to grow the log at will: each leaf is permanent. So the pipeline and the link redemption
routes both hand every refusal to `record`, which decides how it is written:

* A refusal of a request that authenticated as a principal is appended as one event, always:
  it names who asked, and that principal answers for it.
* Any other refusal (unsigned, failed authentication, unknown route, refused enrolment, refused
  link redemption) is counted under its key, (source, route, code, status), in the current
  window of `refusal_log_window_s` (windows are aligned to the clock, shared by all keys and
  all replicas). The first `refusal_log_allowance_events` of a key in a window, across all
  replicas, are appended one event each, as every refusal used to be: the shared row's
  `recorded` is raised by a guarded UPSERT in the transaction that appends the event
  (`services.refusalcounts`). The rest are only counted. A rate-limited refusal (429) is never
  appended on its own: it is the flood itself. A replica asks the shared row only while it
  does not know the key to be past its allowance (once told, or once it has itself asked
  `allowance` times in the window, it counts without a statement).
* What is only counted is kept in this replica's memory (`RefusalLedger`) and added to the
  shared rows by the background task every tick (about a second), as one delta per key.
* When a window has ended, plus a grace of two ticks for the other replicas' last deltas,
  whichever replica flushes first takes the window's rows and appends one `http.refusals`
  event per key that had refusals only counted (reason: the code; details: source, action,
  route, status, `recorded` alone, `suppressed`, and the window's `window_start_ms` and
  `window_end_ms`), in one transaction: each key and window is summarised once, and a delta
  arriving later is summarised later, in a summary of its own. So the events of a key plus
  its summaries' `suppressed` equal the refusals it was answered, over all replicas. A replica
  that stops adds its counts and summarises what is suppressed so far, the current window's
  included (ending at its stop; the rows stay for the replicas still counting).
* The keys counted in a window are bounded (`refusal_log_max_keys`), in the shared table and
  in each replica's memory: further keys (many sources at once) fold into one summary whose
  source is `other`, never appended alone.
* A source is an IPv4 address or an IPv6 /64 (`ratelimit.source_key`), and each has a failure
  budget (`auth_failure_*`, a token bucket in the shared table): every refused unauthenticated
  request to a route that is not public (`auth="none"`: health, the OpenAPI document, link
  redemption with its own buckets) takes a token, one statement. While its bucket is empty,
  the source's requests to routes needing a signature (or checking their own, as enrolment
  does) and to unknown routes are answered 429 by `gate`, before the body is read, a signature
  checked or the database touched, and only after `auth_failure_delay_s`, so that a flood on
  N connections gets N answers a second (at 1 s) rather than the event loop's attention. `gate`
  answers from memory: the replica that spends a source's token and finds the bucket empty keeps
  a mirror of it (`ratelimit.SharedBuckets`) and answers 429 until a token is back; another
  replica learns it the first time it spends a token for that source, so a source gets one
  refusal more per replica than one process would give it (and, while it keeps on, up to one per
  replica for each token it regains), besides the requests already past the gate when its bucket
  empties. Requests that authenticate never take a token, so signed traffic from other sources
  is untouched. Nor is signed traffic from the spent source itself (a NAT shared with whoever
  floods): a request whose `keyid` has signed a request from this source before
  (`signed_from`; the last 10,000 pairs) still goes on to have its signature checked. That
  memory stays per replica: it is an exemption, not a limit, so keeping it local can only refuse
  more, never let more through; it is what each replica had before the budgets were shared (a
  key seen signing only on another replica gets 429 here while the source is spent, as it did
  then); and sharing it would cost a write per new (source, key) pair and a read on `gate`'s
  path, which must stay free of I/O.

If an event meant to stand alone cannot be appended (database unavailable), its refusal is
counted instead (the transaction that would have raised `recorded` rolled back), and the counts
wait in memory until the database is back. If the failure budget cannot be spent for the same
reason, the refusal costs its source nothing: the database it would protect is down anyway.

What this module does not do: keep counts safe from SIGKILL. A replica killed rather than
stopped loses the counts it had not yet added: at most one tick's worth (about a second) of
suppressed refusals, or all it kept while the database was down. Events within the allowance
are in the log already, and counts added are rows of the shared table, summarised once their
window ends by whichever replica flushes next (after a restart, if it was the only one). Its
mirror of spent sources goes with it; the buckets stay. Nor does it bound the buckets' table
by itself: full buckets are purged every `_PURGE_EVERY_S` by the flusher.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from ..errors import DependencyError, RateLimited
from ..services import ratebuckets, refusalcounts
from ..services.audit import Context, Entry, Outcome, record_alone
from ..services.refusalcounts import OTHER, OTHER_SOURCE, SUMMARY_ACTION, Admission, RefusalKey, Summary
from .keys import AUDIT, CLOCK, DB, SETTINGS
from .metrics import METRICS
from .ratelimit import SharedBuckets, source_key
from .routing import CTX, PRINCIPAL, Route

__all__ = [
    "FAILURES",
    "LEDGER",
    "OTHER",
    "OTHER_SOURCE",
    "SUMMARY_ACTION",
    "SUMMARY_GRACE_S",
    "RefusalKey",
    "RefusalLedger",
    "Summary",
    "final_flush",
    "flush",
    "flush_forever",
    "gate",
    "purge",
    "record",
    "setup_ledger",
    "signed_from",
]

log = logging.getLogger("exchange.api.refusals")

#: How often, at most, the background task adds counts and looks for ended windows.
_FLUSH_TICK_S = 1.0
#: How long after a window's end its summaries wait for the other replicas' last counts (their
#: flushers add them every tick).
SUMMARY_GRACE_S = 2 * _FLUSH_TICK_S
#: How often the flusher deletes full token buckets (`services.ratebuckets.purge`).
_PURGE_EVERY_S = 10.0
#: (source, key id) pairs remembered as having signed a request successfully.
_MAX_SIGNERS = 10_000
#: The keyid parameter of a Signature-Input header, read without parsing the structured field.
_KEYID = re.compile(r';\s*keyid="([^"\\]{1,256})"')


@dataclass
class _Seen:
    """What this replica knows of one key in the current window."""

    asked: int = 0  # refusals it let ask the shared allowance
    past: bool = False  # the shared allowance is used up
    has_row: bool = False  # the key has its shared row (no place to claim)


class RefusalLedger:
    """This replica's side of the shared counts: what it knows of the current window's keys, and
    the refusals it has counted and not yet added to the shared rows.

    Pure bookkeeping over a clock (milliseconds): no I/O. Not thread-safe; one event loop.
    """

    def __init__(self, *, window_s: int, allowance: int, max_keys: int, clock: Callable[[], int]) -> None:
        self.window_ms = window_s * 1000
        self.allowance = allowance
        self.max_keys = max_keys
        self._clock = clock
        self._start = self._window_of(clock())
        self._seen: dict[RefusalKey, _Seen] = {}
        self._full = False  # the shared table has no place for another key in this window
        self._counts: dict[tuple[int, RefusalKey], int] = {}
        #: Held while counts are being added, so that two flushes never add one twice.
        self.lock = asyncio.Lock()

    def _window_of(self, now_ms: int) -> int:
        return now_ms - now_ms % self.window_ms

    def admit(self, key: RefusalKey, *, alone: bool) -> int | None:
        """Count one refusal under `key`. Return the window (its start, ms) in which to ask the
        shared allowance whether it stands alone (`settle` says what it answered), or None if it
        is only counted, here, until the next flush adds it to the shared row."""
        self._roll(self._clock())
        seen = self._seen.get(key)
        if seen is None and key != OTHER:
            if self._full or len(self._seen) >= self.max_keys:
                key = OTHER
            else:
                seen = self._seen[key] = _Seen()
        if seen is not None and alone and not seen.past and seen.asked < self.allowance:
            seen.asked += 1
            return self._start
        self._count(self._start, key)
        return None

    def settle(self, window: int, key: RefusalKey, admission: Admission) -> None:
        """What the shared allowance answered for a refusal `admit` let ask."""
        seen = self._seen.get(key) if window == self._start else None
        if admission == "alone":
            if seen is not None:
                seen.has_row = True
        elif admission == "counted":
            if seen is not None:
                seen.past = seen.has_row = True
            self._count(window, key)
        else:  # "folded": the window had no place left for a new key
            if window == self._start:
                self._full = True
            self._count(window, OTHER)

    def rescind(self, window: int, key: RefusalKey) -> None:
        """A refusal `admit` let ask could not be recorded (the database failed): count it instead."""
        seen = self._seen.get(key) if window == self._start else None
        if seen is not None and seen.asked:
            seen.asked -= 1
        self._count(window, key)

    def rows_known(self) -> set[tuple[int, RefusalKey]]:
        """The (window, key) pairs known to have their shared row."""
        return {(self._start, k) for k, seen in self._seen.items() if seen.has_row}

    def has_row(self, window: int, key: RefusalKey) -> bool:
        seen = self._seen.get(key) if window == self._start else None
        return seen is not None and seen.has_row

    def take_counts(self) -> dict[tuple[int, RefusalKey], int]:
        """The counts not yet added to the shared rows, by (window, key); they leave the ledger."""
        self._roll(self._clock())
        taken, self._counts = self._counts, {}
        return taken

    def learn(self, added: refusalcounts.Added) -> None:
        """What adding counts taught: rows that exist, windows that are full."""
        for window, key in added.rows:
            seen = self._seen.get(key) if window == self._start else None
            if seen is not None:
                seen.has_row = True
        if self._start in added.full:
            self._full = True

    def restore_counts(self, counts: dict[tuple[int, RefusalKey], int]) -> None:
        """Give back counts that could not be added, to be tried again with the next ones.

        They stay bounded: beyond `max_keys` waiting from ended windows, the rest fold into the
        `other` key of the earliest of those windows (the sum stays exact, the window less so).
        """
        for pair, n in counts.items():
            self._counts[pair] = self._counts.get(pair, 0) + n
        ended = sorted(pair for pair in self._counts if pair[0] < self._start)
        if len(ended) > self.max_keys:
            folded = ended[self.max_keys - 1 :]
            into = (folded[0][0], OTHER)
            total = sum(self._counts.pop(pair) for pair in folded)
            self._counts[into] = self._counts.get(into, 0) + total

    @property
    def pending(self) -> int:
        """Refusals counted here and not yet added to the shared rows."""
        return sum(self._counts.values())

    def _count(self, window: int, key: RefusalKey) -> None:
        self._counts[window, key] = self._counts.get((window, key), 0) + 1

    def _roll(self, now_ms: int) -> None:
        if now_ms >= self._start + self.window_ms:
            self._start = self._window_of(now_ms)
            self._seen = {}
            self._full = False


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
FAILURES = web.AppKey("auth_failure_buckets", SharedBuckets)
SIGNERS = web.AppKey("recent_signers", _Signers)


async def gate(request: web.Request, route: Route | None) -> None:
    """Refuse up front (RateLimited) a request from a source that has spent its failure budget,
    unless its route is public or it names a key that signed from this source before. Takes no
    token (only refusals do) and asks nobody: this replica's memory of spent sources answers."""
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
    action = route.audit_action if route else "http.request"
    outcome: Outcome = "error" if status >= 500 else "denied"
    details = {"method": request.method[:16], "route": route.path if route else None, "status": status}
    resource = {"type": "link", "id": link_id} if link_id else None
    entry = Entry(action, outcome, code, resource, details)
    if PRINCIPAL in request:
        try:
            await record_alone(app[DB], app[AUDIT], ctx, [entry])
        except DependencyError as exc:
            # exc.code says why: database-unavailable, or audit-log-damaged (the log failed closed).
            log.warning("could not record refusal %s of request %s: %s", code, ctx.request_id, exc.code)
        return
    source = source_key(request.remote)
    if 400 <= status < 500 and status != 429 and (route is None or route.auth != "none"):
        await _spend(app, source)
    key = RefusalKey(source, action, route.path if route else None, code, status)
    window = app[LEDGER].admit(key, alone=status != 429)
    if window is not None:
        await _ask(app, window, key, ctx, entry)


async def _spend(app: web.Application, source: str) -> None:
    try:
        await app[FAILURES].spend(source)
    except DependencyError as exc:
        log.debug("failure budget not spent: %s", exc.code)


async def _ask(app: web.Application, window: int, key: RefusalKey, ctx: Context, entry: Entry) -> None:
    """Append `entry` if its key has allowance left in `window`, across all replicas; else count it."""
    ledger = app[LEDGER]
    try:
        admission = await refusalcounts.record_within_allowance(
            app[DB],
            app[AUDIT],
            ctx,
            entry,
            window_start_ms=window,
            key=key,
            allowance=ledger.allowance,
            max_keys=ledger.max_keys,
            has_row=ledger.has_row(window, key),
        )
    except DependencyError as exc:
        # exc.code says why: database-unavailable, or audit-log-damaged (the log failed closed).
        ledger.rescind(window, key)
        log.warning("refusal %s of request %s counted, not recorded: %s", key.code, ctx.request_id, exc.code)
        return
    ledger.settle(window, key, admission)


#: Recordings of parser refusals under way (fire and forget, but not garbage-collected midway).
_UNPARSED: set[asyncio.Task[None]] = set()


def record_unparsed(app: web.Application, ip: str | None, status: int, code: str) -> None:
    """Account for a request aiohttp's parser refused before any route or middleware saw it: like
    any unauthenticated refusal (allowance, then counted; it spends the source's failure budget),
    as action `http.request` with no route. Called from the connection's handler, which cannot
    wait: the counting is done here, and only what needs a statement — a refusal that may stand
    alone, a token of a budget not known to be spent — becomes a task (a flood of garbage costs
    a count each, not a task each, once past the allowance and the budget)."""
    if LEDGER not in app:  # the app is not started, or already stopped
        return
    source = source_key(ip)
    spend = 400 <= status < 500 and not app[FAILURES].known_empty(source)
    key = RefusalKey(source, "http.request", None, code, status)
    window = app[LEDGER].admit(key, alone=True)
    if window is None and not spend:
        return
    task = asyncio.get_running_loop().create_task(_account_unparsed(app, key, ip, window, spend=spend))
    _UNPARSED.add(task)
    task.add_done_callback(_UNPARSED.discard)


async def _account_unparsed(
    app: web.Application, key: RefusalKey, ip: str | None, window: int | None, *, spend: bool
) -> None:
    if spend:
        await _spend(app, key.source)
    if window is None:
        return
    ctx = Context(ip=ip, request_id=secrets.token_hex(8))
    outcome: Outcome = "error" if key.status >= 500 else "denied"
    details = {"method": None, "route": None, "status": key.status}
    await _ask(app, window, key, ctx, Entry(key.action, outcome, key.code, None, details))


async def flush(app: web.Application, *, final: bool = False) -> int:
    """Add this replica's counts to the shared rows; then, if windows have ended (by the grace;
    by now if `final`), append their summaries, and if `final` those of the suppressed counts
    of the current window so far. Return how many summaries this call appended. On a database
    failure the counts not yet added are kept for the next flush, and DependencyError raised."""
    ledger = app[LEDGER]
    db = app[DB]
    async with ledger.lock:
        counts = ledger.take_counts()
        if counts:
            try:
                added = await refusalcounts.add_suppressed(
                    db, counts, max_keys=ledger.max_keys, has_row=ledger.rows_known()
                )
            except DependencyError:
                ledger.restore_counts(counts)
                raise
            ledger.learn(added)
        now = app[CLOCK]()
        ended_by = now if final else now - int(SUMMARY_GRACE_S * 1000)
        if not final:
            oldest = await refusalcounts.oldest_window(db)
            if oldest is None or oldest + ledger.window_ms > ended_by:
                return 0
        summaries = await refusalcounts.summarise(
            db, app[AUDIT], window_ms=ledger.window_ms, ended_by_ms=ended_by, now_ms=now, final=final
        )
        app[METRICS].refusal_summaries.inc(len(summaries))
        return len(summaries)


async def purge(app: web.Application) -> int:
    """Delete the shared token buckets that are full again (of every kind); return how many."""
    return await ratebuckets.purge(app[DB], app[CLOCK]())


async def _flush_forever(app: web.Application, tick_s: float) -> None:
    loop = asyncio.get_running_loop()
    purge_at = loop.time() + _PURGE_EVERY_S
    while True:
        await asyncio.sleep(tick_s)
        try:
            # Shielded: stopping the service must not cut off counts already taken from the
            # ledger; the final flush waits for this one (the lock) before it writes the rest.
            await asyncio.shield(flush(app))
        except DependencyError as exc:
            log.warning("refusal counts kept for later: %s", exc.code)
        if loop.time() >= purge_at:
            purge_at = loop.time() + _PURGE_EVERY_S
            try:
                await purge(app)
            except DependencyError as exc:
                log.warning("token bucket purge skipped: %s", exc.code)


def setup_ledger(app: web.Application) -> None:
    """The ledger, the failure budgets and the memory of recent signers (api/lifetime.py, once
    the database is open)."""
    settings = app[SETTINGS]
    app[LEDGER] = RefusalLedger(
        window_s=settings.refusal_log_window_s,
        allowance=settings.refusal_log_allowance_events,
        max_keys=settings.refusal_log_max_keys,
        clock=app[CLOCK],
    )
    app[FAILURES] = SharedBuckets(
        app[DB],
        kind="auth-failure",
        per_min=settings.auth_failure_requests_per_min,
        burst=settings.auth_failure_burst_requests,
        clock=app[CLOCK],
    )
    app[SIGNERS] = _Signers(_MAX_SIGNERS)


async def flush_forever(app: web.Application) -> None:
    """The background task that adds counts, writes the summaries of ended windows and purges
    full token buckets."""
    await _flush_forever(app, min(_FLUSH_TICK_S, float(app[SETTINGS].refusal_log_window_s)))


async def final_flush(app: web.Application) -> None:
    """At shutdown, after the flusher stopped and before the database closes: the rest."""
    try:
        await flush(app, final=True)
    except DependencyError as exc:
        log.warning(
            "%d counted refusals not added to the shared counts at shutdown: %s",
            app[LEDGER].pending,
            exc.code,
        )
