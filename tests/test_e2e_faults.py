"""Crashes and restarts, through a real Mosquitto and a real gateway process."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from gateway import protocol
from gateway.protocol import Decision
from tests.conftest import (
    GatewayProcess,
    PresenceWatch,
    StatusWatch,
    mqtt_client,
    sim_router,
    started_gateway,
    wait_gateway_online,
)
from tests.seeding import seed_tenant
from tools.broker import Broker
from tools.router import Heard, SimRouter

pytestmark = pytest.mark.broker


def line_of(database: Path, tenant: str) -> list[tuple[str, int]]:
    """``(router, seated)`` of every router in line, in arrival order."""
    with sqlite3.connect(database) as db:
        rows = db.execute(
            "SELECT router, seated FROM routers"
            " WHERE tenant = ? AND arrival IS NOT NULL ORDER BY arrival",
            (tenant,),
        )
        return [(r[0], r[1]) for r in rows]


def assert_prefix(line: list[tuple[str, int]], seats: int) -> None:
    """The seated routers are exactly the first ``seats`` arrivals."""
    seated = min(seats, len(line))
    assert [s for _, s in line] == [1] * seated + [0] * (len(line) - seated)


class Tally:
    """A fleet's latest decision per router, awaitable by count."""

    def __init__(self) -> None:
        self.latest: dict[str, Decision] = {}
        self.heard = 0
        self._changed = asyncio.Event()

    def __call__(self, heard: Heard) -> None:
        self.latest[heard.decision.router] = heard.decision
        self.heard += 1
        self._changed.set()

    async def until(self, check: Callable[[Tally], bool], timeout: float = 30) -> None:
        async with asyncio.timeout(timeout):
            while not check(self):
                self._changed.clear()
                await self._changed.wait()


async def connect_all(
    broker: Broker, tenant: str, count: int, tally: Tally
) -> list[SimRouter]:
    routers = [
        sim_router(broker, tenant, f"R{i:03d}", on_heard=tally) for i in range(count)
    ]
    await asyncio.gather(*(r.connect() for r in routers))
    return routers


async def paced_hellos(routers: list[SimRouter], every: float) -> None:
    """Hellos one by one, ``every`` seconds apart, as a fleet coming online.

    The sleep paces a sender (so that a fault lands mid-stream); it waits
    for nothing.
    """
    for router in routers:
        router.hello()
        await asyncio.sleep(every)


async def test_gateway_killed_mid_fleet_keeps_seats_and_answers_every_hello(
    broker: Broker, tmp_path: Path
) -> None:
    """SIGKILL while a fleet says hello; after a restart every hello is answered."""
    database, gateway = await started_gateway(broker, tmp_path, "T", basic1=20)
    tally = Tally()
    routers = await connect_all(broker, "T", 120, tally)
    sender = asyncio.create_task(paced_hellos(routers, 0.005))
    await tally.until(lambda t: t.heard >= 30)
    async with StatusWatch(broker) as status:
        gateway.kill()
        offline = await status.next()
    assert offline.state == "offline"
    answered_before = len(tally.latest)
    await gateway.start()
    await sender
    await tally.until(lambda t: len(t.latest) == 120)
    latest = tally.latest

    line = line_of(database, "T")
    assert len(line) == len({name for name, _ in line}) == 120
    assert_prefix(line, 20)
    seated = {name for name, s in line if s}
    assert {n for n, d in latest.items() if d.decision == "accept"} == seated
    assert answered_before < 120, "the kill came too late to test anything"
    for router in routers:
        await router.disconnect()
    gateway.stop()


