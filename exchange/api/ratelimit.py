"""Token buckets per source and per link, shared by every replica, and the key a source is counted under.

A bucket holds up to `burst` tokens and refills at `per_min` tokens a minute; each request
takes one. Link redemption has one bucket per source and one per link (`redeem_*` settings);
the pipeline has one per source for refused unauthenticated requests (`auth_failure_*`, see
`api.refusals`). The buckets live in the database (`services.ratebuckets`: one row per key, each
take one atomic statement), so every replica draws on the same ones: a source gets the rate
the settings say, however many replicas it is spread over.

Each `SharedBuckets` also keeps, in this replica's memory, a mirror of the buckets the database
has shown it empty (after a spend, or a refused take): the bucket as the database said, then
drawn on by the requests `check` lets through once tokens come back. Buckets only fill with time
and takers elsewhere only drain them, so while the mirror is empty the answer is certainly 429
and needs no statement. `check` answers from the mirror alone, which is what lets
`refusals.gate` stay free of I/O; every spend and refused take sets the mirror to the database's
word again. A replica learns that a bucket is empty the first time it uses it and finds it so:
one request more per replica than one process would allow (plus those already past the gate at
that moment). While a source keeps at it, each replica's mirror lets through one request per
token the source regains, and that request's statement finds the token taken if another
replica's got it first: with N replicas the source is refused in full up to N times per token,
then answered 429 up front again. The mirror is bounded (`max_known` keys, the oldest forgotten
first; forgetting costs a statement, never a wrong answer), and a mirror full again is dropped.

A source is an IPv4 address, or an IPv6 /64 (`source_key`): one subscriber usually holds a
whole /64 and may send from any of its 2^64 addresses, so a key per IPv6 address would be no
limit at all. An IPv4-mapped IPv6 address (`::ffff:192.0.2.1`, from a dual-stack socket) is the
IPv4 address it maps.

What this module does not do: decide anything about links; purge full buckets (the refusal
flusher's tick does, `refusals.flush_forever`); or read forwarding headers (the address it is
given is the client's, as the pipeline established it). If the database is unavailable, `take`
raises DatabaseUnavailable (a redemption needs the database anyway: it fails closed), and
`spend` raises it for the caller to decide.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Callable, Sequence

from ..db import Database
from ..errors import RateLimited
from ..services import ratebuckets

__all__ = ["SharedBuckets", "source_key", "take_each"]


def source_key(ip: str | None) -> str:
    """The key per-source limits count `ip` under: IPv4 as it is, IPv6 by its /64 network."""
    if not ip:
        return "-"  # not an IP peer (a Unix socket): one source
    try:
        address = ipaddress.ip_address(ip.partition("%")[0])  # no zone: fe80::1%eth0 is fe80::1
    except ValueError:
        return ip[:64]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))
    return str(address)


class SharedBuckets:
    """One kind of bucket (`kind`, the namespace of its keys) in the shared table, and this
    replica's mirror of the buckets it has seen empty."""

    def __init__(
        self,
        db: Database,
        *,
        kind: str,
        per_min: int,
        burst: int,
        clock: Callable[[], int],
        max_known: int = 100_000,
    ) -> None:
        self.kind = kind
        self.rate = ratebuckets.Rate(per_min=per_min, burst=burst)
        self._db = db
        self._clock = clock
        self._max_known = max_known
        #: Bucket key -> (its `full_at_us` as the database last said, the same advanced by the
        #: requests `check` let through since): oldest first.
        self._known: OrderedDict[str, tuple[int, int]] = OrderedDict()

    def key(self, key: str | bytes) -> str:
        """The bucket's row key: the kind, then the key (bytes as hex)."""
        return f"{self.kind}:{key.hex() if isinstance(key, bytes) else key}"

    async def take(self, key: str | bytes, what: str) -> None:
        """Take one token for `key`, or raise RateLimited saying when to retry. One statement,
        none while this replica's mirror says the bucket is empty."""
        await take_each([(self, key, what)])

    def check(self, key: str | bytes, what: str) -> None:
        """Raise RateLimited if this replica's mirror says `key`'s bucket has no token now; asks
        nobody. A request that passes counts against the mirror (not the bucket: only `take` and
        `spend` do), so that the requests arriving together as a token comes back do not all
        pass; a bucket this replica has not seen, or whose mirror is full again, passes."""
        row_key = self.key(key)
        known = self._known.get(row_key)
        if known is None:
            return
        shared, mirror = known
        now = self._clock() * 1000
        interval = self.rate.interval_us
        if mirror <= now:
            del self._known[row_key]  # full again: the same as never seen
            return
        if mirror > now + (self.rate.burst - 1) * interval:
            raise _limited(-(-(mirror - (self.rate.burst - 1) * interval - now) // 1000), what)
        self._known[row_key] = (shared, max(mirror, now) + interval)

    def known_empty(self, key: str | bytes) -> bool:
        """Whether the database said `key`'s bucket is empty until a time still to come."""
        known = self._known.get(self.key(key))
        return known is not None and self.rate.token_back_at_ms(known[0]) > self._clock()

    async def spend(self, key: str | bytes) -> None:
        """Take one token for `key` if it has one; never raise RateLimited (the request is already
        refused). A bucket known to be empty is left as it is, without a statement: spending from
        it could only keep it empty."""
        if self.known_empty(key):
            return
        row_key = self.key(key)
        now = self._clock()
        full_at = await ratebuckets.spend(self._db, row_key, self.rate, now)
        if self.rate.token_back_at_ms(full_at) > now:
            self._remember(row_key, full_at)
        else:
            self._known.pop(row_key, None)  # tokens left: nothing to refuse up front

    def _remember(self, row_key: str, full_at_us: int) -> None:
        self._known[row_key] = (full_at_us, full_at_us)
        self._known.move_to_end(row_key)
        while len(self._known) > self._max_known:
            self._known.popitem(last=False)

    def __len__(self) -> int:
        """Buckets this replica mirrors (some may have refilled since)."""
        return len(self._known)


async def take_each(takes: Sequence[tuple[SharedBuckets, str | bytes, str]]) -> None:
    """Take one token from each (buckets, key, what) — of one database — in one statement, or
    raise RateLimited naming the first that is empty, with the time until all have a token
    again (said by this replica's mirror, without a statement, when it can). A refusal may
    still have taken the others' tokens."""
    for buckets, key, what in takes:
        buckets.check(key, what)
    first = takes[0][0]
    now = first._clock()
    rows = [(buckets.key(key), buckets.rate) for buckets, key, _ in takes]
    empty = await ratebuckets.take(first._db, rows, now)
    if not empty:
        return
    back = now
    named: str | None = None
    for (buckets, _, what), (row_key, _) in zip(takes, rows, strict=True):
        if row_key in empty:
            buckets._remember(row_key, empty[row_key])
            back = max(back, buckets.rate.token_back_at_ms(empty[row_key]))
            named = named or what
    raise _limited(back - now, named or takes[0][2])


def _limited(wait_ms: int, what: str) -> RateLimited:
    retry_s = max(1, -(-wait_ms // 1000))
    return RateLimited(f"too many requests {what}; retry in {retry_s} s", retry_after_s=retry_s)
