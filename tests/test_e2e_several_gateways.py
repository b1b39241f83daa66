"""Three gateways on one PostgreSQL and one Mosquitto, one of them killed.

The fleet is a few thousand routers, each its own MQTT connection, over
tenants with fewer seats than routers. Half of them say hello, the leading
gateway is killed with SIGKILL while those hellos are in flight, then the
other half say hello. Every hello must be answered, and PostgreSQL must
show first come, first served exactly: per tenant the seats are the
earliest arrivals, as many as the capacity, and each router has one place.
"""

from __future__ import annotations

import asyncio
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

from gateway import protocol
from gateway.__main__ import cli
from policy.timeutil import from_text, to_text
from tests.conftest import BIN, GatewayProcess, PresenceWatch, mqtt_client, sim_router
from tests.seeding import add_available, seed_tenant
from tools.broker import Broker
from tools.router import Heard, SimRouter

pytestmark = pytest.mark.broker

SEATS = {"TA": {"basic25": 12}, "TB": {"basic25": 4}, "TC": {"basic1": 40}}
CAPACITY = {"TA": 300, "TB": 100, "TC": 40}
ROUTERS_PER_TENANT = 700


class Fleet:
    """Routers of several tenants, and the last decision each one heard."""

    def __init__(self, broker: Broker, per_tenant: int) -> None:
        self.last: dict[tuple[str, str], protocol.Decision] = {}
        self.answered: set[tuple[str, str]] = set()
        self.changed = asyncio.Event()
        self.routers = [
            sim_router(broker, tenant, f"R{i:04d}", on_heard=self._heard)
            for tenant in CAPACITY
            for i in range(per_tenant)
        ]

    def _heard(self, heard: Heard) -> None:
        key = (heard.decision.tenant, heard.decision.router)
        self.last[key] = heard.decision
        if heard.decision.ref is not None:
            self.answered.add(key)
        self.changed.set()

    async def connect(self) -> None:
        for start in range(0, len(self.routers), 200):
            chunk = self.routers[start : start + 200]
            await asyncio.gather(*(r.connect(keepalive=120) for r in chunk))

    async def hello(self, routers: list[SimRouter]) -> None:
        for i, router in enumerate(routers):
            router.hello()
            if i % 100 == 99:
                await asyncio.sleep(0)  # let the connections write

    async def until_answered(self, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while len(self.answered) < len(self.routers):
                self.changed.clear()
                await self.changed.wait()

    async def close(self) -> None:
        await asyncio.gather(*(r.disconnect() for r in self.routers))


def _stored(url: str) -> dict[str, list[tuple[str, int, bool]]]:
    """Per tenant, the routers in line as (router, arrival, seated), in order."""
    with psycopg.connect(url) as db:
        rows = db.execute(
            "SELECT tenant, router, arrival, seated FROM routers"
            " WHERE arrival IS NOT NULL ORDER BY tenant, arrival"
        ).fetchall()
    lines: dict[str, list[tuple[str, int, bool]]] = {t: [] for t in CAPACITY}
    for tenant, router, arrival, seated in rows:
        lines[tenant].append((router, arrival, seated))
    return lines


def _joins(url: str) -> dict[tuple[str, str], int]:
    with psycopg.connect(url) as db:
        rows = db.execute(
            "SELECT tenant, subject_id, count(*) FROM audit"
            " WHERE subject = 'router' AND event = 'joined'"
            " GROUP BY tenant, subject_id"
        ).fetchall()
    return {(t, r): n for t, r, n in rows}


def _logged(gateways: list[GatewayProcess], event: str) -> list[GatewayProcess]:
    """The gateways whose log holds ``event``."""
    return [
        g for g in gateways if any(line.get("event") == event for line in g.log_lines())
    ]


def _leader(gateways: list[GatewayProcess]) -> GatewayProcess:
    leading = _logged(gateways, "leading the cluster")
    assert len(leading) == 1, "exactly one gateway leads"
    return leading[0]


async def _until_logged(
    gateways: list[GatewayProcess], event: str, timeout: float
) -> None:
    """Wait until one of ``gateways`` logs ``event`` (a file: nothing to await)."""
    async with asyncio.timeout(timeout):
        while not _logged(gateways, event):  # noqa: ASYNC110 - polls a log file
            await asyncio.sleep(0.1)


async def _cluster(
    broker: Broker, tmp_path: Path, url: str, count: int, **options: Any
) -> list[GatewayProcess]:
    gateways = []
    for n in range(1, count + 1):
        gateway = GatewayProcess(
            broker,
            tmp_path / "unused.db",
            tmp_path / f"gw{n}.log",
            store=url,
            **{"gateway-id": f"gw{n}"},
            **options,
        )
        await gateway.start()
        gateways.append(gateway)
    return gateways


async def test_three_gateways_one_killed_keep_first_come_first_served_exact(
    broker: Broker, tmp_path: Path, postgres_url: str
) -> None:
    for tenant, seats in SEATS.items():
        await seed_tenant(postgres_url, tenant, **seats)
    gateways = await _cluster(broker, tmp_path, postgres_url, 3)
    await _until_logged(gateways, "leading the cluster", 10)
    fleet = Fleet(broker, ROUTERS_PER_TENANT)
    await fleet.connect()
    watches = [PresenceWatch(broker, tenant) for tenant in CAPACITY]
    for watch in watches:
        await watch.__aenter__()
    try:
        half = len(fleet.routers) // 2
        await fleet.hello(fleet.routers[:half])
        leader = _leader(gateways)
        leader.kill()
        await fleet.hello(fleet.routers[half:])
        await fleet.until_answered(timeout=90)

        lines = _stored(postgres_url)
        for tenant, line in lines.items():
            assert len(line) == ROUTERS_PER_TENANT
            assert [seated for _, _, seated in line] == [
                i < CAPACITY[tenant] for i in range(len(line))
            ], f"{tenant}: the seats are the earliest arrivals, as many as fit"
            assert len({arrival for _, arrival, _ in line}) == len(line)
        assert set(_joins(postgres_url).values()) == {1}, "one place per router"

        for tenant, line in lines.items():
            for router, _, seated in line:
                decision = fleet.last[(tenant, router)]
                assert decision.decision == ("accept" if seated else "reject")

        def presence_current(watch: PresenceWatch) -> bool:
            latest = watch.latest()
            return all(
                router in latest
                and latest[router].state == ("online" if seated else "waiting")
                for router, _, seated in lines[watch.tenant]
            )

        for watch in watches:
            await watch.until(presence_current, timeout=30)
        survivors = [g for g in gateways if g is not leader]
        await _until_logged(survivors, "leading the cluster", 10)
        await _until_logged(survivors, "dead gateway's session ended", 20)

        def repaired(watch: PresenceWatch) -> bool:
            latest = watch.latest()
            return len(latest) == ROUTERS_PER_TENANT and all(
                p.reason == "repair" for p in latest.values()
            )

        # The new leader republishes every quiet tenant's presence from the
        # store, and it is what the store says.
        for watch in watches:
            await watch.until(repaired, timeout=20)
            assert presence_current(watch)
    finally:
        for watch in watches:
            await watch.__aexit__()
        await fleet.close()


async def test_a_new_leader_expires_a_silent_routers_lease_within_seconds(
    broker: Broker, tmp_path: Path, postgres_url: str
) -> None:
    await seed_tenant(postgres_url, "TA", basic1=1)
    gateways = await _cluster(broker, tmp_path, postgres_url, 2, **{"lease-seconds": 3})
    await _until_logged(gateways, "leading the cluster", 10)
    first = sim_router(broker, "TA", "R01")
    second = sim_router(broker, "TA", "R02")
    await first.connect(will=False)
    assert (await first.ask())[0].decision == "accept"
    await second.connect()
    assert (await second.ask())[0].decision == "reject"
    await first.disconnect()  # silent: no goodbye, no will

    _leader(gateways).kill()
    loop = asyncio.get_running_loop()
    started = loop.time()
    heartbeat = asyncio.create_task(_heartbeats(second))
    try:
        promoted = await second.next_decision(timeout=15)
    finally:
        heartbeat.cancel()
    assert promoted.decision == "accept"
    assert promoted.cause == "seat_freed"
    assert loop.time() - started < 10
    await second.disconnect()


async def _heartbeats(router: SimRouter) -> None:
    while True:
        router.heartbeat()
        await asyncio.sleep(1)


def test_the_gateway_refuses_a_store_that_is_not_a_postgresql_url(
    tmp_path: Path,
) -> None:
    result = CliRunner().invoke(cli, ["--store", "mysql://x/y"], env={})
    assert result.exit_code == 2
    assert "--store = mysql://x/y: must be a postgresql:// URL" in (result.output)


async def test_an_activation_by_the_tool_reaches_a_cluster_within_a_second(
    broker: Broker, tmp_path: Path, postgres_url: str
) -> None:
    await seed_tenant(postgres_url, "TA")
    await add_available(postgres_url, "TA", 1)
    gateways = await _cluster(broker, tmp_path, postgres_url, 2)
    await _until_logged(gateways, "leading the cluster", 10)
    router = sim_router(broker, "TA", "R01")
    await router.connect()
    first, _ = await router.ask()
    assert (first.decision, first.reason) == ("reject", "no_valid_license")

    await _tool(postgres_url, "activate", "--tenant", "TA", "--all-available")
    loop = asyncio.get_running_loop()
    started = loop.time()
    news = await router.next_decision(timeout=5)

    assert (news.decision, news.cause) == ("accept", "capacity")
    assert loop.time() - started < 2
    await router.disconnect()


def _rows(url: str, tenant: str) -> dict[str, tuple[int | None, bool, int]]:
    """``router -> (arrival, seated, epoch)`` as PostgreSQL has them."""
    with psycopg.connect(url) as db:
        rows = db.execute(
            "SELECT router, arrival, seated, epoch FROM routers WHERE tenant = %s",
            (tenant,),
        ).fetchall()
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


async def _seated(broker: Broker, names: list[str]) -> dict[str, SimRouter]:
    routers = {}
    for name in names:
        router = sim_router(broker, "T8", name)
        await router.connect()
        decision, _ = await router.ask()
        assert decision.decision == "accept"
        routers[name] = router
    return routers


async def test_ten_hellos_at_once_over_two_gateways_seat_exactly_the_first_eight(
    broker: Broker, tmp_path: Path, postgres_url: str
) -> None:
    """F06 across gateways: the two rejected are the last two PostgreSQL saw."""
    await seed_tenant(postgres_url, "T8", basic1=8)
    await _cluster(broker, tmp_path, postgres_url, 2)
    routers = [sim_router(broker, "T8", f"R{i:02d}") for i in range(1, 11)]
    await asyncio.gather(*(r.connect() for r in routers))
    for router in routers:
        router.hello()
    answers = [await r.next_decision(15) for r in routers]

    stored = _rows(postgres_url, "T8")
    order = sorted(stored, key=lambda r: stored[r][0] or 0)
    assert [stored[r][1] for r in order] == [True] * 8 + [False] * 2
    by_router = {a.router: a for a in answers}
    assert [by_router[r].decision for r in order] == ["accept"] * 8 + ["reject"] * 2
    assert [by_router[r].position for r in order[8:]] == [1, 2]
    await asyncio.gather(*(r.disconnect() for r in routers))


async def test_duplicate_hellos_over_two_gateways_get_one_seat_and_one_answer(
    broker: Broker, tmp_path: Path, postgres_url: str
) -> None:
    """F05: the same hello again and again, whichever gateway gets it."""
    await seed_tenant(postgres_url, "T8", basic1=8)
    await _cluster(broker, tmp_path, postgres_url, 2)
    r05 = sim_router(broker, "T8", "R05")
    await r05.connect()
    answers = [(await r05.ask())[0] for _ in range(4)]
    ref = r05.hello("same-ref")
    r05.hello(ref)
    answers += [await r05.next_decision(), await r05.next_decision()]

    assert {(a.decision, a.reason, a.epoch, a.position) for a in answers} == {
        ("accept", "licensed", 1, None)
    }
    assert _rows(postgres_url, "T8")["R05"] == (1, True, 1)
    await r05.disconnect()


async def test_a_reconnect_whose_old_will_comes_first_keeps_its_seat_and_place(
    broker: Broker, tmp_path: Path, postgres_url: str
) -> None:
    """F02 across gateways: the stale will and the new hello may go to two."""
    await seed_tenant(postgres_url, "T8", basic1=2)
    await _cluster(broker, tmp_path, postgres_url, 2, **{"grace-seconds": 1})
    routers = await _seated(broker, ["R01", "R02"])
    r03 = sim_router(broker, "T8", "R03")
    await r03.connect()
    assert (await r03.ask())[0].decision == "reject"
    before = _rows(postgres_url, "T8")["R01"]

    await routers["R01"].drop()
    routers["R01"].new_session()
    await routers["R01"].connect()
    decision, _ = await routers["R01"].ask()
    heartbeat = asyncio.create_task(_heartbeats(routers["R01"]))
    try:
        with pytest.raises(TimeoutError):
            await r03.next_decision(timeout=3)  # no seat is freed for R03
    finally:
        heartbeat.cancel()

    assert (decision.decision, decision.epoch) == ("accept", before[2] + 1)
    assert _rows(postgres_url, "T8")["R01"] == (before[0], True, before[2] + 1)
    await asyncio.gather(*(r.disconnect() for r in [*routers.values(), r03]))


async def test_hellos_sent_while_every_gateway_is_down_are_all_answered(
    broker: Broker, tmp_path: Path, postgres_url: str
) -> None:
    """F04: both stopped; one comes back and answers both sessions' queues.

    The broker shared the hellos out over both gateways' sessions, so they
    are decided session by session: the line is in the order PostgreSQL
    recorded them, and each router is told its place in that line.
    """
    await seed_tenant(postgres_url, "T8", basic1=2)
    gateways = await _cluster(broker, tmp_path, postgres_url, 2)
    routers = await _seated(broker, ["R01", "R02"])
    for gateway in gateways:
        assert gateway.stop() == 0
    late = [sim_router(broker, "T8", name) for name in ("R09", "R10", "R11", "R12")]
    for router in late:
        await router.connect()
        router.hello()

    await gateways[0].start()
    answers = [await r.next_decision(20) for r in late]

    stored = _rows(postgres_url, "T8")
    order = sorted((stored[r.router][0] or 0, r.router) for r in late)
    told = {a.router: (a.decision, a.position) for a in answers}
    assert [told[router] for _, router in order] == [
        ("reject", 1), ("reject", 2), ("reject", 3), ("reject", 4),
    ]  # fmt: skip
    await asyncio.gather(*(r.disconnect() for r in [*routers.values(), *late]))


async def test_a_gateway_that_loses_postgresql_leaves_and_its_hellos_are_answered(
    broker: Broker, tmp_path: Path, postgres_url: str
) -> None:
    await seed_tenant(postgres_url, "T8", basic1=8)
    gateways = await _cluster(broker, tmp_path, postgres_url, 1)
    await _until_logged(gateways, "leading the cluster", 10)
    second = GatewayProcess(
        broker,
        tmp_path / "unused.db",
        tmp_path / "gw2.log",
        store=f"{postgres_url}?application_name=second",
        **{"gateway-id": "gw2"},
    )
    await second.start()
    with psycopg.connect(postgres_url, autocommit=True) as db:
        db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'second'"
        )
    routers = [sim_router(broker, "T8", f"R{i:02d}") for i in range(1, 21)]
    await asyncio.gather(*(r.connect() for r in routers))
    for router in routers:
        router.hello()

    answers = [await r.next_decision(20) for r in routers]

    assert sum(a.decision == "accept" for a in answers) == 8
    assert second.process is not None
    assert await asyncio.to_thread(second.process.wait, 20) == 1
    assert _logged([second], "gateway failed")
    await asyncio.gather(*(r.disconnect() for r in routers))


