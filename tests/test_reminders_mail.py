"""Expiry reminders end to end on a virtual clock.

The sender (gateway/mail.py) runs against a real SQLite file and a real
SMTP server on loopback (aiosmtpd); only time is virtual: each pass is
handed its ``now``. Crashes and races run the sender as OS processes of
their own (tests/reminder_sender.py).
"""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.mail import HOLD, RETRY_CAP, Reminders, Smtp
from policy.licenses import Kind
from policy.reminders import STEPS, step_at
from policy.sqlite_store import SCHEMA, SqliteStore
from policy.timeutil import to_text
from tests.mailserver import MailServer, Received
from tests.seeding import mint, seed_licenses

ISSUED = datetime(2026, 1, 1, tzinfo=UTC)
START = datetime(2026, 1, 10, 9, 0, tzinfo=UTC)
EXPIRY = datetime(2027, 1, 10, 9, 0, tzinfo=UTC)
CONTACT = "ops@acme.example"


@pytest.fixture
def mail() -> Iterator[MailServer]:
    server = MailServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    opened = await SqliteStore.open(tmp_path / "irm.db")
    yield opened
    await opened.close()


def sender(
    store: SqliteStore, mail: MailServer, owner: str = "test", **smtp: object
) -> Reminders:
    config = Smtp("127.0.0.1", mail.port, "none", "reminders@irm.example")
    return Reminders(store, replace(config, **smtp), owner, random.Random(7))  # type: ignore[arg-type]


def hours(start: datetime, end: datetime, every: timedelta) -> Iterator[datetime]:
    moment = start
    while moment <= end:
        yield moment
        moment += every


def steps_of(received: Received) -> str:
    return str(received.message["Subject"])


async def test_the_five_reminders_of_one_license_go_out_on_their_days(
    store: SqliteStore, mail: MailServer
) -> None:
    (lic,) = await seed_licenses(store, "acme", [START], routers=3)
    run = sender(store, mail)

    sent_at = {}
    for now in hours(EXPIRY - timedelta(days=35), EXPIRY + timedelta(days=2),
                     timedelta(hours=1)):  # fmt: skip
        for m in (await run.run_once(now)).sent:
            sent_at[m.steps[0].days] = now

    assert sent_at == {days: step_at(lic, days) for days in STEPS}
    received = mail.messages()
    assert len(received) == 5
    assert [r.recipients for r in received] == [[CONTACT]] * 5
    for days, r in zip(STEPS, received, strict=True):
        assert f"in {days} days" in r.text
        assert "expires 2027-01-10 09:00 UTC" in r.text
        assert "capacity goes from 1 to 0 router(s)" in r.text
        assert "every router is rejected (3 registered now)" in r.text
    assert len({r.message["Message-ID"] for r in received}) == 5


async def test_no_reminder_a_microsecond_before_the_30_day_instant(
    store: SqliteStore, mail: MailServer
) -> None:
    await seed_licenses(store, "acme", [START])
    run = sender(store, mail)
    at = EXPIRY - timedelta(days=30)

    assert (await run.run_once(at - timedelta(microseconds=1))).claimed == []
    assert len((await run.run_once(at)).sent) == 1
    assert len(mail.messages()) == 1


async def test_licenses_due_together_go_in_one_mail_with_what_expiry_does(
    store: SqliteStore, mail: MailServer
) -> None:
    licenses = await seed_licenses(
        store, "acme", [START, START, START, START + timedelta(days=60)], routers=5
    )
    run = sender(store, mail)

    done = await run.run_once(EXPIRY - timedelta(days=30))

    assert len(done.sent) == 1
    (received,) = mail.messages()
    text = received.text
    for lic in licenses[:3]:
        assert lic.id in text
    assert licenses[3].id not in text
    assert "3 licenses of tenant acme expire from 2027-01-10 09:00 UTC" in steps_of(
        received
    )
    assert "capacity goes from 4 to 1 router(s)" in text
    assert "beyond the first 1 to connect, 4 will be rejected" in text
    fingerprints = await store.fingerprints([lic.id for lic in licenses[:3]])
    for label in fingerprints.values():
        assert f"(code {label})" in text
    assert "IRM1" not in text.replace("IRM1…", "")  # never a whole code


async def test_a_cloud_free_reminder_says_how_to_renew(
    store: SqliteStore, mail: MailServer
) -> None:
    await seed_licenses(store, "free", [START], kind=Kind.FREE)
    await sender(store, mail).run_once(EXPIRY - timedelta(days=2))

    (received,) = mail.messages()
    assert "How to renew Cloud Free" in received.text
    assert "irm-tool import --tenant free NEW-CODE" in received.text
    assert (
        "irm-tool activate --tenant free NEW-LICENSE-ID --at 2027-01-10T09:00:00Z"
        in received.text
    )


