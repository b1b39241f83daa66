"""The decider and its store: what the store keeps is what the gateway
decided, and what the tool changes reaches the gateway.

A router can leave and come back within one batch of the decider: its
goodbye and its new hello arrive together, or its lease runs out (the
batch's clock step) while its new hello waits in the same batch. These
tests drive the decider's batches directly, on a real SQLite file and a
real PostgreSQL, with an outbox in place of the broker, so that both
events land in one batch every time. The same outbox plays a connection
lost before the broker acknowledged a presence, which the MQTT client sends
again after the reconnect.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from structlog.testing import capture_logs

from gateway import protocol
from gateway.cluster import ClusterGateway
from gateway.config import Settings
from gateway.mqtt import Inbound
from gateway.service import Gateway, _Item, _Reload
from policy.errors import StoreError
from policy.licenses import License, State
from policy.postgres_store import PostgresStore
from policy.store import Store
from policy.stores import open_store
from tests.seeding import add_available, seed_tenant

T0 = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture
async def opened() -> AsyncIterator[list[Store]]:
    """Stores a test opens, closed even when it fails (an open SQLite
    store's worker thread would keep the test process from ending)."""
    stores: list[Store] = []
    yield stores
    for store in stores:
        await store.close()


class _Outbox:
    """Stands in for the gateway's MQTT connection: what it publishes."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []
        # Publishes the broker has not acknowledged (the real connection's
        # count); a test sets it to play a connection lost before the ack.
        self.unacknowledged = 0

    async def publish(
        self, topic: str, payload: bytes, *, retain: bool = False,
        correlation: bytes | None = None,
    ) -> None:  # fmt: skip
        self.sent.append((topic, json.loads(payload)))

    def subscribe(self, *topics: str, retained: bool = False) -> None:
        pass

    def presence(self, router: str) -> list[tuple[str, int, str]]:
        return [
            (p["state"], p["epoch"], p["reason"])
            for t, p in self.sent
            if t.endswith(f"/{router}/presence")
        ]

    def told(self, router: str) -> list[tuple[str, str]]:
        return [
            (p["decision"], p["reason"])
            for t, p in self.sent
            if t.endswith(f"/{router}/reply")
        ]


def _item(kind: str, router: str, session: str) -> _Item:
    model = protocol.Hello if kind == "hello" else protocol.Goodbye
    message = model(v=1, session=session)
    topic = protocol.topic(protocol.PREFIX, "T8", router, kind)
    inbound = Inbound(topic, message.model_dump_json().encode())
    done = asyncio.get_running_loop().create_future()
    return _Item(kind, "T8", router, message, inbound, done)


async def _gateway(
    database: Path, clock: list[datetime], opened: list[Store]
) -> tuple[Gateway, _Outbox]:
    store = await open_store(database)
    opened.append(store)
    settings = Settings(lease_seconds=60, grace_seconds=2)
    gateway = Gateway(settings, store, clock=lambda: clock[0])
    await gateway._load()
    outbox = _Outbox()
    gateway._mqtt = cast(Any, outbox)
    return gateway, outbox


async def test_goodbye_and_hello_in_one_batch_keep_the_seat_after_a_restart(
    tmp_path: Path, opened: list[Store]
) -> None:
    database = tmp_path / "irm.db"
    await seed_tenant(database, "T8", basic1=1, now=T0)
    clock = [T0 + timedelta(seconds=1)]
    gateway, _ = await _gateway(database, clock, opened)
    await gateway._decide([_item("hello", "R01", "a")])
    await gateway._decide([_item("goodbye", "R01", "a"), _item("hello", "R01", "b")])

    rows = {r.router: r.state for r in await gateway.store.routers("T8")}
    again, outbox = await _gateway(database, clock, opened)  # as after kill -9
    await again._decide([_item("hello", "R02", "x")])

    assert rows == {"R01": "online"}
    assert list(again.admission.lines["T8"].places) == ["R01", "R02"]
    assert outbox.told("R02") == [("reject", "capacity_exceeded")]


async def test_a_lease_run_out_and_a_new_hello_in_one_batch_keep_the_seat(
    tmp_path: Path, opened: list[Store]
) -> None:
    database = tmp_path / "irm.db"
    await seed_tenant(database, "T8", basic1=1, now=T0)
    clock = [T0 + timedelta(seconds=1)]
    gateway, outbox = await _gateway(database, clock, opened)
    await gateway._decide([_item("hello", "R01", "a")])
    clock[0] += timedelta(seconds=61)  # the lease ran out; the hello waits
    await gateway._decide([_item("hello", "R01", "b")])

    rows = {r.router: r.state for r in await gateway.store.routers("T8")}

    assert outbox.told("R01") == [("accept", "licensed"), ("accept", "licensed")]
    assert rows == {"R01": "online"}


async def _activate(store: PostgresStore, license_id: str, at: datetime) -> None:
    """Activate a license now, as the tool does."""
    lic = {x.id: x for x in await store.licenses("T8")}[license_id]
    await store.save_activations(
        "T8", [replace(lic, activation_at=at)], {lic.id: State.ACTIVE}, at, "tool"
    )


async def _cluster(
    postgres_url: str, clock: list[datetime], opened: list[Store]
) -> list[tuple[ClusterGateway, _Outbox]]:
    """Gateways a (leading, T8's licenses loaded) and b on one PostgreSQL."""
    members: list[tuple[ClusterGateway, _Outbox]] = []
    for name in ("a", "b"):
        store = await PostgresStore.open(postgres_url)
        opened.append(store)
        settings = Settings(store=postgres_url, gateway_id=name)
        member = ClusterGateway(settings, store, clock=lambda: clock[0])
        await member._load()
        outbox = _Outbox()
        member._mqtt = cast(Any, outbox)
        members.append((member, outbox))
    a = members[0][0]
    a.is_leader.set()
    licenses = await a.shared.licenses("T8")
    await a._decide([_Reload("T8", licenses, await a.shared.license_states("T8"))])
    return members


async def test_one_seat_is_never_two_across_gateways_after_leave_and_join(
    postgres_url: str, opened: list[Store]
) -> None:
    await seed_tenant(postgres_url, "T8", basic1=1, now=T0)
    clock = [T0 + timedelta(seconds=1)]
    (a, to_a), (b, to_b) = await _cluster(postgres_url, clock, opened)

    await a._decide([_item("hello", "R01", "a")])
    await a._decide([_item("goodbye", "R01", "a"), _item("hello", "R01", "b")])
    await b._decide([_item("hello", "R02", "x")])
    await a._decide([_item("hello", "R03", "y")])
    seated = [p.router for p in a.admission.lines["T8"].in_order() if p.seated]

    assert to_a.told("R01")[-1] == ("accept", "licensed")
    assert to_b.told("R02") == [("reject", "capacity_exceeded")]
    assert seated == ["R01"]


async def test_a_failed_read_of_the_tools_change_is_retried_and_nothing_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, opened: list[Store]
) -> None:
    """The store fails once while the gateway reads what the tool changed:
    the gateway says so and reads the change again at its next poll."""
    database = tmp_path / "irm.db"
    await seed_tenant(database, "T8", basic1=1, now=T0)
    store = await open_store(database)
    opened.append(store)
    gateway = Gateway(Settings(poll_seconds=0.05), store)
    await gateway._load()
    read = store.licenses
    failed = 0

    async def fails_once(tenant: str) -> Any:
        nonlocal failed
        if failed == 0:
            failed += 1
            raise OSError("disk I/O error")
        return await read(tenant)

    monkeypatch.setattr(store, "licenses", fails_once)
    stop = asyncio.Event()
    with capture_logs() as logged:
        watching = asyncio.create_task(gateway._watch_store(stop))
        try:
            added = await add_available(database, "T8", count=2)
            reload = await asyncio.wait_for(gateway._queue.get(), 10)
        finally:
            stop.set()
            await asyncio.wait_for(watching, 10)

    assert isinstance(reload, _Reload)
    assert {lic.id for lic in added} <= {lic.id for lic in reload.licenses}
    [error] = [line for line in logged if line["event"] == "store read failed"]
    assert (error["error"], error["attempt"]) == ("OSError", 1)


async def test_presence_a_reconnect_sends_again_is_followed_by_the_stored_state(
    postgres_url: str, opened: list[Store]
) -> None:
    """b's connection drops before the broker acknowledged R01's "online";
    gmqtt sends it again after the reconnect, by when R01 has left through
    a. b then publishes R01's stored state, so the old copy does not stay."""
    await seed_tenant(postgres_url, "T8", basic1=2, now=T0)
    clock = [T0 + timedelta(seconds=1)]
    (a, to_a), (b, to_b) = await _cluster(postgres_url, clock, opened)
    await b._decide([_item("hello", "R02", "y")])  # acknowledged, then:
    await b._decide([_item("hello", "R01", "x")])
    to_b.unacknowledged = 1  # the connection is lost before the ack
    await a._decide([_item("goodbye", "R01", "x")])
    gone = to_a.presence("R01")[-1]

    mark = len(to_b.sent)
    await b._on_connected()
    work = []
    while not b._queue.empty():
        work.append(b._queue.get_nowait())
    await b._decide(work)
    after = [p["router"] for t, p in to_b.sent[mark:] if t.endswith("/presence")]

    assert gone[0] == "offline"
    assert to_b.presence("R01")[-1] == (gone[0], gone[1], "restart")
    assert after == ["R01"]  # not R02, whose presence was acknowledged


async def test_a_hello_just_after_an_expiry_is_decided_on_what_is_valid_then(
    postgres_url: str, opened: list[Store]
) -> None:
    """The leader a has not yet applied the expiry (its turn comes a moment
    later) when b decides a hello one microsecond after it: b applies the
    expiry itself, under the tenant's lock, and a then finds it done."""
    active = await seed_tenant(postgres_url, "T8", basic1=2, now=T0)
    expiry = active[0].expires_at
    assert expiry is not None
    clock = [expiry - timedelta(minutes=1)]
    (a, to_a), (b, to_b) = await _cluster(postgres_url, clock, opened)
    await a._decide([_item("hello", "R01", "x")])
    await b._decide([_item("hello", "R03", "z")])  # b knows the tenant

    clock[0] = expiry + timedelta(microseconds=1)
    await b._decide([_item("hello", "R02", "y")])
    clock[0] += timedelta(microseconds=1)
    await a._decide([])  # the leader's turn: the expiry is due on its timetable
    states = await a.shared.license_states("T8")
    audit = await a.shared.audit("T8", subject="license")

    assert to_b.told("R02") == [("reject", "no_valid_license")]
    assert to_b.told("R01")[-1][0] == "reject"  # its seat ended with the licenses
    assert not to_a.told("R01")[1:]  # told once, by b
    assert set(states.values()) == {State.EXPIRED}
    assert sum(e.event == "expired" for e in audit) == 2


async def test_a_clock_behind_an_applied_expiry_does_not_take_it_back(
    postgres_url: str, opened: list[Store]
) -> None:
    """a applied the expiry; b's batch read its clock a moment before the
    expiry (then waited for the lock, or its host's clock lags). b decides
    on what is stored, not on the licenses at its own instant."""
    active = await seed_tenant(postgres_url, "T8", basic1=2, now=T0)
    expiry = active[0].expires_at
    assert expiry is not None
    clock = [expiry - timedelta(minutes=1)]
    (a, to_a), (b, to_b) = await _cluster(postgres_url, clock, opened)
    await a._decide([_item("hello", "R01", "x"), _item("hello", "R02", "y")])
    clock[0] = expiry + timedelta(microseconds=1)
    await a._decide([])  # the leader applies the expiry

    clock[0] = expiry - timedelta(microseconds=1)
    await b._decide([_item("hello", "R03", "z")])
    clock[0] = expiry + timedelta(hours=1)
    await a._decide([_item("hello", "R04", "w")])

    assert to_b.told("R01") == []  # not given its seat back
    assert to_b.told("R03") == [("reject", "no_valid_license")]
    assert to_a.told("R04") == [("reject", "no_valid_license")]
    assert a.admission.lines["T8"].capacity.seats == 0


async def test_licenses_read_before_another_gateway_applied_newer_ones_are_not_applied(
    postgres_url: str, opened: list[Store]
) -> None:
    """The tool activates L2, then L3; the leader hears of the first change
    while b has already applied both: the leader takes no seat back."""
    await seed_tenant(postgres_url, "T8", basic1=1, now=T0)
    l2, l3 = await add_available(postgres_url, "T8", count=2)
    clock = [T0 + timedelta(seconds=1)]
    (a, to_a), (b, to_b) = await _cluster(postgres_url, clock, opened)
    await a._decide([_item("hello", f"R0{i}", "s") for i in (1, 2, 3)])

    clock[0] += timedelta(seconds=1)
    await _activate(a.shared, l2.id, clock[0])
    first = _Reload("T8", await a.shared.licenses("T8"), {})  # a's watcher read
    await _activate(a.shared, l3.id, clock[0])
    clock[0] += timedelta(milliseconds=100)
    await b._decide([_Reload("T8", [], {}), _item("hello", "R04", "s")])
    clock[0] += timedelta(milliseconds=100)
    await a._decide([first])
    await a._decide([_Reload("T8", [], {})])

    assert to_a.told("R03") == [("reject", "capacity_exceeded")]  # at first only
    assert to_b.told("R03") == [("accept", "licensed")]  # the seat L3 gave
    assert a.admission.lines["T8"].capacity.seats == 3


async def test_the_tools_license_changes_wait_for_a_deciding_gateways_lock(
    postgres_url: str, opened: list[Store]
) -> None:
    """A gateway reads a tenant's licenses and writes their states under the
    tenant's lock; an activation by the tool never lands in between."""
    await seed_tenant(postgres_url, "T8", basic1=1, now=T0)
    [l2] = await add_available(postgres_url, "T8")
    gateway = await PostgresStore.open(postgres_url)
    tool = await PostgresStore.open(postgres_url)
    opened += [gateway, tool]

    # The tool's session gives up on a lock after 200 ms instead of waiting.
    await tool._conn.execute("SET lock_timeout = '200ms'")

    async with gateway.locked({"T8"}):
        with pytest.raises(StoreError, match="lock"):
            await _activate(tool, l2.id, T0)
    await _activate(tool, l2.id, T0)

    assert (await tool.license_states("T8"))[l2.id] is State.ACTIVE


async def test_a_tool_whose_clock_runs_ahead_expires_nothing_early(
    postgres_url: str, opened: list[Store]
) -> None:
    """The tool's host reads 20 minutes ahead when it activates L2 "now": a
    gateway applies the licenses at its own instant, not the tool's."""
    active = await seed_tenant(postgres_url, "T8", basic25=1, now=T0)
    expiry = active[0].expires_at
    assert expiry is not None
    [l2] = await add_available(postgres_url, "T8")
    clock = [expiry - timedelta(minutes=10)]
    (a, _), (b, _) = await _cluster(postgres_url, clock, opened)
    await _activate(a.shared, l2.id, clock[0] + timedelta(minutes=20))

    await b._decide([_Reload("T8", [], {}), _item("hello", "R01", "x")])
    await a._decide([_Reload("T8", [], {})])
    states = await a.shared.license_states("T8")

    assert states[active[0].id] is State.ACTIVE
    assert b.admission.lines["T8"].capacity.seats == 25


async def test_a_tenant_without_an_applied_instant_goes_by_its_stored_states(
    postgres_url: str, opened: list[Store]
) -> None:
    """A database from before the applied instant was kept, or a tenant moved
    from SQLite: an expiry already stored is not taken back by a clock
    that reads a moment before it."""
    active = await seed_tenant(postgres_url, "T8", basic1=2, now=T0)
    expiry = active[0].expires_at
    assert expiry is not None
    clock = [expiry - timedelta(minutes=1)]
    (a, _), (b, to_b) = await _cluster(postgres_url, clock, opened)
    await a._decide([_item("hello", "R01", "x")])
    clock[0] = expiry + timedelta(microseconds=1)
    await a._decide([])  # the leader applies the expiry
    async with a.shared.locked({"T8"}) as locked:
        await locked.db.execute("UPDATE tenants SET licenses_at = NULL")

    clock[0] = expiry - timedelta(microseconds=1)
    await b._decide([_item("hello", "R03", "z")])

    assert to_b.told("R03") == [("reject", "no_valid_license")]
    assert to_b.told("R01") == []


async def test_a_clock_once_far_ahead_does_not_move_later_decisions(
    postgres_url: str, opened: list[Store]
) -> None:
    """b's host starts with its clock two years ahead and decides once; once
    its clock is right, a license bought then is active, not expired."""
    await seed_tenant(postgres_url, "T8", basic1=1, now=T0)
    clock = [T0 + timedelta(days=730)]
    (a, _), (b, _) = await _cluster(postgres_url, clock, opened)
    await b._decide([_item("hello", "R01", "x")])

    clock[0] = T0 + timedelta(seconds=2)
    [l2] = await add_available(postgres_url, "T8")
    await _activate(a.shared, l2.id, clock[0])
    await a._decide([_Reload("T8", [], {}), _item("hello", "R02", "y")])
    states = await a.shared.license_states("T8")

    assert states[l2.id] is State.ACTIVE
    assert a.admission.lines["T8"].capacity.seats == 2  # both are in their term


async def test_capacity_comes_back_after_a_clock_read_far_ahead_once(
    postgres_url: str, opened: list[Store]
) -> None:
    """b's clock reads two years ahead once and stores both licenses as
    expired; with the clocks right again and nothing changed by the tool,
    both gateways decide on the licenses' own instants, in arrival order."""
    await seed_tenant(postgres_url, "T8", basic1=2, now=T0)
    clock = [T0 + timedelta(seconds=1)]
    (a, to_a), (b, to_b) = await _cluster(postgres_url, clock, opened)
    clock[0] = T0 + timedelta(days=730)
    await b._decide([_item("hello", "R01", "x")])
    told_then = to_b.told("R01")

    clock[0] = T0 + timedelta(seconds=2)
    await a._decide([_item("hello", "R02", "y")])
    await b._decide([_item("hello", "R03", "z")])

    assert told_then == [("reject", "no_valid_license")]
    assert to_a.told("R01") == [("accept", "licensed")]  # first in line
    assert to_a.told("R02") == [("accept", "licensed")]
    assert to_b.told("R03") == [("reject", "capacity_exceeded")]
    assert b.admission.lines["T8"].capacity.seats == 2


async def test_a_leader_whose_clock_read_far_ahead_once_applies_a_later_start(
    postgres_url: str, opened: list[Store]
) -> None:
    """The leader decides once at a clock two years ahead, which changes no
    capacity (its one license is still to start); once another gateway has
    decided with a right clock, the leader applies that start on time."""
    await seed_tenant(postgres_url, "T8", expired_basic1=1, now=T0)
    [l1] = await add_available(postgres_url, "T8")
    start = T0 + timedelta(days=1)
    stored = {x.id: x for x in await _t8_licenses(postgres_url, opened)}[l1.id]
    await opened[-1].save_activations(
        "T8", [replace(stored, activation_at=start)], {l1.id: State.SCHEDULED},
        T0, "tool",
    )  # fmt: skip
    clock = [T0 + timedelta(seconds=1)]
    (a, to_a), (b, _) = await _cluster(postgres_url, clock, opened)
    clock[0] = T0 + timedelta(days=730)
    await a._decide([_item("hello", "R00", "s")])

    clock[0] = T0 + timedelta(seconds=2)
    await b._decide([_item("hello", "R01", "x")])
    clock[0] = start + timedelta(seconds=10)
    await a._decide([])  # the leader's turn at the start
    await a._decide([_item("hello", "R02", "y")])

    assert a.admission.lines["T8"].capacity.seats == 1
    # R00's lease, given at the far-ahead instant, still runs; R01's ran out.
    assert to_a.told("R00")[-1] == ("accept", "licensed")
    assert to_a.told("R02") == [("reject", "capacity_exceeded")]


async def _t8_licenses(url: str, opened: list[Store]) -> list[License]:
    """The licenses of T8, read through a store left open in ``opened``."""
    store = await PostgresStore.open(url)
    opened.append(store)
    return await store.licenses("T8")
