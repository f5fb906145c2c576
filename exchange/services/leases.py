"""Leases in the database: one replica at a time does a job, and a replica that lost it cannot write.

Several stateless replicas share one database; a few jobs must be done by one of them at a time
(signing the audit log's checkpoints, `SIGNER_LEASE`). A lease is a row of `leases`: its name,
its holder (`process_holder()`: a random id made once per process, with the host name and pid
for people reading the row), a fence and an expiry.

- `Lease.acquire()` takes or renews the lease in ONE statement (an upsert whose update is
  guarded): it takes the lease if it is free or expired (a new term: fence + 1) or renews it if
  this process holds it (the same term: fence unchanged), and does nothing otherwise. Two
  replicas racing for a free or expired lease cannot both win: PostgreSQL makes the second
  upsert wait for the first's row and re-check its guard against the row the first wrote,
  SQLite has one writer.
- `Lease.keep_forever()` calls it every third of the TTL (`audit_signer_lease_s`): a holder
  renews long before its lease expires, and a replica waiting takes over at most one renew
  interval after an expiry, so within TTL + TTL/3 of the holder's death.
- `Lease.check(conn, fence)` is the fence. Inside the caller's own write transaction, before it
  writes anything, `UPDATE leases … WHERE name = … AND holder = … AND fence = …` must change one
  row; it also locks that row until the transaction ends, so no other replica can take the lease
  (its upsert waits on the lock and then finds the lease renewed) while the write commits. If it
  changed no row, the lease passed to another term: the caller rolls back and steps down.
  This, not the clock, is what keeps two terms from both writing: a process paused for longer
  than its TTL (GC, SIGSTOP, a VM migration) wakes up believing it holds the lease, and its
  first write fails here.
- `Lease.release()` (on a graceful stop) marks the lease expired and stops this process from
  taking it again, so a rolling restart hands it over at the next attempt of another replica,
  not a TTL later.

The clock. By default the lease is judged by the database's clock (PostgreSQL
`clock_timestamp()`, SQLite `julianday('now')`): every contender compares one expiry against
one clock, so replicas whose clocks disagree by seconds (NTP off, a VM resumed) neither steal a
healthy lease nor wait long past an expiry. SQLite's clock is the one host's anyway. The holder
judges its own lease by its monotonic clock from before it sent the statement, so it steps down
no later than the database would let another replica in (and if it is paused past that point,
the fence stops it). Tests may pass a clock instead (milliseconds, e.g. the FakeClock): then
that clock is bound into the statements and judges both sides, so expiry and takeover can be
tested without sleeping.

"We hold it" is "the row names our holder": holder ids are unique per process, and a term's
fence changes only when the holder does, so a second `Lease` object of the same process (a
restarted publisher, a test) joins the running term instead of waiting it out.

What this module does not do: decide what the lease guards (the caller checks the fence in
every transaction that writes under it), queue contenders fairly, or detect that a holder is
alive other than by its renewals.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..db import Connection, Database
from ..errors import DependencyError

__all__ = ["SIGNER_LEASE", "Lease", "Term", "process_holder", "read_lease"]

log = logging.getLogger("exchange.leases")

#: The lease of the one replica that signs checkpoints and appends heartbeats.
SIGNER_LEASE = "audit.signer"

# The database's own clock, in milliseconds since the epoch. PostgreSQL's clock_timestamp() is
# the time of the call (now() would be the transaction's start); SQLite's 'now' is fixed within
# one statement. 2440587.5 is the Julian day of the Unix epoch.
_DB_NOW = {
    "postgresql": "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
    "sqlite": "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)",
}

_holder: tuple[int, str] | None = None


def process_holder() -> str:
    """This process's holder id: `host/pid/random`. The random part makes it unique (a pid is
    reused, and two hosts may share a name); the rest is for people reading the row."""
    global _holder
    pid = os.getpid()
    if _holder is None or _holder[0] != pid:  # made afresh in a forked child
        _holder = (pid, f"{socket.gethostname()}/{pid}/{secrets.token_hex(8)}")
    return _holder[1]


@dataclass(frozen=True)
class Term:
    """A lease as this process holds it: the fence of its term and the expiry the row records."""

    name: str
    holder: str
    fence: int
    expires_at_ms: int


async def read_lease(db: Database, name: str) -> Term | None:
    """The lease row as stored (whoever holds it, expired or not), if anyone ever took it."""
    row = await db.fetchone("SELECT name, holder, fence, expires_at_ms FROM leases WHERE name = $1", name)
    if row is None:
        return None
    return Term(str(row["name"]), str(row["holder"]), int(row["fence"]), int(row["expires_at_ms"]))


class Lease:
    """One named lease as seen by this process: take it, keep it, check it, give it back."""

    def __init__(
        self,
        db: Database,
        name: str,
        *,
        ttl_s: float,
        holder: str | None = None,
        clock: Callable[[], int] | None = None,
    ) -> None:
        if not 0 < ttl_s < float("inf"):
            raise ValueError("a lease's TTL must be a positive, finite number of seconds")
        self.db = db
        self.name = name
        self.holder = holder if holder is not None else process_holder()
        self.ttl_ms = max(1, round(ttl_s * 1000))
        self.clock = clock
        #: The term this process holds, as of its last successful statement (None: not held).
        self.term: Term | None = None
        self._valid_until = 0.0
        self._released = False

    @property
    def renew_interval_s(self) -> float:
        return self.ttl_ms / 3000

    @property
    def held(self) -> bool:
        """Whether this process may act under the lease now, by its own clock (the fence is
        checked again by every write)."""
        return self.term is not None and self._now_s() < self._valid_until

    @property
    def fence(self) -> int | None:
        return self.term.fence if self.held and self.term is not None else None

    def _now_s(self) -> float:
        return self.clock() / 1000 if self.clock is not None else time.monotonic()

    def _now_sql(self, n: int) -> tuple[str, tuple[int, ...]]:
        """The SQL for "now" and its arguments, the next placeholder being `$n`."""
        if self.clock is None:
            return _DB_NOW[self.db.dialect], ()
        return f"CAST(${n} AS BIGINT)", (self.clock(),)

    async def acquire(self) -> Term | None:
        """Take the lease if it is free or expired, renew it if this process holds it; the term
        held afterwards, or None (another replica holds it)."""
        if self._released:
            return None  # given up for good: this process is stopping
        sent = self._now_s()
        now, args = self._now_sql(4)
        async with self.db.transaction() as conn:
            # One statement: the guard of the update decides, under the row's lock.
            row = await conn.fetchone(
                "INSERT INTO leases (name, holder, fence, expires_at_ms)"  # noqa: S608 - fixed fragments, placeholders only
                f" VALUES ($1, $2, 1, {now} + $3)"
                " ON CONFLICT (name) DO UPDATE SET"
                "  fence = CASE WHEN leases.holder = excluded.holder"
                "   THEN leases.fence ELSE leases.fence + 1 END,"
                "  holder = excluded.holder,"
                "  expires_at_ms = excluded.expires_at_ms"
                f" WHERE leases.holder = excluded.holder OR leases.expires_at_ms <= {now}"
                " RETURNING fence, expires_at_ms",
                self.name,
                self.holder,
                self.ttl_ms,
                *args,
            )
        if row is None:
            self.term, self._valid_until = None, 0.0
            return None
        term = Term(self.name, self.holder, int(row["fence"]), int(row["expires_at_ms"]))
        if self.term is not None and term.fence != self.term.fence:
            log.info("lease %s: a new term %d for this process", self.name, term.fence)
        elif self.term is None:
            log.info("lease %s taken: term %d", self.name, term.fence)
        self.term, self._valid_until = term, sent + self.ttl_ms / 1000
        return term

    async def check(self, conn: Connection, fence: int) -> bool:
        """Inside the caller's write transaction, before it writes: whether this process still
        holds the lease in the term `fence` (and, if so, the row is locked and renewed until the
        transaction ends). False: roll back and step down."""
        now, args = self._now_sql(5)
        changed = await conn.execute(
            f"UPDATE leases SET expires_at_ms = {now} + $4"  # noqa: S608 - fixed fragments, placeholders only
            " WHERE name = $1 AND holder = $2 AND fence = $3",
            self.name,
            self.holder,
            fence,
            self.ttl_ms,
            *args,
        )
        return changed == 1

    def step_down(self) -> None:
        """Forget the term: a fenced write found the lease in another term."""
        if self.term is not None:
            log.warning(
                "lease %s: term %d is over, another replica holds the lease", self.name, self.term.fence
            )
        self.term, self._valid_until = None, 0.0

    async def release(self) -> None:
        """Give the lease up for good (a graceful stop), so the next replica need not wait for it
        to expire; this object takes it no more. A database that does not answer is left to the
        expiry."""
        self._released = True
        term, self.term, self._valid_until = self.term, None, 0.0
        if term is None:
            return
        try:
            await self.db.execute(
                "UPDATE leases SET expires_at_ms = 0 WHERE name = $1 AND holder = $2 AND fence = $3",
                self.name,
                self.holder,
                term.fence,
            )
        except DependencyError:
            log.warning("lease %s not released (database unavailable): it expires on its own", self.name)

    async def keep_forever(self) -> None:
        """Take or renew the lease now and every `renew_interval_s`, for the life of the task."""
        while True:
            try:
                await self.acquire()
            except DependencyError:
                log.warning("lease %s not renewed: database unavailable", self.name)
            await asyncio.sleep(self.renew_interval_s)
