"""The seed example and the license life cycle, through the real commands.

``irm-tool`` and ``irm-gateway`` run as processes against one SQLite file
and a real Mosquitto; routers are real MQTT connections.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from policy.licenses import Kind, State
from policy.sqlite_store import SqliteStore
from policy.timeutil import add_months, from_text, to_text
from tests.conftest import BIN, GatewayProcess, sim_router, tool, tool_json
from tests.seeding import add_available, mint, seed_tenant
from tools.broker import Broker
from tools.fleet import run_fleet

pytestmark = pytest.mark.broker


def ok(database: Path, *args: str, now: str | None = None) -> str:
    result = tool(database, *args, now=now)
    assert result.returncode == 0, result.stderr
    return result.stdout


def instant(moment: datetime) -> str:
    return to_text(moment) or ""


async def test_seed_example_first_eight_online_last_two_offline(
    broker: Broker, tmp_path: Path
) -> None:
    """10 Cloud Basic 1 bought, 2 expired, 10 routers: the first 8 get seats."""
    db = tmp_path / "irm.db"
    now = datetime.now(UTC)
    year_ago = instant(now - timedelta(days=395))
    ok(db, "tenant", "add", "acme", "--tz", "Europe/Berlin")
    issued = (now - timedelta(days=420)).date().isoformat()
    ok(db, "vendor", "mint", "--kind", "cloud-basic-1", "--count", "10",
       "--issued", issued, "--csv", str(tmp_path / "sales.csv"))  # fmt: skip
    ok(
        db,
        "import",
        "--tenant",
        "acme",
        "--csv",
        str(tmp_path / "sales.csv"),
        now=year_ago,
    )
    ids = [
        lic["id"] for lic in tool_json(db, "licenses", "--tenant", "acme")["licenses"]
    ]
    ok(db, "activate", "--tenant", "acme", *ids[:2], now=year_ago)
    ok(db, "activate", "--tenant", "acme", "--all-available")
    names = [f"R{i:02d}" for i in range(1, 11)]
    ok(db, "routers", "register", "--tenant", "acme", *names)

    gateway = GatewayProcess(broker, db, tmp_path / "gw.log")
    await gateway.start()
    report = await run_fleet(
        "127.0.0.1", broker.router_port, "acme", names, goodbye=False,
        passwords=broker.provision("acme", names),
    )  # fmt: skip
    gateway.stop()

    told = {n: (d.decision, d.reason, d.position) for n, d in report.decisions.items()}
    assert told == {
        **dict.fromkeys(names[:8], ("accept", "licensed", None)),
        "R09": ("reject", "capacity_exceeded", 1),
        "R10": ("reject", "capacity_exceeded", 2),
    }
    listed = tool_json(db, "routers", "--tenant", "acme")["routers"]
    assert {r["router"]: (r["online"], r["position"]) for r in listed} == {
        **dict.fromkeys(names[:8], (True, None)),
        "R09": (False, 1),
        "R10": (False, 2),
    }
    states = [
        lic["state"]
        for lic in tool_json(db, "licenses", "--tenant", "acme")["licenses"]
    ]
    assert sorted(states) == ["active"] * 8 + ["expired"] * 2


async def test_scheduled_activation_admits_waiting_routers_at_its_instant(
    broker: Broker, tmp_path: Path
) -> None:
    db = tmp_path / "irm.db"
    await seed_tenant(db, "T", basic1=2)
    spare = await add_available(db, "T", 2)
    gateway = GatewayProcess(broker, db, tmp_path / "gw.log")
    await gateway.start()
    routers = [sim_router(broker, "T", f"R{i}") for i in range(1, 5)]
    for router in routers:
        await router.connect()
        await router.ask()

    at = datetime.now(UTC) + timedelta(seconds=3)
    ids = [lic.id for lic in spare]
    ok(db, "activate", "--tenant", "T", *ids, "--at", instant(at))
    admitted = [await r.next_decision(15) for r in routers[2:]]

    assert [(d.decision, d.cause) for d in admitted] == [("accept", "capacity")] * 2
    for decision in admitted:
        decided = from_text(decision.at)
        assert decided is not None
        assert decided >= at
    states = {
        lic["state"] for lic in tool_json(db, "licenses", "--tenant", "T")["licenses"]
    }
    assert states == {"active"}
    for router in routers:
        await router.disconnect()
    gateway.stop()


def expiring_soon(seconds: float) -> tuple[datetime, datetime]:
    """An activation instant whose one-month term ends ``seconds`` from now."""
    target = datetime.now(UTC) + timedelta(seconds=seconds)
    for days in range(27, 33):
        start = target - timedelta(days=days)
        end = add_months(start, 1)
        if abs((end - target).total_seconds()) < 1:
            return start, end
    raise AssertionError("no one-month term ends then")


async def test_expiry_evicts_the_last_arrivals_at_its_instant(
    broker: Broker, tmp_path: Path
) -> None:
    db = tmp_path / "irm.db"
    await seed_tenant(db, "T", basic1=2)
    start, end = expiring_soon(4)
    short, code = mint(Kind.BASIC_1, start - timedelta(days=1), term=1)
    store = await SqliteStore.open(db)
    short = replace(short, tenant="T")
    await store.add_licenses("T", [(short, code)], start, "t")
    short = replace(short, activation_at=start)
    await store.save_activations("T", [short], {short.id: State.ACTIVE}, start, "t")
    await store.close()
    gateway = GatewayProcess(broker, db, tmp_path / "gw.log")
    await gateway.start()
    routers = [sim_router(broker, "T", f"R{i}") for i in range(1, 5)]
    for router in routers:
        await router.connect()
        await router.ask()

    lost = await routers[2].next_decision(15)

    assert (lost.decision, lost.reason, lost.cause, lost.position) == (
        "reject", "capacity_exceeded", "capacity", 1,
    )  # fmt: skip
    decided = from_text(lost.at)
    assert decided is not None
    assert decided >= end
    assert routers[0].heard.empty()
    assert routers[1].heard.empty()
    listed = tool_json(db, "routers", "--tenant", "T")["routers"]
    assert [(r["router"], r["state"], r["position"]) for r in listed] == [
        ("R1", "online", None), ("R2", "online", None),
        ("R3", "waiting", 1), ("R4", "waiting", 2),
    ]  # fmt: skip
    audit = tool_json(db, "audit", "--tenant", "T", "--license", short.id)
    assert [e["event"] for e in audit["entries"]][-1] == "expired"
    for router in routers:
        await router.disconnect()
    gateway.stop()


async def test_activation_by_the_tool_takes_effect_within_a_second(
    broker: Broker, tmp_path: Path
) -> None:
    db = tmp_path / "irm.db"
    await seed_tenant(db, "T", basic1=1)
    (spare,) = await add_available(db, "T")
    gateway = GatewayProcess(broker, db, tmp_path / "gw.log")
    await gateway.start()
    first = sim_router(broker, "T", "R1")
    waiting = sim_router(broker, "T", "R2")
    for router in (first, waiting):
        await router.connect()
        await router.ask()

    ok(db, "activate", "--tenant", "T", spare.id)
    admitted = await waiting.next_decision(10)

    assert (admitted.decision, admitted.cause) == ("accept", "capacity")
    entries = tool_json(db, "audit", "--tenant", "T", "--license", spare.id)["entries"]
    activated = from_text(next(e["at"] for e in entries if e["event"] == "activated"))
    decided = from_text(admitted.at)
    assert activated is not None
    assert decided is not None
    assert timedelta(0) <= decided - activated <= timedelta(seconds=1)
    for router in (first, waiting):
        await router.disconnect()
    gateway.stop()


async def test_ten_hellos_in_one_millisecond_during_an_activation_seat_exactly_eight(
    broker: Broker, tmp_path: Path
) -> None:
    """F06: never nine; the two rejected are the two that arrived last."""
    db = tmp_path / "irm.db"
    await seed_tenant(db, "T8", basic1=8)
    (later,) = await add_available(db, "T8")
    gateway = GatewayProcess(broker, db, tmp_path / "gw.log")
    await gateway.start()
    routers = [sim_router(broker, "T8", f"R{i:02d}") for i in range(1, 11)]
    await asyncio.gather(*(r.connect() for r in routers))

    tomorrow = instant(datetime.now(UTC) + timedelta(days=1))
    activation = asyncio.create_task(
        asyncio.to_thread(
            tool, db, "activate", "--tenant", "T8", later.id, "--at", tomorrow
        )
    )
    for router in routers:
        router.hello()
    decisions = [await r.next_decision(15) for r in routers]
    assert (await activation).returncode == 0

    accepted = [d.router for d in decisions if d.decision == "accept"]
    assert len(accepted) == 8
    with sqlite3.connect(db) as conn:
        order = [
            r[0]
            for r in conn.execute(
                "SELECT router FROM routers WHERE tenant = 'T8' ORDER BY arrival"
            )
        ]
    assert sorted(accepted) == sorted(order[:8])
    rejected = {d.router: d.position for d in decisions if d.decision == "reject"}
    assert rejected == {order[8]: 1, order[9]: 2}
    for router in routers:
        await router.disconnect()
    gateway.stop()


async def test_importing_five_thousand_codes_while_deciding_hellos_locks_nobody_out(
    broker: Broker, tmp_path: Path
) -> None:
    """F11: the tool's large import and the gateway's writes share SQLite."""
    db = tmp_path / "irm.db"
    await seed_tenant(db, "T", basic1=10)
    ok(db, "tenant", "add", "big")
    issued = (datetime.now(UTC) - timedelta(days=5)).date().isoformat()
    ok(db, "vendor", "mint", "--kind", "cloud-basic-1", "--count", "5000",
       "--issued", issued, "--csv", str(tmp_path / "big.csv"))  # fmt: skip
    gateway = GatewayProcess(broker, db, tmp_path / "gw.log")
    await gateway.start()
    routers = [sim_router(broker, "T", f"R{i:02d}") for i in range(40)]
    await asyncio.gather(*(r.connect() for r in routers))

    importing = asyncio.create_task(
        asyncio.to_thread(
            tool, db, "import", "--tenant", "big", "--csv", str(tmp_path / "big.csv")
        )
    )
    latencies = []
    while not importing.done():
        for router in routers:
            router.new_session()
        answers = await asyncio.gather(*(r.ask(10) for r in routers))
        latencies += [rtt for _, rtt in answers]
    result = await importing

    assert result.returncode == 0, result.stderr
    assert "locked" not in result.stderr
    assert not [line for line in gateway.log_lines() if line.get("level") == "error"]
    with sqlite3.connect(db) as conn:
        count = conn.execute("SELECT count(*) FROM licenses WHERE tenant = 'big'")
        assert count.fetchone() == (5000,)
    worst = max(latencies) * 1000
    print(f"\nF11: {len(latencies)} hellos during the import, max {worst:.0f} ms")
    for router in routers:
        await router.disconnect()
    gateway.stop()


def test_an_import_killed_midway_hides_nothing_once_it_is_forgotten(
    tmp_path: Path,
) -> None:
    """kill -9 (or a power cut) between an import's chunks: its rows stay,
    uncommitted and unseen. Running the import again must neither call the
    codes "already present" nor lose them: it says which import holds them
    and until when, and imports them all once that import is forgotten."""
    db = tmp_path / "irm.db"
    started = datetime.now(UTC).replace(microsecond=0)
    ok(db, "tenant", "add", "big")
    issued = (started - timedelta(days=5)).date().isoformat()
    csv = tmp_path / "big.csv"
    ok(db, "vendor", "mint", "--kind", "cloud-basic-1", "--count", "5000",
       "--issued", issued, "--csv", str(csv))  # fmt: skip
    command = [
        str(BIN / "irm-tool"), "--database", str(db), "--now", instant(started),
        "import", "--tenant", "big", "--csv", str(csv),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("IRM_")}
    importing = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)  # fmt: skip
    written = 0
    deadline = time.monotonic() + 60
    with sqlite3.connect(db, timeout=10) as conn:
        while written == 0 and importing.poll() is None:
            assert time.monotonic() < deadline, "the import wrote no chunk in 60 s"
            written = conn.execute("SELECT count(*) FROM licenses").fetchone()[0]
            time.sleep(0.002)
    importing.kill()
    importing.wait()
    assert 0 < written < 5000, "the import ended before it could be killed midway"

    soon = tool(db, "import", "--tenant", "big", "--csv", str(csv),
                now=instant(started + timedelta(minutes=1)))  # fmt: skip
    later = tool(db, "import", "--tenant", "big", "--csv", str(csv),
                 now=instant(started + timedelta(minutes=11)))  # fmt: skip

    assert soon.returncode == 1
    assert "already present" not in soon.stdout
    assert "held by an import into tenant big" in soon.stderr
    assert f"from {instant(started + timedelta(minutes=10))}" in soon.stderr
    assert later.returncode == 0, later.stderr
    assert "5000 imported" in later.stdout
    listed = tool_json(db, "licenses", "--tenant", "big",
                       now=instant(started + timedelta(minutes=11)))  # fmt: skip
    assert len(listed["licenses"]) == 5000


async def test_paid_activation_invalidates_cloud_free_and_reseats_the_first_arrivals(
    broker: Broker, tmp_path: Path
) -> None:
    """Cloud Free holds 30 routers; a Basic 25 activated by the tool ends it.

    The first 25 arrivals keep seats and are told the tier is now full; the
    last 5 lose theirs and wait in their original order.
    """
    db = tmp_path / "irm.db"
    now = datetime.now(UTC)
    free, free_code = mint(Kind.FREE, now - timedelta(days=10))
    paid, paid_code = mint(Kind.BASIC_25, now - timedelta(days=10))
    store = await SqliteStore.open(db)
    await store.add_tenant("T", "UTC", now)
    bought = [
        (replace(free, tenant="T"), free_code),
        (replace(paid, tenant="T"), paid_code),
    ]
    await store.add_licenses("T", bought, now, "t")
    free = replace(free, tenant="T", activation_at=now)
    await store.save_activations("T", [free], {free.id: State.ACTIVE}, now, "t")
    await store.close()
    gateway = GatewayProcess(broker, db, tmp_path / "gw.log")
    await gateway.start()
    routers = [sim_router(broker, "T", f"R{i:02d}") for i in range(1, 31)]
    for router in routers:
        await router.connect()
        decision, _ = await router.ask()
        assert (decision.decision, decision.tier) == ("accept", "free")

    result = tool(db, "activate", "--tenant", "T", paid.id)
    assert result.returncode == 0, result.stderr
    assert "Cloud Free" in result.stdout + result.stderr
    told = [await r.next_decision(10) for r in routers]

    assert [(d.decision, d.tier, d.cause) for d in told[:25]] == [
        ("accept", "full", "capacity")
    ] * 25
    assert [(d.decision, d.reason, d.position) for d in told[25:]] == [
        ("reject", "capacity_exceeded", p) for p in range(1, 6)
    ]
    states = {
        lic["kind"]: lic["state"]
        for lic in tool_json(db, "licenses", "--tenant", "T")["licenses"]
    }
    assert states == {"cloud-free": "invalidated", "cloud-basic-25": "active"}
    for router in routers:
        await router.disconnect()
    gateway.stop()


async def test_a_cancelled_scheduled_activation_never_takes_effect(
    broker: Broker, tmp_path: Path
) -> None:
    """Scheduled a few seconds ahead, then unscheduled: at its instant the
    waiting router stays waiting and the license stays available."""
    db = tmp_path / "irm.db"
    await seed_tenant(db, "T", basic1=1)
    (spare,) = await add_available(db, "T")
    gateway = GatewayProcess(broker, db, tmp_path / "gw.log")
    await gateway.start()
    first = sim_router(broker, "T", "R1")
    waiting = sim_router(broker, "T", "R2")
    for router in (first, waiting):
        await router.connect()
        await router.ask()

    # Far enough ahead for two tool runs to end before CANCEL_LEAD (3 s)
    # before the instant.
    at = datetime.now(UTC) + timedelta(seconds=8)
    ok(db, "activate", "--tenant", "T", spare.id, "--at", instant(at))
    # The gateway has the instant in its timetable before it is cancelled.
    await gateway.until_logged("licenses reloaded", tenant="T")
    ok(db, "unschedule", "--tenant", "T", spare.id)
    await gateway.until_logged("licenses reloaded", count=2, tenant="T")

    # The instant itself can only be waited for. Once it has passed, a hello
    # makes the gateway decide at a later moment, after acting on its
    # timetable: had the license fired, R2 would be seated and R3 first in
    # line.
    await asyncio.sleep(max(0.0, (at - datetime.now(UTC)).total_seconds()))
    late = sim_router(broker, "T", "R3")
    await late.connect()
    decision, _ = await late.ask()

    assert (decision.decision, decision.reason, decision.position) == (
        "reject", "capacity_exceeded", 2,
    )  # fmt: skip
    assert waiting.heard.empty()
    assert first.heard.empty()
    listed = tool_json(db, "licenses", "--tenant", "T")["licenses"]
    assert {lic["id"]: lic["state"] for lic in listed}[spare.id] == "available"
    routers = tool_json(db, "routers", "--tenant", "T")["routers"]
    assert [(r["router"], r["state"]) for r in routers] == [
        ("R1", "online"), ("R2", "waiting"), ("R3", "waiting"),
    ]  # fmt: skip
    entries = tool_json(db, "audit", "--tenant", "T", "--license", spare.id)
    assert [e["event"] for e in entries["entries"]] == [
        "imported", "activated", "activation_cancelled",
    ]  # fmt: skip
    # The gateway is alive and still watching: activated now, it admits R2.
    ok(db, "activate", "--tenant", "T", spare.id)
    admitted = await waiting.next_decision(10)
    assert (admitted.decision, admitted.cause) == ("accept", "capacity")
    for router in (first, waiting, late):
        await router.disconnect()
    gateway.stop()