async def test_a_cloud_free_reminder_names_the_free_license_in_stock(
    store: SqliteStore, mail: MailServer
) -> None:
    await seed_licenses(store, "free", [START], kind=Kind.FREE)
    spare, code = mint(Kind.FREE, START)
    spare = replace(spare, tenant="free", imported_at=START)
    await store.add_licenses("free", [(spare, code)], START, "test")

    await sender(store, mail).run_once(EXPIRY - timedelta(days=2))

    (received,) = mail.messages()
    assert f"license {spare.id} is in stock" in received.text
    assert (
        f"irm-tool activate --tenant free {spare.id} --at 2027-01-10T09:00:00Z"
        in received.text
    )
    assert "NEW-CODE" not in received.text


async def test_after_downtime_only_the_latest_due_reminder_goes_out(
    store: SqliteStore, mail: MailServer
) -> None:
    await seed_licenses(store, "acme", [START])
    run = sender(store, mail)

    # Down from before the 30-day step until after the 16-day one.
    await run.run_once(EXPIRY - timedelta(days=14))
    await run.run_once(EXPIRY - timedelta(days=13))

    (received,) = mail.messages()
    assert "in 14 days" in received.text  # the 16-day step, two days late
    (recorded,) = await store.reminder_mails("acme")
    assert [s.days for s in recorded.steps] == [16]


async def test_a_restarted_sender_does_not_send_again(
    tmp_path: Path, store: SqliteStore, mail: MailServer
) -> None:
    await seed_licenses(store, "acme", [START])
    at = EXPIRY - timedelta(days=23)
    await sender(store, mail).run_once(at)

    again = await SqliteStore.open(tmp_path / "irm.db")
    try:
        for now in (at, at + HOLD, at + timedelta(days=1)):
            assert (await sender(again, mail).run_once(now)).sent == []
    finally:
        await again.close()
    assert len(mail.messages()) == 1


async def test_a_crash_between_acceptance_and_record_resends_the_same_message(
    tmp_path: Path, store: SqliteStore, mail: MailServer
) -> None:
    # The chosen behaviour: the store records one reminder; the mail server
    # receives the same bytes, same Message-ID, a second time.
    await seed_licenses(store, "acme", [START])
    at = EXPIRY - timedelta(days=9)

    crashed = subprocess.run(
        [sys.executable, "-m", "tests.reminder_sender", str(tmp_path / "irm.db"),
         str(mail.port), "doomed", "--crash-after-accept", to_text(at) or ""],
        capture_output=True, timeout=120, check=False,
    )  # fmt: skip

    assert crashed.returncode == -9
    (first,) = mail.messages()
    (held,) = await store.reminder_mails("acme")
    assert (held.state, held.attempts) == ("sending", 1)
    # While the dead sender's hold lasts, nobody sends it.
    assert (await sender(store, mail).run_once(at + HOLD / 2)).sent == []
    assert len(mail.messages()) == 1

    done = await sender(store, mail, owner="next").run_once(at + HOLD)

    assert len(done.sent) == 1
    second = mail.messages()[1]
    assert second.raw == first.raw
    assert second.message["Message-ID"] == first.message["Message-ID"]
    (recorded,) = await store.reminder_mails("acme")
    assert (recorded.state, recorded.attempts) == ("sent", 2)
    assert (await sender(store, mail).run_once(at + timedelta(days=1))).sent == []
    assert len(mail.messages()) == 2


async def test_a_mail_server_down_for_a_day_is_retried_with_capped_backoff(
    store: SqliteStore, mail: MailServer
) -> None:
    await seed_licenses(store, "acme", [START])
    run = sender(store, mail)
    down = EXPIRY - timedelta(days=16)
    mail.stop()

    for now in hours(down, down + timedelta(days=1), timedelta(minutes=5)):
        await run.run_once(now)

    (waiting,) = await store.reminder_mails("acme")
    assert waiting.state == "waiting"
    assert "127.0.0.1" in (waiting.last_error or "")
    # 30 s doubling to an hour, each cut by up to half: 20 to 50 in a day.
    assert 20 <= waiting.attempts <= 50
    back = down + timedelta(days=1, minutes=5)
    assert waiting.next_attempt_at - back <= RETRY_CAP

    mail.start()
    for now in hours(back, back + RETRY_CAP, timedelta(minutes=5)):
        await run.run_once(now)

    (received,) = mail.messages()
    assert "in 16 days" in received.text
    (sent,) = await store.reminder_mails("acme")
    assert sent.state == "sent"


