"""Token buckets shared by every replica: one row per key in `rate_buckets`, one statement per use.

A bucket holds up to `burst` tokens and refills at `per_min` tokens a minute: one token every
`interval`. It is stored as a single time, when it will be full again (`full_at_us`; the
"theoretical arrival time" of the generic cell rate algorithm): at `now` it holds
`burst - max(0, full_at_us - now) / interval` tokens, so it has a token to give while
`full_at_us <= now + (burst - 1) * interval`, and giving one moves `full_at_us` one interval on
(from `now`, if the bucket was full). That makes `take` one guarded UPSERT whose row lock orders
concurrent takers from any replica: of N concurrent takes on a bucket holding B tokens, exactly
min(N, B) succeed. One statement takes from several buckets at once (a redemption's source and
link), each row with its own guard. `spend` is the same without the guard, never below empty,
and returns the new `full_at_us`. A full bucket is indistinguishable from no row at all, so
`purge` deletes those: the table holds the keys used within about one refill time
(`burst * interval`) plus the purge period.

Times come from the caller's clock (the app's, in ms; stored in µs, so that a rate of up to
60,000,000 a minute keeps a whole interval). Replicas' clocks differ a little: a bucket is never
refilled into the past (`max(full_at_us, now)`), and a replica whose clock runs d ahead sees d's
worth of refill early; nothing worse.

What this module does not do: decide which keys exist (callers namespace them: `redeem-ip:…`,
`redeem-link:…`, `auth-failure:…`), remember anything between calls (the api's `SharedBuckets`
keeps a replica's "empty until" memory), or make a bucket durable beyond its transaction: losing
rows only refills buckets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..db import Database, placeholders

__all__ = ["Rate", "purge", "spend", "take"]

_US_PER_MIN = 60_000_000

# $1 key, $2 now, $3 interval, $4 now + interval, $5 now + burst * interval (an empty bucket): one
# token less, but never fewer than none; a `full_at_us` beyond that (set by a replica whose clock
# is ahead) is left as it is.
_SPEND = (
    "INSERT INTO rate_buckets (key, full_at_us) VALUES ($1, $4)"
    " ON CONFLICT (key) DO UPDATE SET full_at_us = CASE"
    " WHEN rate_buckets.full_at_us <= $2 THEN $4"
    " WHEN rate_buckets.full_at_us + $3 <= $5 THEN rate_buckets.full_at_us + $3"
    " WHEN rate_buckets.full_at_us < $5 THEN $5"
    " ELSE rate_buckets.full_at_us END"
    " RETURNING full_at_us"
)


@dataclass(frozen=True)
class Rate:
    """A bucket's shape: `burst` tokens, refilled at `per_min` a minute (both positive)."""

    per_min: int
    burst: int

    def __post_init__(self) -> None:
        if self.per_min < 1 or self.burst < 1:
            raise ValueError("a rate needs a positive per_min and burst")

    @property
    def interval_us(self) -> int:
        """How long one token takes to come back, rounded up (never faster than the setting)."""
        return -(-_US_PER_MIN // self.per_min)

    def token_back_at_ms(self, full_at_us: int) -> int:
        """When a bucket that will be full at `full_at_us` has one token again (ms, rounded up)."""
        return -(-(full_at_us - (self.burst - 1) * self.interval_us) // 1000)


async def take(db: Database, buckets: Sequence[tuple[str, Rate]], now_ms: int) -> dict[str, int]:
    """Take one token from each of `buckets` (key, rate; distinct keys) in one statement: {} if
    all gave one, else the `full_at_us` of each that is empty now (`Rate.token_back_at_ms` says
    when it has a token again). One of those had no token; the others gave theirs (the one
    that refused cannot be told from one this take emptied, nor need it be: the request waits
    for both).

    Only a refusal reads the buckets again, to say until when."""
    now = now_ms * 1000
    args: list[Any] = [now]
    rows, slack = [], []
    for key, rate in buckets:
        n = len(args) + 1
        args += [key, now + rate.interval_us, now + (rate.burst - 1) * rate.interval_us]
        rows.append(f"(${n}, ${n + 1})")
        slack.append(f" WHEN ${n} THEN CAST(${n + 2} AS BIGINT)")
    # A new row is a full bucket less the token taken (now + interval, the value inserted; so an
    # existing bucket's interval is `excluded.full_at_us - now`). The guard is the DO UPDATE's
    # WHERE: a bucket without a token (`full_at_us` beyond now + (burst - 1) * interval) is left
    # as it is, and its row not counted.
    taken = await db.execute(
        "INSERT INTO rate_buckets (key, full_at_us) VALUES "  # noqa: S608 - fixed text, bound values
        + ", ".join(rows)
        + " ON CONFLICT (key) DO UPDATE SET full_at_us = CASE WHEN rate_buckets.full_at_us > $1"
        " THEN rate_buckets.full_at_us + excluded.full_at_us - $1 ELSE excluded.full_at_us END"
        " WHERE rate_buckets.full_at_us <= CASE rate_buckets.key" + "".join(slack) + " END",
        *args,
    )
    if taken == len(buckets):
        return {}
    keys = [key for key, _ in buckets]
    found = await db.fetchall(
        f"SELECT key, full_at_us FROM rate_buckets WHERE key IN ({placeholders(1, len(keys))})",  # noqa: S608
        *keys,
    )
    full_at = {r["key"]: int(r["full_at_us"]) for r in found}
    empty = {
        key: full_at[key]
        for key, rate in buckets
        if key in full_at and rate.token_back_at_ms(full_at[key]) > now_ms
    }
    # None empty any more (a row purged, or a token back, meanwhile): the first, to retry soon.
    return empty or {keys[0]: now + (buckets[0][1].burst - 1) * buckets[0][1].interval_us + 1000}


async def spend(db: Database, key: str, rate: Rate, now_ms: int) -> int:
    """Take one token from `key`'s bucket if it has one, never going below empty; return the
    bucket's `full_at_us` afterwards. One statement."""
    now = now_ms * 1000
    interval = rate.interval_us
    async with db.transaction() as conn:
        full_at = await conn.fetchval(_SPEND, key, now, interval, now + interval, now + rate.burst * interval)
    return int(full_at)


async def purge(db: Database, now_ms: int) -> int:
    """Delete the rows of full buckets (the same as none); return how many."""
    return await db.execute("DELETE FROM rate_buckets WHERE full_at_us <= $1", now_ms * 1000)
