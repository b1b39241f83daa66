"""The store contract, held by both backends: SQLite and PostgreSQL."""

from __future__ import annotations

import random
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from policy.admission import (
    Cause,
    Event,
    Joined,
    Left,
    LicenseChanged,
    Place,
    Reason,
    SeatChanged,
    Verdict,
)
from policy.errors import RuleViolation, StoreError
from policy.licenses import Kind, State, Tier
from policy.postgres_store import MIGRATIONS, PostgresStore
from policy.sqlite_store import SCHEMA, SqliteStore
from policy.store import RouterRow, Store
from policy.stores import open_store
from tests.seeding import mint

NOW = datetime(2026, 3, 1, 12, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "sqlite":
        opened = await open_store(tmp_path / "irm.db")
    else:
        opened = await open_store(request.getfixturevalue("postgres_url"))
    try:
        yield opened
    finally:
        await opened.close()


def _place(router: str, arrival: int, *, seated: bool, epoch: int = 1) -> Place:
    return Place("T", router, f"s-{router}-{epoch}", epoch, arrival, seated, NOW)


async def test_a_tenant_is_added_once_and_a_second_zone_is_refused(
    store: Store,
) -> None:
    await store.add_tenant("T", "Europe/Berlin", NOW)
    await store.add_tenant("T", "Europe/Berlin", NOW)
    with pytest.raises(RuleViolation, match="Europe/Berlin"):
        await store.add_tenant("T", "UTC", NOW)
    assert [(t.id, t.tz, t.created_at) for t in await store.tenants()] == [
        ("T", "Europe/Berlin", NOW)
    ]
    assert await store.tenant("nobody") is None


async def test_licenses_round_trip_and_are_redeemed_in_one_tenant_only(
    store: Store,
) -> None:
    await store.add_tenant("T", "UTC", NOW)
    await store.add_tenant("U", "UTC", NOW)
    items = [mint(Kind.BASIC_1, NOW - timedelta(days=3)) for _ in range(3)]
    items = [(replace(lic, tenant="T", imported_at=NOW), c) for lic, c in items]
    await store.add_licenses("T", items, NOW, "admin")

    stored = await store.licenses("T")
    assert sorted(stored, key=lambda x: x.id) == sorted(
        (replace(lic, tz="UTC") for lic, _ in items), key=lambda x: x.id
    )
    assert await store.owners([items[0][0].id, "missing"]) == {items[0][0].id: "T"}
    theirs = [(replace(items[0][0], tenant="U"), items[0][1])]
    with pytest.raises(RuleViolation):
        await store.add_licenses("U", theirs, NOW, "admin")
    assert await store.licenses("U") == []


async def test_activations_are_stored_with_their_state_and_audited(
    store: Store,
) -> None:
    await store.add_tenant("T", "UTC", NOW)
    lic, code = mint(Kind.BASIC_25, NOW - timedelta(days=3))
    lic = replace(lic, tenant="T", imported_at=NOW)
    await store.add_licenses("T", [(lic, code)], NOW, "admin")
    active = replace(lic, activation_at=NOW)
    await store.save_activations("T", [active], {lic.id: State.ACTIVE}, NOW, "admin")

    assert (await store.licenses("T"))[0].activation_at == NOW
    assert await store.license_states("T") == {lic.id: State.ACTIVE}
    events = [(e.event, e.actor) for e in await store.audit("T", "license")]
    assert events == [("imported", "admin"), ("activated", "admin")]
    with pytest.raises(RuleViolation, match="changed meanwhile"):
        await store.save_activations("T", [active], {lic.id: State.ACTIVE}, NOW, "x")


async def test_events_make_places_epochs_and_router_rows(store: Store) -> None:
    await store.add_tenant("T", "UTC", NOW)
    assert await store.register_routers("T", ["R1", "R2", "R1"], NOW, "admin") == [
        "R1",
        "R2",
    ]
    await store.apply(
        [
            Joined(_place("R1", 1, seated=True), resumed=False),
            Joined(_place("R2", 2, seated=False), resumed=False),
        ],
        NOW,
    )
    verdict = Verdict("T", "R2", "s-R2-1", 1, True, Reason.LICENSED, Tier.FULL)
    later = NOW + timedelta(seconds=1)
    await store.apply(
        [
            Left("T", "R1", "s-R1-1", 1, True, Cause.GOODBYE),
            SeatChanged(verdict, Cause.SEAT_FREED),
        ],
        later,
    )

    places = await store.places()
    assert [(p.router, p.arrival, p.seated, p.epoch) for p in places] == [
        ("R2", 2, True, 1)
    ]
    assert await store.epochs() == {("T", "R1"): 1, ("T", "R2"): 1}
    rows = {r.router: r for r in await store.routers("T")}
    assert (rows["R1"].state, rows["R2"].state) == ("offline", "online")
    assert rows["R2"].changed_at == later
    seen = [e.event for e in await store.audit("T", "router", "R1")]
    assert seen == ["registered", "joined", "left"]


async def test_a_router_that_leaves_and_joins_in_one_batch_is_stored_in_line(
    store: Store,
) -> None:
    """A goodbye (or a lease running out) and the router's new hello, decided
    in one batch: the row is its place from the new hello, not cleared."""
    await store.add_tenant("T", "UTC", NOW)
    await store.apply([Joined(_place("R1", 1, seated=True), resumed=False)], NOW)
    back = _place("R1", 2, seated=True, epoch=2)
    await store.apply(
        [Left("T", "R1", "s-R1-1", 1, True, Cause.GOODBYE), Joined(back, False)], NOW
    )

    assert [(p.router, p.arrival, p.seated, p.epoch) for p in await store.places()] == [
        ("R1", 2, True, 2)
    ]


def _batches(seed: int) -> list[list[tuple[str, str, int]]]:
    """Random runs of one tenant's row events: (kind, router, number)."""
    rng = random.Random(seed)
    runs = []
    for _ in range(30):
        run = []
        for step in range(rng.randint(1, 7)):
            kind = rng.choice("JJSSL")
            run.append((kind, rng.choice(["R1", "R2"]), step + 1))
        runs.append(run)
    return runs


def _events(tenant: str, run: list[tuple[str, str, int]]) -> list[Event]:
    out: list[Event] = []
    for kind, router, n in run:
        if kind == "J":
            place = Place(tenant, router, f"s{n}", n, n, n % 2 == 0, NOW)
            out.append(Joined(place, resumed=False))
        elif kind == "S":
            seated = n % 3 != 0
            verdict = Verdict(tenant, router, f"s{n}", n, seated, Reason.LICENSED, None)
            out.append(SeatChanged(verdict, Cause.CAPACITY))
        else:
            out.append(Left(tenant, router, f"s{n}", n, False, Cause.LEASE))
    return out


async def test_a_batch_leaves_each_row_as_its_events_one_by_one_would(
    store: Store,
) -> None:
    """Writes are grouped by kind for speed; the rows must not show it."""
    for i, run in enumerate(_batches(seed=7)):
        batched, stepwise = f"B{i}", f"S{i}"
        for tenant in (batched, stepwise):
            await store.add_tenant(tenant, "UTC", NOW)
            await store.apply(
                [Joined(Place(tenant, "R1", "s0", 0, 0, True, NOW), False)], NOW
            )
        await store.apply(_events(batched, run), NOW)
        for event in _events(stepwise, run):
            await store.apply([event], NOW)

        def rows(found: list[RouterRow]) -> list[tuple[object, ...]]:
            return [(r.router, r.epoch, r.session, r.arrival, r.seated) for r in found]

        assert rows(await store.routers(batched)) == rows(
            await store.routers(stepwise)
        ), run


async def test_a_tool_change_moves_the_version_and_names_the_tenant(
    store: Store,
) -> None:
    start, _ = await store.changes_after(0)
    version = await store.poll_version()
    await store.add_tenant("T", "UTC", NOW)
    seq, tenants = await store.changes_after(start)
    assert seq > start
    assert tenants == {"T"}
    assert await store.changes_after(seq) == (seq, set())
    if not isinstance(store, SqliteStore):
        # SQLite's data_version moves only for other connections' commits.
        assert await store.poll_version() != version


async def test_an_sqlite_file_opens_again_at_the_current_schema_with_its_rows(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.db"
    first = await SqliteStore.open(path)
    await first.add_tenant("T", "UTC", NOW)
    await first.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta").fetchone() == (str(len(SCHEMA)),)

    again = await open_store(path, create=False)
    try:
        assert [t.id for t in await again.tenants()] == ["T"]
    finally:
        await again.close()


async def test_postgres_migrates_once_and_refuses_a_newer_schema(
    postgres_url: str,
) -> None:
    for _ in range(2):
        opened = await open_store(postgres_url)
        await opened.close()
    with psycopg.connect(postgres_url, autocommit=True) as db:
        versions = db.execute("SELECT version FROM schema_version").fetchall()
        assert versions == [(n,) for n in range(1, len(MIGRATIONS) + 1)]
        db.execute("INSERT INTO schema_version VALUES (99)")
    with pytest.raises(StoreError, match="newer than this program"):
        await open_store(postgres_url)


def _modes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}


async def test_a_new_sqlite_database_is_unreadable_by_others(tmp_path: Path) -> None:
    """It holds every license code in full, whatever the umask."""
    path = tmp_path / "irm.db"
    store = await SqliteStore.open(path)
    await store.add_tenant("acme", "UTC", datetime.now(UTC))

    modes = _modes(tmp_path)
    await store.close()

    assert modes["irm.db"] == 0o640
    assert all(mode & 0o007 == 0 for mode in modes.values()), modes


async def test_an_unreadable_postgresql_url_is_refused_without_its_password() -> None:
    with pytest.raises(StoreError) as refused:
        await open_store("postgresql://irm:PG%zzSECRET 1@127.0.0.1:1/irm")

    assert "SECRET" not in str(refused.value)
    assert "percent-encode" in str(refused.value)


async def test_gateways_on_one_postgresql_share_one_unguessable_secret(
    postgres_url: str,
) -> None:
    first = await PostgresStore.open(postgres_url)
    second = await PostgresStore.open(postgres_url)
    try:
        secret = await first.share_secret()
        assert await second.share_secret() == secret
    finally:
        await first.close()
        await second.close()

    assert len(secret) == 32
    assert int(secret, 16) > 0


async def test_a_cancelled_activation_is_stored_audited_and_announced(
    store: Store,
) -> None:
    await store.add_tenant("T", "UTC", NOW)
    lic, code = mint(Kind.BASIC_1, NOW - timedelta(days=3))
    lic = replace(lic, tenant="T", imported_at=NOW)
    await store.add_licenses("T", [(lic, code)], NOW, "admin")
    at = NOW + timedelta(days=2, microseconds=123)
    scheduled = replace(lic, activation_at=at)
    await store.save_activations(
        "T", [scheduled], {lic.id: State.SCHEDULED}, NOW, "admin"
    )
    seq, _ = await store.changes_after(0)
    later = NOW + timedelta(hours=1)

    await store.cancel_activations("T", [scheduled], later, "admin")

    assert await store.licenses("T") == [replace(lic, tz="UTC")]
    assert await store.license_states("T") == {lic.id: State.AVAILABLE}
    entry = (await store.audit("T", "license", lic.id))[-1]
    assert (entry.event, entry.at, entry.actor) == (
        "activation_cancelled", later, "admin",
    )  # fmt: skip
    assert entry.detail == {
        "from": "scheduled",
        "to": "available",
        "activation_at": "2026-03-03T12:00:00.000123Z",
    }
    assert (await store.changes_after(seq))[1] == {"T"}
    again = replace(lic, activation_at=NOW + timedelta(days=5))
    await store.save_activations("T", [again], {lic.id: State.SCHEDULED}, NOW, "x")
    assert (await store.licenses("T"))[0].activation_at == again.activation_at


async def test_a_state_change_from_a_state_no_longer_stored_is_not_written(
    store: Store,
) -> None:
    """A gateway that has not yet heard of a cancelled activation fires it:
    the store keeps the tool's state and audits no activation."""
    await store.add_tenant("T", "UTC", NOW)
    lic, code = mint(Kind.BASIC_1, NOW - timedelta(days=3))
    lic = replace(lic, tenant="T", imported_at=NOW)
    await store.add_licenses("T", [(lic, code)], NOW, "admin")
    at = NOW + timedelta(seconds=10)
    scheduled = replace(lic, activation_at=at)
    await store.save_activations("T", [scheduled], {lic.id: State.SCHEDULED}, NOW, "a")
    await store.cancel_activations("T", [scheduled], NOW, "admin")

    fired = LicenseChanged("T", lic.id, State.SCHEDULED, State.ACTIVE, at)
    await store.apply([fired], at)

    assert await store.license_states("T") == {lic.id: State.AVAILABLE}
    events = [e.event for e in await store.audit("T", "license", lic.id)]
    assert events == ["imported", "activated", "activation_cancelled"]

    await store.save_activations("T", [scheduled], {lic.id: State.SCHEDULED}, NOW, "a")
    await store.apply([fired], at)

    assert await store.license_states("T") == {lic.id: State.ACTIVE}
    assert (await store.audit("T", "license", lic.id))[-1].event == "active"


async def test_cancelling_what_is_no_longer_scheduled_changes_nothing(
    store: Store,
) -> None:
    await store.add_tenant("T", "UTC", NOW)
    await store.add_tenant("U", "UTC", NOW)
    items = [mint(Kind.BASIC_1, NOW - timedelta(days=3)) for _ in range(3)]
    items = [(replace(lic, tenant="T", imported_at=NOW), c) for lic, c in items]
    await store.add_licenses("T", items, NOW, "admin")
    ok, went, never = (
        replace(lic, activation_at=NOW + timedelta(days=1)) for lic, _ in items
    )
    states = {ok.id: State.SCHEDULED, went.id: State.SCHEDULED}
    await store.save_activations("T", [ok, went], states, NOW, "admin")
    # The gateway passed the instant of ``went`` and recorded it active.
    await store.apply(
        [LicenseChanged("T", went.id, State.SCHEDULED, State.ACTIVE, NOW)], NOW
    )
    seq, _ = await store.changes_after(0)
    before = await store.audit("T")

    with pytest.raises(RuleViolation, match=f"license {went.id} is already active"):
        await store.cancel_activations("T", [ok, went], NOW, "admin")
    with pytest.raises(RuleViolation, match=f"license {never.id} changed meanwhile"):
        await store.cancel_activations("T", [ok, never], NOW, "admin")
    moved = replace(ok, activation_at=NOW + timedelta(days=2))
    with pytest.raises(RuleViolation, match=f"license {ok.id} changed meanwhile"):
        await store.cancel_activations("T", [moved], NOW, "admin")
    with pytest.raises(RuleViolation, match=f"license {ok.id} changed meanwhile"):
        await store.cancel_activations("U", [ok], NOW, "admin")

    assert await store.license_states("T") == {
        ok.id: State.SCHEDULED, went.id: State.ACTIVE, never.id: State.AVAILABLE,
    }  # fmt: skip
    assert {lic.id: lic.activation_at for lic in await store.licenses("T")} == {
        ok.id: ok.activation_at, went.id: went.activation_at, never.id: None,
    }  # fmt: skip
    assert await store.audit("T") == before
    assert await store.changes_after(seq) == (seq, set())
