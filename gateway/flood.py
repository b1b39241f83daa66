"""Flood control: a token bucket per router and kind, ahead of the decider.

A router that says hello far more often than the protocol asks (once per
connection, resent after 10 s at the soonest) must not hold up the
others: every hello that reaches the decider costs a durable write and a
reply. Heartbeats and goodbyes are cheaper, but a stale heartbeat is
answered too, so a flood of them costs as much and fills the router's own
reply queue in the broker. Each kind of message has a bucket of its own
per router, so a router's heartbeats never spend its hellos. Over its
budget, a hello is answered ``rate_limited`` at most once per refill
interval and otherwise dropped, before it is queued; a heartbeat or
goodbye is dropped. A flooding router costs a topic split, not a decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

MAX_TRACKED = 100_000
"""Forget every bucket past this many routers; a full bucket is the default."""


class Verdict(Enum):
    PASS = "pass"
    TELL = "tell"
    """Over budget: answer ``rate_limited`` once (hellos)."""
    DROP = "drop"
    """Over budget and already told: no reply."""


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float
    told: bool = False


class Limiter:
    """``burst`` messages at once, then ``rate`` a second, per key."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: dict[tuple[str, ...], _Bucket] = {}

    def take(self, key: tuple[str, ...], now: float) -> Verdict:
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
