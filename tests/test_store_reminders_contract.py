"""Contacts and expiry reminders, held alike by SQLite and PostgreSQL.

The same behaviour tests run on both backends (the ``store`` fixture of
the store contract); the races run on PostgreSQL, where several gateways
share one database: two stores of their own connection each claim or
take at once, while a third connection holds a lock so that both are
inside their transactions before either can commit.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import datetime, timedelta

import psycopg

from policy.codes import fingerprint
from policy.licenses import Kind
from policy.postgres_store import MIGRATIONS, Conn, PostgresStore, connect
from policy.store import ReminderMail, ReminderStep, Store
from policy.stores import open_store
from tests import test_store_contract
from tests.seeding import mint
from tests.test_store_contract import NOW

store = test_store_contract.store
"""A store of each backend, fresh per test: the store contract's own fixture."""
EXPIRY = NOW + timedelta(days=30)
HOLD = timedelta(minutes=10)
WAIT = 10.0
"""Seconds a race waits for its transactions to queue on the held lock."""


def _claim(
    mail: str,
    steps: list[tuple[str, int]],
    *,
    tenant: str = "T",
    at: datetime = NOW,
    expiry: datetime = EXPIRY,
) -> ReminderMail:
    return ReminderMail(
        mail=mail,
        tenant=tenant,
        state="waiting",
        recipients=("ops@acme.example", "Boss@acme.example"),
        message=b"Subject: licenses\r\n\r\nbytes as composed \xff\x00\r\n",
        claimed_at=at,
        claimed_by="gw-1",
        attempts=0,
        next_attempt_at=at,
        sent_at=None,
        last_error=None,
        steps=tuple(
            ReminderStep(lic, days, expiry - timedelta(days=days), expiry)
            for lic, days in steps
        ),
    )


async def _with_tenants(store: Store, *tenants: str) -> Store:
    for tenant in tenants:
        await store.add_tenant(tenant, "UTC", NOW)
    return store


async def test_contacts_are_added_once_listed_in_byte_order_and_removed(
    store: Store,
) -> None:
    await _with_tenants(store, "T", "U")
    added = await store.add_contacts("T", ["ops@x", "Zed@x", "ops@x"], NOW, "admin")
    assert added == ["ops@x", "Zed@x"]
    assert await store.add_contacts("T", ["amy@x", "ops@x"], NOW, "admin") == ["amy@x"]
    assert await store.contacts("T") == ["Zed@x", "amy@x", "ops@x"]
    assert await store.contacts("U") == []

    assert await store.remove_contacts("T", ["ops@x", "nobody@x"], NOW, "bob") == [
        "ops@x"
    ]
    assert await store.remove_contacts("T", ["ops@x"], NOW, "bob") == []
    assert await store.contacts("T") == ["Zed@x", "amy@x"]
    logged = [(e.event, e.detail, e.actor) for e in await store.audit("T", "tenant")]
    assert logged[1:] == [
        ("contact_added", {"address": "ops@x"}, "admin"),
        ("contact_added", {"address": "Zed@x"}, "admin"),
        ("contact_added", {"address": "amy@x"}, "admin"),
        ("contact_removed", {"address": "ops@x"}, "bob"),
    ]


async def test_a_step_is_claimed_once_and_never_after_a_later_one(
    store: Store,
) -> None:
    await _with_tenants(store, "T")
    assert await store.claim_reminder(_claim("m30", [("L1", 30)]))
    assert not await store.claim_reminder(_claim("m30", [("L1", 30)]))
    # Another mail carrying the claimed step is refused whole: L2 stays free.
    assert not await store.claim_reminder(_claim("m30b", [("L1", 30), ("L2", 30)]))
    assert await store.reminder_steps("T") == {"L1": 30}

    assert await store.claim_reminder(_claim("m23", [("L1", 23), ("L2", 23)]))
    assert not await store.claim_reminder(_claim("late", [("L2", 30)]))
    assert await store.reminder_steps("T") == {"L1": 23, "L2": 23}
    assert await store.reminder_steps("U") == {}
    assert [m.mail for m in await store.reminder_mails()] == ["m23", "m30"]


