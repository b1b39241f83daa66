"""The load generator's modes against a real gateway and Mosquitto.

``irm-tool fleet --mode ...`` and the benchmarks run these; here each mode
is run small, with one tenant of 8 seats, and what it reports is checked
against what the gateway must have answered.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import started_gateway
from tools.broker import Broker
from tools.load import LoadSpec, Summary, run_load

pytestmark = pytest.mark.broker


def spec_for(broker: Broker, routers: int, **options: Any) -> LoadSpec:
    """A fleet of ``routers`` of tenant T8, each with its broker account."""
    spec = LoadSpec("127.0.0.1", broker.router_port, ("T8",), routers)
    names = [router for _, router in spec.names()]
    made = broker.provision("T8", names)
    passwords = {f"T8/{router}": password for router, password in made.items()}
    return replace(spec, passwords=passwords, timeout=20.0, **options)


async def run(spec: LoadSpec) -> Summary:
    return await asyncio.to_thread(run_load, spec)


async def test_a_storm_decides_every_hello_again_with_the_same_routers_online(
    broker: Broker, tmp_path: Path
) -> None:
    _, gateway = await started_gateway(broker, tmp_path)
    summary = await run(spec_for(broker, 12, mode="storm", processes=2))
    assert summary.unanswered == []
    assert (summary.sent, summary.answered) == (24, 24)
    assert summary.storm_same_online is True
    assert summary.storm_seconds is not None
    assert sum(summary.online.values()) == 8
    assert summary.decisions == {
        "accept:licensed": 16,
        "reject:capacity_exceeded": 8,
    }
    gateway.stop()


async def test_a_closed_loop_gets_an_answer_to_every_hello_it_sends(
    broker: Broker, tmp_path: Path
) -> None:
    _, gateway = await started_gateway(broker, tmp_path)
    summary = await run(spec_for(broker, 6, mode="closed", duration=1.0))
    assert summary.unanswered == []
    assert summary.sent == summary.answered > 6
    assert sum(summary.online.values()) == 6
    assert len(summary.latencies) == summary.answered
    gateway.stop()


async def test_an_offered_rate_with_churn_keeps_the_seats_within_capacity(
    broker: Broker, tmp_path: Path
) -> None:
    _, gateway = await started_gateway(broker, tmp_path)
    spec = spec_for(broker, 10, mode="rate", rate=40.0, duration=3.0, churn=0.3)
    summary = await run(spec)
    assert summary.unanswered == []
    assert summary.answered == summary.sent > 10
    # A router that left is offline; a seat it freed may be handed on just
    # after the run ends, so at most the capacity is seen online.
    assert 0 < sum(summary.online.values()) <= 8
    assert set(summary.decisions) <= {"accept:licensed", "reject:capacity_exceeded"}
    gateway.stop()


async def test_a_closed_loop_with_churn_goes_on_for_every_router(
    broker: Broker, tmp_path: Path
) -> None:
    """Routers that leave and come back keep saying hello in the loop; none
    is counted unanswered for having left."""
    _, gateway = await started_gateway(broker, tmp_path)
    spec = spec_for(broker, 6, mode="closed", duration=3.5, churn=0.5)
    summary = await run(spec)
    assert summary.unanswered == []
    assert summary.sent == summary.answered > 6 * 3
    assert 0 < sum(summary.online.values()) <= 8
    gateway.stop()
