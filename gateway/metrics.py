"""What the gateway counts for Prometheus, and its capacity alarms.

Two kinds of figures. Those that change per message (messages received,
decisions, their latency, store writes) are counted as they happen, each
with one call from gateway/service.py. Those that describe state (seats
per tenant, the line, the broker connection, bad input so far) are read
from the gateway's own state when Prometheus scrapes, by
:class:`_LiveCollector`, so the hot path pays nothing for them.

The scrape runs on the gateway's event loop (gateway/web.py), so the
collector reads the state between two steps of the decider, never in
the middle of one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from gateway.service import Gateway

log = structlog.get_logger("gateway.metrics")

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
"""Seconds; the design's budget is a p99 under 50 ms, so most buckets are below."""

ALARM_EVERY = 1.0
"""Seconds between two checks of every tenant's capacity alarm."""


@dataclass(slots=True)
class Hysteresis:
    """An alarm raised at ``on`` percent and cleared only below ``off``.

    With ``off`` under ``on``, a value hovering around one threshold does not
    make the alarm flap.
    """

    on: float
    off: float
    raised: bool = False

    def update(self, percent: float) -> bool | None:
        """True when this value raises the alarm, False when it clears it."""
        if not self.raised and percent >= self.on:
            self.raised = True
            return True
        if self.raised and percent < self.off:
            self.raised = False
            return False
        return None


def used_percent(seated: int, in_line: int, capacity: int) -> float:
    """Seats used as a share of capacity; a line with no seats at all is full."""
    if capacity:
        return 100.0 * seated / capacity
    return 100.0 if in_line else 0.0


class Metrics:
    """The gateway's metrics, in a registry of its own (one per gateway)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.registry = CollectorRegistry()
        self.alarms: dict[str, Hysteresis] = {}
        self._received = Counter(
            "irm_messages_received", "Messages received from routers, by kind.",
            ["kind"], registry=self.registry,
        )  # fmt: skip
        self._decisions = Counter(
            "irm_decisions", "Answers sent to routers, by decision, reason and "
            "cause (hello, or a seat change the router did not ask for).",
            ["decision", "reason", "cause"], registry=self.registry,
        )  # fmt: skip
        self._latency = Histogram(
            "irm_decision_latency_seconds",
            "From a hello's receipt to its decision (before the durable write).",
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self._store = Histogram(
            "irm_store_write_seconds", "One batch of decisions written durably.",
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.registry.register(_LiveCollector(self))
        # Looking a labelled child up takes a lock; these run per message.
        self._by_kind: dict[str, Counter] = {}
        self._by_answer: dict[tuple[str, str, str], Counter] = {}

    def received(self, kind: str) -> None:
        child = self._by_kind.get(kind)
        if child is None:
            child = self._by_kind[kind] = self._received.labels(kind)
        child.inc()

    def decided(
        self, decision: str, reason: str, cause: str, latency: float | None = None
    ) -> None:
        key = (decision, reason, cause)
        child = self._by_answer.get(key)
        if child is None:
            child = self._by_answer[key] = self._decisions.labels(*key)
        child.inc()
        if latency is not None:
            self._latency.observe(latency)

    def stored(self, seconds: float) -> None:
        self._store.observe(seconds)

    def check_alarms(self) -> None:
        """Raise or clear each tenant's capacity alarm; log each change."""
        settings = self.gateway.settings
        for tenant, line in list(self.gateway.admission.lines.items()):
            alarm = self.alarms.get(tenant)
            if alarm is None:
                alarm = self.alarms[tenant] = Hysteresis(
                    settings.alarm_on_percent, settings.alarm_off_percent
                )
            seats, seated = line.capacity.seats, line.seated
            changed = alarm.update(used_percent(seated, len(line), seats))
            fields = {"tenant": tenant, "seats_used": seated, "capacity": seats}
            if changed:
                log.warning(
                    "capacity alarm raised", **fields, waiting=len(line) - seated
                )
            elif changed is False:
                log.info("capacity alarm cleared", **fields)


@contextlib.asynccontextmanager
async def alarms_checked(metrics: Metrics) -> AsyncIterator[None]:
    """Check the capacity alarms every second while the block runs.

    Not before the gateway is ready: while it loads, a tenant's capacity is
    known before its routers are back in line, which would read as a drop.
    """

    async def check() -> None:
        while True:
            if metrics.gateway.ready.is_set():
                metrics.check_alarms()
            await asyncio.sleep(ALARM_EVERY)

    task = asyncio.create_task(check(), name="capacity-alarms")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class _LiveCollector(Collector):
    """Figures read from the gateway's state at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        gateway = self.metrics.gateway
        yield from self._tenants(gateway)
        yield GaugeMetricFamily(
            "irm_broker_connected", "1 while connected to the broker.",
            value=int(gateway.broker_connected),
        )  # fmt: skip
        yield CounterMetricFamily(
            "irm_broker_reconnects", "Connections to the broker after the first.",
            value=max(0, gateway.broker_connects - 1),
        )  # fmt: skip
        bad = CounterMetricFamily(
            "irm_bad_input", "Bad input received, by kind.", labels=["kind"]
        )
        for kind, count in sorted(gateway.bad_input.items()):
            bad.add_metric([kind], count)
        yield bad

    def _tenants(self, gateway: Gateway) -> Iterator[Metric]:
        families = {
            name: GaugeMetricFamily(f"irm_tenant_{name}", text, labels=["tenant"])
            for name, text in (
                ("capacity", "Seats the tenant's valid licenses give now."),
                ("seats_used", "Routers holding a seat."),
                ("waiting", "Routers connected and waiting in line for a seat."),
                ("capacity_alarm", "1 while the capacity alarm is raised."),
            )
        }
        alarms = self.metrics.alarms
        for tenant, line in sorted(gateway.admission.lines.items()):
            alarm = alarms.get(tenant)
            families["capacity"].add_metric([tenant], line.capacity.seats)
            families["seats_used"].add_metric([tenant], line.seated)
            families["waiting"].add_metric([tenant], len(line) - line.seated)
            raised = int(alarm is not None and alarm.raised)
            families["capacity_alarm"].add_metric([tenant], raised)
        yield from families.values()