async def test_a_refusing_server_is_retried_and_a_stale_mail_is_dropped(
    store: SqliteStore, mail: MailServer
) -> None:
    await seed_licenses(store, "acme", [START])
    run = sender(store, mail)
    mail.inbox.refusing = True

    # Refused from the 9-day step until the 2-day step came due.
    for now in hours(EXPIRY - timedelta(days=9), EXPIRY - timedelta(days=2, hours=1),
                     timedelta(hours=1)):  # fmt: skip
        assert (await run.run_once(now)).sent == []
    mail.inbox.refusing = False
    done = await run.run_once(EXPIRY - timedelta(days=2))

    (received,) = mail.messages()
    assert "in 2 days" in received.text
    assert [m.steps[0].days for m, _ in done.dropped] == [9]
    states = {m.steps[0].days: m.state for m in await store.reminder_mails("acme")}
    assert states == {9: "dropped", 2: "sent"}


async def test_a_tenant_without_contacts_claims_nothing_until_it_has_one(
    store: SqliteStore, mail: MailServer
) -> None:
    await seed_licenses(store, "acme", [START], contacts=())
    run = sender(store, mail)

    assert (await run.run_once(EXPIRY - timedelta(days=30))).claimed == []
    await store.add_contacts("acme", [CONTACT], ISSUED, "test")
    assert len((await run.run_once(EXPIRY - timedelta(days=29))).sent) == 1


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
async def test_credentials_are_given_to_a_server_that_asks_for_them(
    store: SqliteStore,
) -> None:
    server = MailServer(accounts={"irm": "s3cret"})
    server.start()
    try:
        await seed_licenses(store, "acme", [START])
        wrong = await sender(store, server, username="irm", password="nope").run_once(
            EXPIRY - timedelta(days=30)
        )
        assert wrong.failed
        assert "nope" not in wrong.failed[0][1]
        right = sender(store, server, username="irm", password="s3cret")
        done = await right.run_once(EXPIRY - timedelta(days=30), force=True)
        assert len(done.sent) == 1
    finally:
        server.stop()


async def test_two_sender_processes_on_one_store_send_each_reminder_once(
    tmp_path: Path, store: SqliteStore, mail: MailServer
) -> None:
    tenants = {f"t{i}": [START, START] for i in range(6)}
    for name, starts in tenants.items():
        await seed_licenses(store, name, starts)
    # Both walk the same minutes after each step: their clocks never differ
    # by as much as the hold (HOLD), as two hosts' clocks would not.
    instants = [
        to_text(EXPIRY - timedelta(days=days) + timedelta(minutes=m)) or ""
        for days in STEPS for m in range(7)
    ]  # fmt: skip
    go = tmp_path / "go"
    database = str(tmp_path / "irm.db")
    command = ["-m", "tests.reminder_sender", database, str(mail.port)]
    racers = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            *command,
            f"racer{n}",
            "--go",
            str(go),
            *instants,
            stdout=asyncio.subprocess.PIPE,
        )
        for n in (1, 2)
    ]
    go.touch()
    outputs = [await asyncio.wait_for(r.communicate(), 120) for r in racers]

    assert [r.returncode for r in racers] == [0, 0]
    sent_by = [
        sum(len(json.loads(line)["sent"]) for line in out.decode().splitlines())
        for out, _ in outputs
    ]
    received = mail.messages()
    assert sum(sent_by) == len(received) == len(tenants) * len(STEPS)
    ids = Counter(str(r.message["Message-ID"]) for r in received)
    assert set(ids.values()) == {1}
    for mails in [await store.reminder_mails(t) for t in tenants]:
        assert sorted(m.steps[0].days for m in mails) == sorted(STEPS)
        assert {m.state for m in mails} == {"sent"}
        assert all(len(m.steps) == 2 for m in mails)


async def test_a_database_of_the_first_schema_gains_contacts_and_reminders(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as old:
        old.executescript(SCHEMA[0])
        old.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
        old.execute("INSERT INTO meta VALUES ('schema', '1')")
    old.close()

    store = await SqliteStore.open(path, create=False)
    try:
        await store.add_tenant("acme", "UTC", ISSUED)
        await store.add_contacts("acme", [CONTACT], ISSUED, "test")
        assert await store.contacts("acme") == [CONTACT]
        assert await store.reminder_mails() == []
    finally:
        await store.close()


async def test_starttls_is_never_silently_dropped_for_a_plain_connection(
    store: SqliteStore, mail: MailServer
) -> None:
    await seed_licenses(store, "acme", [START])

    done = await sender(store, mail, tls="starttls").run_once(
        EXPIRY - timedelta(days=30)
    )

    ((_, error),) = done.failed
    assert "STARTTLS" in error
    assert mail.messages() == []
