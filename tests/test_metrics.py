"""Capacity alarms and the figures read from the gateway's state at scrape time."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import cast

import pytest
from prometheus_client import generate_latest
from structlog.testing import capture_logs

from gateway.config import Settings
from gateway.metrics import Hysteresis, used_percent
from gateway.service import Gateway
from policy.licenses import Capacity, Tier
from policy.store import Store

NOW = datetime(2026, 12, 3, 16, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("percents", "changes"),
    [
        ([80, 89.9, 90], [None, None, True]),
        ([95, 87, 85, 84.9], [True, None, None, False]),
        ([90, 84, 89, 90], [True, False, None, True]),
        ([100, 100, 100], [True, None, None]),
    ],
)
def test_an_alarm_is_raised_at_on_and_cleared_only_below_off(
    percents: list[float], changes: list[bool | None]
) -> None:
    alarm = Hysteresis(on=90, off=85)

    assert [alarm.update(p) for p in percents] == changes


def test_a_tenant_with_no_seats_is_full_only_when_someone_waits() -> None:
    assert used_percent(0, 0, 0) == 0.0
    assert used_percent(0, 3, 0) == 100.0
    assert used_percent(9, 12, 10) == 90.0


def gateway_with(seats: int, routers: int) -> Gateway:
    """A gateway (no store, no broker) whose tenant acme has these routers."""
    gateway = Gateway(Settings(), cast(Store, None), clock=lambda: NOW)
    gateway.admission.load_tenant("acme", [], {}, NOW)
    gateway.admission.lines["acme"].resize(Capacity(seats, Tier.FULL))
    for i in range(routers):
        gateway.admission.hello("acme", f"R{i:02d}", "s1", NOW)
    return gateway


def test_the_alarm_logs_a_warning_when_raised_and_info_when_cleared() -> None:
    gateway = gateway_with(seats=20, routers=18)
    line = gateway.admission.lines["acme"]

    with capture_logs() as events:
        gateway.metrics.check_alarms()  # 90 %: raised
        gateway.metrics.check_alarms()
        line.resize(Capacity(21, Tier.FULL))  # 85.7 %: still raised
        gateway.metrics.check_alarms()
        line.resize(Capacity(22, Tier.FULL))  # 81.8 %: cleared
        gateway.metrics.check_alarms()

    assert [(e["event"], e["log_level"], e["capacity"]) for e in events] == [
        ("capacity alarm raised", "warning", 20),
        ("capacity alarm cleared", "info", 22),
    ]
    assert events[0]["seats_used"] == 18


def test_a_scrape_reads_seats_line_and_alarm_per_tenant() -> None:
    gateway = gateway_with(seats=2, routers=3)
    gateway.metrics.check_alarms()

    page = generate_latest(gateway.metrics.registry).decode()

    assert 'irm_tenant_capacity{tenant="acme"} 2.0' in page
    assert 'irm_tenant_seats_used{tenant="acme"} 2.0' in page
    assert 'irm_tenant_waiting{tenant="acme"} 1.0' in page
    assert 'irm_tenant_capacity_alarm{tenant="acme"} 1.0' in page
    assert "irm_broker_connected 0.0" in page
