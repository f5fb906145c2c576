"""Anonymous refusals counted per key and window, shared by every replica (`refusal_counts`).

`api/refusals.py` decides which refusals are counted and keeps what one replica knows; this
module holds the statements that make its decisions global:

* `record_within_allowance`: in one transaction, the key's `recorded` is raised by a guarded
  UPSERT (`recorded < allowance`) and, only if it was, the refusal's event appended. So the first
  `allowance` refusals of a key in a window, across all replicas, stand alone, and a refusal
  whose event could not be appended (the database failed) is not counted as recorded either.
* `add_suppressed`: what a replica only counted, added to the rows in one transaction (a delta
  per key, so that concurrent replicas' additions sum).
* `summarise`: in one transaction, the rows of ended windows are deleted (DELETE … RETURNING:
  of two replicas doing it at once, the second finds them gone) and one `http.refusals` event per
  key with suppressed refusals appended. A delta added after that makes a new row, summarised
  later: a key may then have two summaries for one window, whose sum is exact.

The keys of a window are bounded: a key's first row claims a place in `refusal_windows` (at most
`max_keys` per window); a key that finds none is counted under `OTHER`, which needs no place.
Claims lock the window's row and look for the key's row again once they hold it, so two replicas
writing the same new key at once claim one place. Transactions that lock rows of several tables
take them in one order — the window's row, the counts (sorted), the audit head — so that
concurrent transactions wait for each other rather than deadlock (were two to deadlock all the
same, PostgreSQL aborts one: its counts stay in memory for the next flush).

What this module does not do: decide what is counted (api/refusals.py), or know about requests.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ..db import Connection, Database, Row, placeholders
from .audit import SYSTEM, AuditLog, Context, Entry, Outcome

__all__ = [
    "OTHER",
    "OTHER_SOURCE",
    "SUMMARY_ACTION",
    "Added",
    "Admission",
    "RefusalKey",
    "Summary",
    "add_suppressed",
    "record_within_allowance",
    "summarise",
]

#: The action of a window's summary of one key.
SUMMARY_ACTION = "http.refusals"
#: The source of the summary that holds the keys beyond `refusal_log_max_keys`.
OTHER_SOURCE = "other"
#: Rows written, or sources looked up, per statement (a statement's bound parameters stay few).
_CHUNK = 500

_COLUMNS = "window_start_ms, source, action, route, code, status"
# $1..$6: the window and the key's columns.
_HAS_ROW = (
    "SELECT 1 FROM refusal_counts WHERE window_start_ms = $1 AND source = $2 AND action = $3"
    " AND route = $4 AND code = $5 AND status = $6"
)
# $7: the allowance. Raises `recorded` only while below it (rowcount 0 otherwise).
_RAISE_RECORDED = (
    "INSERT INTO refusal_counts (window_start_ms, source, action, route, code, status, recorded, suppressed)"
    " VALUES ($1, $2, $3, $4, $5, $6, 1, 0)"
    " ON CONFLICT (window_start_ms, source, action, route, code, status)"
    " DO UPDATE SET recorded = refusal_counts.recorded + 1 WHERE refusal_counts.recorded < $7"
)
_RETURNED = f"RETURNING {_COLUMNS}, recorded, suppressed"
_TAKE_ENDED = f"DELETE FROM refusal_counts WHERE window_start_ms <= $1 {_RETURNED}"  # noqa: S608 - fixed text
# The current window's rows with suppressed counts, taken whole (RETURNING gives the old values
# only of a DELETE) and put back with their `recorded` alone, in the same transaction.
_TAKE_SUPPRESSED = f"DELETE FROM refusal_counts WHERE window_start_ms > $1 AND suppressed > 0 {_RETURNED}"  # noqa: S608 - fixed text


@dataclass(frozen=True, order=True)
class RefusalKey:
    """What refusals are counted under: who (a source), where (route), and which refusal."""

    source: str
    action: str
    route: str | None
    code: str
    status: int

    def columns(self) -> tuple[str, str, str, str, int]:
        """The key as its row stores it: no route is ''."""
        return self.source, self.action, self.route or "", self.code, self.status

    @classmethod
    def from_row(cls, row: Row) -> RefusalKey:
        return cls(row["source"], row["action"], row["route"] or None, row["code"], int(row["status"]))


#: The one key that every key beyond a window's bound is folded into.
OTHER = RefusalKey(OTHER_SOURCE, "*", None, "*", 0)


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


#: What `record_within_allowance` did: appended the event ("alone"); found the key's allowance
#: used up ("counted"); or found no place for a new key in the window ("folded").
Admission = Literal["alone", "counted", "folded"]


async def record_within_allowance(
    db: Database,
    audit: AuditLog,
    ctx: Context,
    entry: Entry,
    *,
    window_start_ms: int,
    key: RefusalKey,
    allowance: int,
    max_keys: int,
    has_row: bool = False,
) -> Admission:
    """Append `entry` if `key` has allowance left in the window, counting it as recorded, in one
    transaction. `has_row`: the caller knows the key's row exists (no place to claim)."""
    args = (window_start_ms, *key.columns())
    async with db.transaction() as conn:
        new_key = not has_row and await conn.fetchval(_HAS_ROW, *args) is None
        if new_key and not await _claim(conn, window_start_ms, [key], max_keys):
            return "folded"
        raised = await conn.execute(_RAISE_RECORDED, *args, allowance)
        if not raised:
            return "counted"
        await audit.append_many(conn, ctx, [entry])
    return "alone"