async def test_claimed_mails_come_back_whole_oldest_claim_first(
    store: Store,
) -> None:
    await _with_tenants(store, "T", "U")
    soon = NOW + timedelta(days=9)
    mixed = replace(
        _claim("m-c", [("lic-a", 23), ("Lic-B", 23)]),
        steps=(
            ReminderStep("lic-a", 23, EXPIRY - timedelta(days=23), EXPIRY),
            ReminderStep("Lic-B", 23, EXPIRY - timedelta(days=23), EXPIRY),
            ReminderStep("zz", 2, soon - timedelta(days=2), soon),
        ),
    )
    later = _claim("m-b", [("X", 30)], at=NOW + timedelta(seconds=2))
    same_time = _claim("m-a", [("Y", 30)])
    other = _claim("m-u", [("Z", 30)], tenant="U", at=NOW + timedelta(seconds=1))
    for claim in (mixed, later, same_time, other):
        assert await store.claim_reminder(claim)

    mails = await store.reminder_mails("T")
    assert [m.mail for m in mails] == ["m-a", "m-c", "m-b"]
    assert mails[1] == replace(mixed, steps=(mixed.steps[2], *mixed.steps[1::-1]))
    assert mails[0] == same_time
    assert [m.mail for m in await store.reminder_mails()] == [
        "m-a", "m-c", "m-u", "m-b"
    ]  # fmt: skip
    assert await store.reminder_mails("U") == [other]


async def test_an_attempt_holds_the_mail_and_a_retry_waits_unless_forced(
    store: Store,
) -> None:
    await _with_tenants(store, "T")
    claim = _claim("m", [("L1", 30)])
    await store.claim_reminder(claim)
    early = NOW - timedelta(seconds=1)
    assert (
        await store.take_reminder("m", early, early + HOLD, "gw-1", force=False) is None
    )

    taken = await store.take_reminder("m", NOW, NOW + HOLD, "gw-1", force=False)
    expected = replace(claim, state="sending", attempts=1, next_attempt_at=NOW + HOLD)
    assert taken == expected
    assert await store.reminder_mails(open_only=True) == [expected]
    held = NOW + timedelta(minutes=1)
    assert await store.take_reminder("m", held, held + HOLD, "gw-2", force=True) is None

    # Past the hold its sender is taken to have died: another attempt starts.
    dead = NOW + HOLD
    again = await store.take_reminder("m", dead, dead + HOLD, "gw-2", force=False)
    assert again is not None
    assert (again.state, again.attempts, again.claimed_by) == ("sending", 2, "gw-2")

    retry_at = dead + timedelta(minutes=5)
    await store.reminder_failed("m", dead, retry_at, "550 refused")
    (failed,) = await store.reminder_mails("T", open_only=True)
    assert (failed.state, failed.next_attempt_at, failed.last_error) == (
        "waiting", retry_at, "550 refused"
    )  # fmt: skip
    soon = dead + timedelta(minutes=1)
    assert (
        await store.take_reminder("m", soon, soon + HOLD, "gw-1", force=False) is None
    )
    forced = await store.take_reminder("m", soon, soon + HOLD, "gw-1", force=True)
    assert forced is not None
    assert (forced.attempts, forced.last_error) == (3, "550 refused")
    assert await store.take_reminder("nothing", soon, soon, "gw-1", force=True) is None


