"""Presence under churn and faults, through a real Mosquitto (cases F01-F05).

Tenant T8 has 8 valid Cloud Basic 1 licenses; routers are R01 to R10.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from tests.conftest import PresenceWatch, TopicWatch, sim_router, started_gateway
from tools.broker import Broker
from tools.router import SimRouter

pytestmark = pytest.mark.broker

NAMES = [f"R{i:02d}" for i in range(1, 11)]
GRACE = {"grace-seconds": 1}


async def stays_online(watch: PresenceWatch, router: SimRouter, name: str) -> None:
    """Presence never said offline, and does not for twice the will's grace."""
    router.heartbeat()
    with pytest.raises(TimeoutError):
        await watch.until(lambda w: w.of(name)[-1].state != "online", timeout=2.5)
    assert [p.state for p in watch.of(name)] == ["online"] * len(watch.of(name))


def rows(database: Path) -> dict[str, tuple[int | None, int, int]]:
    """router -> (arrival, seated, epoch) as stored."""
    with sqlite3.connect(database) as db:
        found = db.execute("SELECT router, arrival, seated, epoch FROM routers")
        return {r[0]: (r[1], r[2], r[3]) for r in found}


async def seated_fleet(broker: Broker, names: list[str]) -> dict[str, SimRouter]:
    """Connect ``names`` one after another; each has its first answer."""
    routers = {}
    for name in names:
        router = sim_router(broker, "T8", name)
        await router.connect()
        await router.ask()
        routers[name] = router
    return routers


async def close_all(routers: dict[str, SimRouter]) -> None:
    for router in routers.values():
        await router.disconnect()


async def test_silent_router_loses_its_seat_when_its_lease_runs_out(
    broker: Broker, tmp_path: Path
) -> None:
    """F01: a clean disconnect sends no will; the lease frees the seat."""
    database, gateway = await started_gateway(
        broker, tmp_path, options={"lease-seconds": 3}
    )
    async with PresenceWatch(broker, "T8") as watch:
        routers = await seated_fleet(broker, NAMES[:9])
        await routers.pop("R01").disconnect()
        r09 = routers["R09"]
        async with asyncio.timeout(15):
            while True:
                for router in routers.values():
                    router.heartbeat()
                try:
                    decision = await r09.next_decision(0.5)
                except TimeoutError:
                    continue
                break
        assert (decision.decision, decision.cause) == ("accept", "seat_freed")
        await watch.until(lambda w: w.latest()["R01"].state == "offline")
        assert watch.latest()["R01"].reason == "lease"
        assert rows(database)["R01"][0] is None
        await close_all(routers)
    gateway.stop()


async def test_reconnect_keeps_seat_when_old_will_arrives_before_new_hello(
    broker: Broker, tmp_path: Path
) -> None:
    """F02: the will of the dropped link comes first; seat and place are kept."""
    database, gateway = await started_gateway(broker, tmp_path, options=GRACE)
    async with PresenceWatch(broker, "T8") as watch:
        routers = await seated_fleet(broker, NAMES)
        before = rows(database)["R03"]
        r03 = routers["R03"]
        async with TopicWatch(broker, "irm/v1/T8/R03/goodbye") as wills:
            await r03.drop()
            will = await wills.next()
        assert will.will
        assert will.session == r03.session
        r03.new_session()
        await r03.connect()
        decision, _ = await r03.ask()
        assert (decision.decision, decision.epoch) == ("accept", before[2] + 1)
        after = rows(database)["R03"]
        assert (after[0], after[1]) == (before[0], 1)
        await stays_online(watch, r03, "R03")
        await close_all(routers)
    gateway.stop()


async def test_takeover_with_same_client_id_keeps_one_seat_and_never_flips_offline(
    broker: Broker, tmp_path: Path
) -> None:
    """F02 and F03: a second connection with R03's client id takes over.

    The broker then publishes the first connection's will, after or around
    the new session's hello; done three times in a row it is the takeover
    loop of two devices sharing one id, which the gateway reports.
    """
    database, gateway = await started_gateway(broker, tmp_path, options=GRACE)
    async with PresenceWatch(broker, "T8") as watch:
        routers = await seated_fleet(broker, NAMES)
        arrival = rows(database)["R03"][0]
        twins = []
        for _ in range(3):
            twin = sim_router(broker, "T8", "R03")
            await twin.connect()
            decision, _ = await twin.ask()
            assert decision.decision == "accept"
            twins.append(twin)
        stored = rows(database)
        assert stored["R03"][0] == arrival
        assert sum(seated for _, seated, _ in stored.values()) == 8
        epoch = stored["R03"][2]
        await watch.until(lambda w: w.of("R03")[-1].epoch == epoch)
        await stays_online(watch, twins[-1], "R03")
        for twin in twins:
            await twin.disconnect()
        await close_all(routers)
    gateway.stop()
    duplicates = [
        line for line in gateway.log_lines() if line.get("kind") == "duplicate_client"
    ]
    assert duplicates
    assert duplicates[0]["router"] == "R03"


async def test_hellos_sent_while_gateway_is_down_are_answered_in_order(
    broker: Broker, tmp_path: Path
) -> None:
    """F04: R09 and R10 say hello while the gateway is stopped."""
    database, gateway = await started_gateway(broker, tmp_path)
    routers = await seated_fleet(broker, NAMES[:8])
    assert gateway.stop() == 0
    late = {}
    for name in ("R09", "R10"):
        router = sim_router(broker, "T8", name)
        await router.connect()
        router.hello()
        late[name] = router
    await gateway.start()
    r09 = await late["R09"].next_decision(15)
    r10 = await late["R10"].next_decision(15)
    assert (r09.decision, r09.position) == ("reject", 1)
    assert (r10.decision, r10.position) == ("reject", 2)
    stored = rows(database)
    assert stored["R09"][0] < stored["R10"][0]
    await close_all(routers | late)
    gateway.stop()


async def test_duplicate_and_redelivered_hellos_get_one_seat_and_the_same_answer(
    broker: Broker, tmp_path: Path
) -> None:
    """F05: R05 says hello twice on purpose, and one hello arrives twice."""
    database, gateway = await started_gateway(broker, tmp_path)
    routers = await seated_fleet(broker, NAMES[:4])
    r05 = sim_router(broker, "T8", "R05")
    await r05.connect()
    first, _ = await r05.ask()
    second, _ = await r05.ask()
    ref = r05.hello("same-ref")
    r05.hello(ref)  # the same packet again, as a QoS 1 retransmission would be
    third = await r05.next_decision()
    fourth = await r05.next_decision()
    answers = {
        (d.decision, d.reason, d.epoch, d.position)
        for d in (first, second, third, fourth)
    }
    assert answers == {("accept", "licensed", 1, None)}
    stored = rows(database)
    assert sum(seated for _, seated, _ in stored.values()) == 5
    assert stored["R05"][2] == 1
    await close_all(routers)
    await r05.disconnect()
    gateway.stop()


async def test_mqtt311_router_is_answered_on_its_fixed_reply_topic_with_its_ref(
    broker: Broker, tmp_path: Path
) -> None:
    """No Response Topic or Correlation Data in 3.1.1: the ``ref`` matches."""
    _, gateway = await started_gateway(broker, tmp_path)
    old = sim_router(broker, "T8", "R01", mqtt5=False)
    await old.connect()
    decision, _ = await old.ask()
    assert (decision.decision, decision.reason) == ("accept", "licensed")
    assert decision.ref is not None
    await old.disconnect()
    gateway.stop()