@dataclass
class Added:
    """What `add_suppressed` learnt: the (window, key) pairs that now have a row, and the windows
    that had no place left for a new key (whose counts went to `OTHER`)."""

    rows: set[tuple[int, RefusalKey]] = field(default_factory=set)
    full: set[int] = field(default_factory=set)


async def add_suppressed(
    db: Database,
    counts: Mapping[tuple[int, RefusalKey], int],
    *,
    max_keys: int,
    has_row: Collection[tuple[int, RefusalKey]] = (),
) -> Added:
    """Add `counts` (refusals only counted, by window and key) to the shared rows, in one
    transaction. A key without a row claims a place in its window, or is added to `OTHER`."""
    by_window: dict[int, dict[RefusalKey, int]] = {}
    for (window, key), n in counts.items():
        if n > 0:
            by_window.setdefault(window, {})[key] = by_window.get(window, {}).get(key, 0) + n
    added = Added()
    if not by_window:
        return added
    async with db.transaction() as conn:
        rows: list[tuple[int, RefusalKey, int]] = []
        for window, keyed in sorted(by_window.items()):
            unknown = sorted(k for k in keyed if k != OTHER and (window, k) not in has_row)
            present = await _present(conn, window, unknown)
            new = [k for k in unknown if k not in present]
            granted = await _claim(conn, window, new, max_keys) if new else []
            folded = [k for k in new if k not in granted]
            if folded:
                added.full.add(window)
                keyed[OTHER] = keyed.get(OTHER, 0) + sum(keyed.pop(k) for k in folded)
            rows.extend((window, k, n) for k, n in keyed.items())
        rows.sort()  # one lock order for every replica
        await _add(conn, [(window, k, 0, n) for window, k, n in rows])
    added.rows = {(window, k) for window, k, _ in rows if k != OTHER}
    return added