async def test_broker_restart_keeps_every_router_in_its_place(
    broker: Broker, tmp_path: Path
) -> None:
    """Routers reconnect after a broker restart and keep seats and places."""
    database, gateway = await started_gateway(
        broker, tmp_path, options={"grace-seconds": 30}
    )
    routers = [sim_router(broker, "T8", f"R{i:02d}") for i in range(1, 11)]
    before = {}
    for router in routers:
        await router.connect()
        before[router.router], _ = await router.ask()
    line_before = line_of(database, "T8")

    broker.restart()
    for router in routers:
        router.new_session()
        await router.connect()
    after = {}
    for router in routers:
        after[router.router], _ = await router.ask(20)

    assert {n: (d.decision, d.position) for n, d in after.items()} == {
        n: (d.decision, d.position) for n, d in before.items()
    }
    assert line_of(database, "T8") == line_before
    async with PresenceWatch(broker, "T8") as watch:
        await watch.until(lambda w: len(w.latest()) == 10)
        states = {n: p.state for n, p in watch.latest().items()}
    assert states == {
        f"R{i:02d}": "online" if i <= 8 else "waiting" for i in range(1, 11)
    }
    for router in routers:
        await router.disconnect()
    gateway.stop()


async def test_burst_of_hellos_right_after_broker_restart_is_decided_in_order(
    broker: Broker, tmp_path: Path
) -> None:
    """Three hundred routers say hello the moment the broker is back."""
    database, gateway = await started_gateway(broker, tmp_path, "T", basic25=4)
    broker.restart()
    tally = Tally()
    routers = await connect_all(broker, "T", 300, tally)
    for router in routers:
        router.hello()
    await tally.until(lambda t: len(t.latest) == 300)
    latest = tally.latest
    line = line_of(database, "T")
    assert len(line) == 300
    assert_prefix(line, 100)
    accepted = {n for n, d in latest.items() if d.decision == "accept"}
    assert accepted == {name for name, seated in line if seated}
    positions = sorted(
        d.position or 0 for d in latest.values() if d.decision == "reject"
    )
    assert positions == list(range(1, 201))
    for router in routers:
        await router.disconnect()
    gateway.stop()


async def test_sigterm_finishes_in_flight_hellos_and_exits_cleanly(
    broker: Broker, tmp_path: Path
) -> None:
    """SIGTERM during a burst: answered hellos are durable, the rest wait."""
    database, gateway = await started_gateway(broker, tmp_path, "T", basic1=30)
    tally = Tally()
    routers = await connect_all(broker, "T", 100, tally)
    sender = asyncio.create_task(paced_hellos(routers, 0.005))
    await tally.until(lambda t: t.heard >= 20)
    assert gateway.stop() == 0
    with sqlite3.connect(database) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    answered_before = len(tally.latest)
    await gateway.start()
    await sender
    await tally.until(lambda t: len(t.latest) == 100)
    latest = tally.latest
    assert answered_before < 100, "the stop came too late to test anything"
    line = line_of(database, "T")
    assert len(line) == 100
    assert_prefix(line, 30)
    assert {n for n, d in latest.items() if d.decision == "accept"} == {
        n for n, s in line if s
    }
    for router in routers:
        await router.disconnect()
    gateway.stop()


async def test_sigterm_ends_the_gateway_even_when_the_broker_is_gone(
    broker: Broker, tmp_path: Path
) -> None:
    """Decisions are durable already; what cannot be published is redelivered."""
    _, gateway = await started_gateway(broker, tmp_path, "T", basic1=2)
    broker.stop()
    assert gateway.stop(timeout=20) == 0


async def test_sigterm_ends_a_gateway_that_never_reached_its_broker(
    tmp_path: Path,
) -> None:
    database = tmp_path / "irm.db"
    await seed_tenant(database, "T", basic1=2)
    nowhere = Broker(tmp_path / "never-started")
    gateway = GatewayProcess(nowhere, database, tmp_path / "gw.log")
    gateway.spawn()
    async with asyncio.timeout(20):
        while "broker unreachable" not in gateway.log.read_text():  # noqa: ASYNC110 - a child's log has nothing to await
            await asyncio.sleep(0.05)
    assert gateway.stop(timeout=20) == 0