async def test_a_sent_mail_is_audited_once_and_stays_sent(store: Store) -> None:
    await _with_tenants(store, "T")
    await store.claim_reminder(_claim("m", [("L2", 30), ("L1", 30)]))
    await store.take_reminder("m", NOW, NOW + HOLD, "gw-2", force=False)
    await store.reminder_failed("m", NOW, NOW, "timeout")
    await store.take_reminder("m", NOW, NOW + HOLD, "gw-2", force=False)
    sent_at = NOW + timedelta(seconds=3)
    await store.reminder_sent("m", sent_at)

    (sent,) = await store.reminder_mails()
    assert (sent.state, sent.sent_at, sent.last_error, sent.attempts) == (
        "sent", sent_at, None, 2
    )  # fmt: skip
    assert await store.reminder_mails(open_only=True) == []
    later = sent_at + 2 * HOLD
    assert await store.take_reminder("m", later, later, "gw-1", force=True) is None
    await store.reminder_failed("m", later, later, "late error")
    await store.reminder_dropped("m", later, "late drop")
    assert await store.reminder_mails() == [sent]

    to = ["ops@acme.example", "Boss@acme.example"]
    logged = [
        (e.at, e.subject_id, e.event, e.detail, e.actor)
        for e in await store.audit("T", "license")
    ]
    assert sorted(logged) == [
        (sent_at, lic, "reminder_sent", {"days": 30, "mail": "m", "to": to}, "gw-2")
        for lic in ("L1", "L2")
    ]


async def test_a_dropped_mail_keeps_its_claim_and_is_closed(store: Store) -> None:
    await _with_tenants(store, "T")
    await store.claim_reminder(_claim("m", [("L1", 30)]))
    await store.take_reminder("m", NOW, NOW + HOLD, "gw-1", force=False)
    gone = NOW + timedelta(days=7)
    await store.reminder_dropped("m", gone, "overtaken")

    (dropped,) = await store.reminder_mails("T")
    assert (dropped.state, dropped.last_error, dropped.next_attempt_at) == (
        "dropped", "overtaken", gone
    )  # fmt: skip
    assert dropped.sent_at is None
    assert await store.reminder_mails(open_only=True) == []
    assert await store.take_reminder("m", gone, gone, "gw-1", force=True) is None
    assert await store.reminder_steps("T") == {"L1": 30}
    assert not await store.claim_reminder(_claim("again", [("L1", 30)]))
    assert await store.audit("T", "license") == []


async def test_fingerprints_name_stored_licenses_only(store: Store) -> None:
    await _with_tenants(store, "T")
    items = [mint(k, NOW - timedelta(days=1)) for k in (Kind.BASIC_1, Kind.FREE)]
    items = [(replace(lic, tenant="T", imported_at=NOW), c) for lic, c in items]
    await store.add_licenses("T", items, NOW, "admin")
    ids = [lic.id for lic, _ in items]
    assert await store.fingerprints([ids[1], "missing", ids[0]]) == {
        ids[1]: fingerprint(items[1][1]),
        ids[0]: fingerprint(items[0][1]),
    }


# -- several gateways on one PostgreSQL --------------------------------------------


async def _until_waiting(watch: Conn, count: int) -> None:
    """Poll until ``count`` transactions of this database wait on a lock."""
    deadline = asyncio.get_running_loop().time() + WAIT
    while True:
        cursor = await watch.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock'"
        )
        row = await cursor.fetchone()
        if row is not None and row[0] >= count:
            return
        assert asyncio.get_running_loop().time() < deadline, f"{row} waiting"
        await asyncio.sleep(0.01)


async def _two_gateways(url: str) -> tuple[PostgresStore, PostgresStore, Conn]:
    one = await PostgresStore.open(url)
    two = await PostgresStore.open(url)
    await _with_tenants(one, "T")
    return one, two, await connect(url)


