"""Token buckets per source, in memory per replica, and the key a source is counted under.

A bucket holds up to `burst` tokens and refills at `per_min` tokens a minute; each request
takes one. Link redemption has one bucket per source and one per link (`redeem_*` settings);
the pipeline has one per source for refused unauthenticated requests (`auth_failure_*`, see
`api.refusals`). With N replicas behind a balancer a client gets up to N times the rate: the
point is to make guessing tokens (256 bits), hammering one link and flooding refusals
expensive, not to meter exactly. The table of buckets is bounded: when full, the buckets that
have refilled completely (indistinguishable from new ones) are dropped, and if none has, the
oldest are.

A source is an IPv4 address, or an IPv6 /64 (`source_key`): one subscriber usually holds a
whole /64 and may send from any of its 2^64 addresses, so a key per IPv6 address would be no
limit at all. An IPv4-mapped IPv6 address (`::ffff:192.0.2.1`, from a dual-stack socket) is the
IPv4 address it maps.

What this module does not do: decide anything about links, or touch the database. Behind a
proxy every request comes from the proxy's address; this module does not read forwarding
headers (the service does not trust them).
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import RateLimited

__all__ = ["TokenBuckets", "source_key"]


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


@dataclass
class _Bucket:
    tokens: float
    at_ms: int


class TokenBuckets:
    def __init__(
        self, *, per_min: int, burst: int, clock: Callable[[], int], max_keys: int = 100_000
    ) -> None:
        self.per_ms = per_min / 60_000
        self.burst = float(burst)
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: OrderedDict[str | bytes, _Bucket] = OrderedDict()

    def take(self, key: str | bytes, what: str) -> None:
        """Take one token for `key`, or raise RateLimited saying when to retry."""
        bucket = self._refilled(key)
        if bucket.tokens < 1:
            raise self._limited(bucket, what)
        bucket.tokens -= 1

    def check(self, key: str | bytes, what: str) -> None:
        """Raise RateLimited if `key` has no token left; take none either way."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return  # a new bucket is full: no need to make one to know it
        bucket = self._refilled(key)
        if bucket.tokens < 1:
            raise self._limited(bucket, what)

    def spend(self, key: str | bytes) -> None:
        """Take one token for `key` if it has one; never raise (the request is already refused)."""
        bucket = self._refilled(key)
        bucket.tokens = max(0.0, bucket.tokens - 1)

    def _refilled(self, key: str | bytes) -> _Bucket:
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            self._make_room()
            bucket = self._buckets[key] = _Bucket(self.burst, now)
        else:
            self._buckets.move_to_end(key)
            bucket.tokens = min(self.burst, bucket.tokens + max(0, now - bucket.at_ms) * self.per_ms)
            bucket.at_ms = now
        return bucket

    def _limited(self, bucket: _Bucket, what: str) -> RateLimited:
        retry_s = max(1, int((1 - bucket.tokens) / self.per_ms / 1000) + 1)
        return RateLimited(f"too many requests {what}; retry in {retry_s} s", retry_after_s=retry_s)

    def _make_room(self) -> None:
        if len(self._buckets) < self._max_keys:
            return
        now = self._clock()
        full = [
            k
            for k, b in self._buckets.items()
            if b.tokens + max(0, now - b.at_ms) * self.per_ms >= self.burst
        ]
        for k in full:
            del self._buckets[k]
        while len(self._buckets) >= self._max_keys:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)