async def _tool(url: str, *args: str) -> None:
    done = await asyncio.to_thread(
        subprocess.run,
        [str(BIN / "irm-tool"), "--store", url, *args],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


async def test_a_scheduled_activation_happens_at_its_instant_after_the_leader_died(
    broker: Broker, tmp_path: Path, postgres_url: str
) -> None:
    await seed_tenant(postgres_url, "T", basic1=1)
    spare = await add_available(postgres_url, "T", 1)
    gateways = await _cluster(broker, tmp_path, postgres_url, 2)
    await _until_logged(gateways, "leading the cluster", 10)
    first, second = sim_router(broker, "T", "R1"), sim_router(broker, "T", "R2")
    for router in (first, second):
        await router.connect()
        await router.ask()

    at = datetime.now(UTC) + timedelta(seconds=4)
    await _tool(postgres_url, "activate", "--tenant", "T", spare[0].id, "--at",
                to_text(at) or "")  # fmt: skip
    _leader(gateways).kill()
    admitted = await second.next_decision(timeout=15)

    assert (admitted.decision, admitted.cause) == ("accept", "capacity")
    decided = from_text(admitted.at)
    assert decided is not None
    assert at <= decided < at + timedelta(seconds=3)
    with psycopg.connect(postgres_url) as db:
        states = db.execute("SELECT state FROM licenses").fetchall()
        granted = db.execute(
            "SELECT count(*) FROM audit WHERE event = 'seat_granted'"
        ).fetchone()
    assert states == [("active",), ("active",)]
    assert granted == (1,), "the instant took effect once"
    await first.disconnect()
    await second.disconnect()


async def test_a_router_in_a_share_group_it_can_name_takes_no_hello(
    broker: Broker, tmp_path: Path, postgres_url: str
) -> None:
    """Mosquitto grants the SUBSCRIBE and drops what it may not read: a
    router in the cluster's group would swallow its turn of every hello."""
    await seed_tenant(postgres_url, "TA", basic1=20)
    gateways = await _cluster(broker, tmp_path, postgres_url, 1)
    await _until_logged(gateways, "leading the cluster", 10)
    account = ("TA/EVE", broker.router_password("TA", "EVE"))
    broker.flush()
    eve = await mqtt_client(broker, account, client_id="TA/EVE")
    for kind in protocol.INBOUND:
        eve.subscribe(f"$share/irm-gateways/irm/v1/+/+/{kind}", qos=1)
    routers = [sim_router(broker, "TA", f"R{i:02d}") for i in range(20)]
    try:
        for router in routers:
            await router.connect()
        decisions = [(await router.ask(timeout=5))[0] for router in routers]
    finally:
        await asyncio.gather(*(r.disconnect() for r in routers))
        await eve.disconnect()

    assert [d.decision for d in decisions] == ["accept"] * 20