class HelloWatch:
    """A tenant's hellos as the broker passes them on, seen by the operator's
    account: proof that hellos reached the broker before the gateway is back."""

    def __init__(self, broker: Broker, tenant: str) -> None:
        self.broker = broker
        self.tenant = tenant
        self.count = 0
        self._changed = asyncio.Event()
        self._subscribed = asyncio.Event()
        self._client: Any = None

    def _on_message(self, client: object, topic: str, payload: bytes, *r: Any) -> int:
        self.count += 1
        self._changed.set()
        return 0

    async def __aenter__(self) -> HelloWatch:
        self._client = await mqtt_client(self.broker)
        self._client.on_message = self._on_message
        self._client.on_subscribe = lambda *_: self._subscribed.set()
        self._client.subscribe(f"{protocol.PREFIX}/{self.tenant}/+/hello", qos=1)
        await asyncio.wait_for(self._subscribed.wait(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.disconnect()

    async def until(self, count: int, timeout: float = 10) -> None:
        async with asyncio.timeout(timeout):
            while self.count < count:
                self._changed.clear()
                await self._changed.wait()


async def provisioned(
    broker: Broker, tenant: str, prefix: str, count: int, tally: Tally
) -> list[SimRouter]:
    """New routers' accounts, known to the broker by a reload, as
    ``irm-tool accounts add`` makes them; then the routers connect."""
    names = [f"{prefix}{i:02d}" for i in range(count)]
    broker.provision(tenant, names)
    routers = [sim_router(broker, tenant, name, on_heard=tally) for name in names]
    await asyncio.gather(*(r.connect() for r in routers))
    return routers


def session_present(gateway: GatewayProcess) -> list[bool]:
    """``session_present`` of each of the gateway's connections, in order."""
    return [
        e["session_present"]
        for e in gateway.log_lines()
        if e.get("event") == "broker connected"
    ]


async def test_accounts_added_after_a_broker_restart_lose_no_hello(
    broker: Broker, tmp_path: Path
) -> None:
    """Reloads after a broker restart, with the gateway connected and then
    stopped: every hello is answered, those queued while it was down too."""
    database, gateway = await started_gateway(broker, tmp_path, "T", basic1=15)
    restarted = datetime.now(UTC)
    broker.restart()
    await wait_gateway_online(broker, restarted, 20, gateway)
    tally = Tally()

    online = await provisioned(broker, "T", "A", 10, tally)
    for router in online:
        router.hello()
    await tally.until(lambda t: len(t.latest) == 10)
    assert gateway.stop() == 0
    away = await provisioned(broker, "T", "B", 10, tally)
    async with HelloWatch(broker, "T") as hellos:
        for router in away:
            router.hello()
        await hellos.until(10)
    answered_while_away = len(tally.latest)
    await gateway.start()
    await tally.until(lambda t: len(t.latest) == 20)

    line = line_of(database, "T")
    assert answered_while_away == 10
    assert {name for name, _ in line[:10]} == {r.router for r in online}
    assert {name for name, _ in line[10:]} == {r.router for r in away}
    assert_prefix(line, 15)
    accepted = {n for n, d in tally.latest.items() if d.decision == "accept"}
    assert accepted == {name for name, seated in line if seated}
    assert session_present(gateway)[-2:] == [True, True]
    for router in online + away:
        await router.disconnect()
    gateway.stop()


async def test_a_gateway_whose_store_fails_says_offline_as_it_leaves(
    broker: Broker, tmp_path: Path
) -> None:
    """Another writer holds the database past the gateway's lock timeout: the
    gateway cannot store a decision, leaves, and says so in its retained
    status (its clean disconnect fires no last will); the hello is not
    acknowledged, so it waits in the broker for the next gateway."""
    database, gateway = await started_gateway(broker, tmp_path, "T", basic1=2)
    router = sim_router(broker, "T", "R01")
    await router.connect()
    blocker = sqlite3.connect(database, isolation_level=None)
    try:
        blocker.execute("BEGIN EXCLUSIVE")
        async with StatusWatch(broker) as status:
            ref = router.hello()
            left = await status.next(timeout=30)
        assert left.state == "offline"
        assert gateway.process is not None
        assert await asyncio.to_thread(gateway.process.wait, 30) != 0
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    await gateway.start()
    decision = await router.next_decision(timeout=20)
    assert (decision.ref, decision.decision, decision.reason) == (
        ref, "accept", "licensed",
    )  # fmt: skip
    await router.disconnect()
    gateway.stop()
