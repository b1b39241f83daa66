"""Flood control: a token bucket per router for hellos, ahead of the decider.

A router that says hello far more often than the protocol asks (once per
connection, resent after 10 s at the soonest) must not hold up the
others: every hello that reaches the decider costs a durable write and a
reply. Over its budget, a hello is answered ``rate_limited`` at most once
per refill interval and otherwise dropped, before it is queued, so a
flooding router costs a JSON parse, not a decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

MAX_TRACKED = 100_000
"""Forget every bucket past this many routers; a full bucket is the default."""


class Verdict(Enum):
    PASS = "pass"
    TELL = "tell"
    """Over budget: answer ``rate_limited`` once."""
    DROP = "drop"
    """Over budget and already told: no reply."""


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float
    told: bool = False


class HelloLimiter:
    """``burst`` hellos at once, then ``rate`` a second, per router."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: dict[tuple[str, str], _Bucket] = {}

    def take(self, key: tuple[str, str], now: float) -> Verdict:
        """Spend one token of ``key``'s bucket at monotonic time ``now``."""
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_TRACKED:
                self._buckets.clear()
            bucket = self._buckets[key] = _Bucket(float(self.burst), now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) * self.rate)
        bucket.at = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            bucket.told = False
            return Verdict.PASS
        if bucket.told:
            return Verdict.DROP
        bucket.told = True
        return Verdict.TELL