async def summarise(
    db: Database,
    audit: AuditLog,
    *,
    window_ms: int,
    ended_by_ms: int,
    now_ms: int,
    final: bool = False,
) -> list[Summary]:
    """Take the rows of the windows that ended by `ended_by_ms` and append one summary per key
    with suppressed refusals, in one transaction; return the summaries. `final` (this replica
    stops): the later windows' suppressed counts too (their rows stay, with `recorded`, for the
    replicas still counting), summarised as ending `now_ms`."""
    last_start = ended_by_ms - window_ms  # the latest window start that has ended
    async with db.transaction() as conn:
        await conn.execute("DELETE FROM refusal_windows WHERE window_start_ms <= $1", last_start)
        taken = [
            _summary(r, int(r["window_start_ms"]) + window_ms)
            for r in await conn.fetchall(_TAKE_ENDED, last_start)
        ]
        if final:
            current = await conn.fetchall(_TAKE_SUPPRESSED, last_start)
            await _add(
                conn, [(r["window_start_ms"], RefusalKey.from_row(r), r["recorded"], 0) for r in current]
            )
            taken += [_summary(r, now_ms) for r in current]
        summaries = sorted((s for s in taken if s.suppressed > 0), key=lambda s: (s.window_start_ms, s.key))
        if summaries:
            await audit.append_many(conn, Context(actor=SYSTEM), [s.to_entry() for s in summaries])
    return summaries


async def oldest_window(db: Database) -> int | None:
    """The start of the oldest window that has counts (ms), if any: a cheap look before `summarise`."""
    value = await db.fetchval("SELECT MIN(window_start_ms) FROM refusal_counts")
    return None if value is None else int(value)


def _summary(row: Row, end_ms: int) -> Summary:
    return Summary(
        RefusalKey.from_row(row),
        recorded=int(row["recorded"]),
        suppressed=int(row["suppressed"]),
        window_start_ms=int(row["window_start_ms"]),
        window_end_ms=end_ms,
    )


async def _add(conn: Connection, rows: list[tuple[int, RefusalKey, int, int]]) -> None:
    """Add (window, key, recorded, suppressed) to the rows, making those missing; in the order
    given (callers sort it: one lock order for every replica)."""
    for start in range(0, len(rows), _CHUNK):
        chunk = rows[start : start + _CHUNK]
        await conn.execute(
            f"INSERT INTO refusal_counts ({_COLUMNS}, recorded, suppressed) VALUES "  # noqa: S608 - fixed text
            + ", ".join(f"({placeholders(8 * i + 1, 8)})" for i in range(len(chunk)))
            + f" ON CONFLICT ({_COLUMNS}) DO UPDATE"
            " SET recorded = refusal_counts.recorded + excluded.recorded,"
            " suppressed = refusal_counts.suppressed + excluded.suppressed",
            *[v for window, k, recorded, n in chunk for v in (window, *k.columns(), recorded, n)],
        )


async def _present(conn: Connection, window: int, keys: Iterable[RefusalKey]) -> set[RefusalKey]:
    """Which of `keys` have a row in `window` (looked up by source, filtered here)."""
    wanted = set(keys)
    sources = sorted({k.source for k in wanted})
    found: set[RefusalKey] = set()
    for start in range(0, len(sources), _CHUNK):
        chunk = sources[start : start + _CHUNK]
        rows = await conn.fetchall(
            f"SELECT {_COLUMNS} FROM refusal_counts WHERE window_start_ms = $1"  # noqa: S608 - fixed text
            f" AND source IN ({placeholders(2, len(chunk))})",
            window,
            *chunk,
        )
        found |= {k for k in map(RefusalKey.from_row, rows) if k in wanted}
    return found


async def _claim(conn: Connection, window: int, keys: list[RefusalKey], max_keys: int) -> set[RefusalKey]:
    """Claim places in `window` for `keys`, found without a row; return those that have one now
    (granted, or made by someone else meanwhile). The first statement locks the window's row (or
    makes it), so claims from replicas take turns, and each looks again for rows once it holds
    the lock (a statement sees what was committed before it began): one key, one place."""
    used = await conn.fetchval(
        "INSERT INTO refusal_windows (window_start_ms, keys) VALUES ($1, 0) ON CONFLICT (window_start_ms)"
        " DO UPDATE SET keys = refusal_windows.keys RETURNING keys",
        window,
    )
    made = await _present(conn, window, keys)
    new = [k for k in keys if k not in made]
    granted = new[: max(0, max_keys - int(used))]
    if granted:
        await conn.execute(
            "UPDATE refusal_windows SET keys = keys + $2 WHERE window_start_ms = $1", window, len(granted)
        )
    return made | set(granted)
