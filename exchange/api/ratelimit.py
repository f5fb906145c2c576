"""Token buckets for link redemption: one per client IP, one per link, in memory per replica.

A bucket holds up to `burst` tokens and refills at `per_min` tokens a minute; each request
takes one. The limits are settings (`redeem_ip_*`, `redeem_link_*`). With N replicas behind a
balancer a client gets up to N times the rate: the point is to make guessing tokens (256 bits)
and hammering one link expensive, not to meter exactly. The table of buckets is bounded: when
full, the buckets that have refilled completely (indistinguishable from new ones) are dropped,
and if none has, the oldest are.

What this module does not do: decide anything about links, or touch the database.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import InputError

__all__ = ["RateLimited", "TokenBuckets"]


class RateLimited(InputError):
    status = 429
    code = "rate-limited"
    title = "Too many requests"


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
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            self._make_room()
            bucket = self._buckets[key] = _Bucket(self.burst, now)
        else:
            self._buckets.move_to_end(key)
            bucket.tokens = min(self.burst, bucket.tokens + max(0, now - bucket.at_ms) * self.per_ms)
            bucket.at_ms = now
        if bucket.tokens < 1:
            retry_s = max(1, int((1 - bucket.tokens) / self.per_ms / 1000) + 1)
            raise RateLimited(f"too many requests {what}; retry in {retry_s} s", retry_after_s=retry_s)
        bucket.tokens -= 1

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