async def test_two_gateways_claiming_one_step_at_once_make_one_claim(
    postgres_url: str,
) -> None:
    one, two, watch = await _two_gateways(postgres_url)
    blocker = await connect(postgres_url)
    try:
        # A gateway's batch holds the tenant: both claims queue inside their
        # transactions, the first having read that nothing is claimed.
        async with blocker.transaction():
            await blocker.execute("SELECT 1 FROM tenants WHERE tenant = 'T' FOR UPDATE")
            first = asyncio.create_task(one.claim_reminder(_claim("a", [("L1", 30)])))
            await _until_waiting(watch, 1)
            both = _claim("b", [("L2", 30), ("L1", 30)])
            second = asyncio.create_task(two.claim_reminder(both))
            await _until_waiting(watch, 2)
        assert list(await asyncio.gather(first, second)) == [True, False]
        assert [m.mail for m in await two.reminder_mails()] == ["a"]
        assert await one.reminder_steps("T") == {"L1": 30}
    finally:
        for closing in (one, two, watch, blocker):
            await closing.close()


async def test_a_later_step_claimed_first_refuses_an_earlier_one_racing_it(
    postgres_url: str,
) -> None:
    one, two, watch = await _two_gateways(postgres_url)
    blocker = await connect(postgres_url)
    try:
        async with blocker.transaction():
            await blocker.execute("SELECT 1 FROM tenants WHERE tenant = 'T' FOR UPDATE")
            later = asyncio.create_task(one.claim_reminder(_claim("a", [("L1", 23)])))
            await _until_waiting(watch, 1)
            earlier = asyncio.create_task(two.claim_reminder(_claim("b", [("L1", 30)])))
            await _until_waiting(watch, 2)
        # The keys differ, (L1, 23) and (L1, 30): only the claim's lock on
        # L1 makes the second read the first's step, as SQLite's one writer.
        assert list(await asyncio.gather(later, earlier)) == [True, False]
        assert await two.reminder_steps("T") == {"L1": 23}
    finally:
        for closing in (one, two, watch, blocker):
            await closing.close()


async def test_two_gateways_taking_one_mail_at_once_make_one_attempt(
    postgres_url: str,
) -> None:
    one, two, watch = await _two_gateways(postgres_url)
    blocker = await connect(postgres_url)
    try:
        await one.claim_reminder(_claim("m", [("L1", 30)]))
        async with blocker.transaction():
            await blocker.execute(
                "SELECT 1 FROM reminder_mails WHERE mail = 'm' FOR UPDATE"
            )
            takes = [
                asyncio.create_task(
                    s.take_reminder("m", NOW, NOW + HOLD, name, force=True)
                )
                for s, name in ((one, "gw-1"), (two, "gw-2"))
            ]
            await _until_waiting(watch, 2)
        taken = [t for t in await asyncio.gather(*takes) if t is not None]
        assert len(taken) == 1
        (stored,) = await one.reminder_mails()
        assert stored == taken[0]
        assert stored.attempts == 1
    finally:
        for closing in (one, two, watch, blocker):
            await closing.close()


async def test_a_database_of_the_first_schema_migrates_and_keeps_its_rows(
    postgres_url: str,
) -> None:
    with psycopg.connect(postgres_url, autocommit=True) as db:
        db.execute(MIGRATIONS[0].encode())
        db.execute("CREATE TABLE schema_version (version integer NOT NULL)")
        db.execute("INSERT INTO schema_version VALUES (1)")
        db.execute("INSERT INTO tenants (tenant, tz, created_at) VALUES (%s, %s, %s)",
                   ("T", "UTC", NOW))  # fmt: skip

    opened = await open_store(postgres_url)
    try:
        assert [t.id for t in await opened.tenants()] == ["T"]
        assert await opened.add_contacts("T", ["ops@x"], NOW, "admin") == ["ops@x"]
        assert await opened.claim_reminder(_claim("m", [("L1", 30)]))
    finally:
        await opened.close()
    with psycopg.connect(postgres_url, autocommit=True) as db:
        versions = db.execute("SELECT version FROM schema_version ORDER BY 1")
        assert versions.fetchall() == [(n,) for n in range(1, len(MIGRATIONS) + 1)]
