"""irm-tool on PostgreSQL: --store, and moving a tenant out of SQLite."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

from policy.admission import Joined, Place
from policy.postgres_store import PostgresStore
from policy.sqlite_store import SqliteStore
from policy.store import ReminderMail, ReminderStep
from tests.conftest import BIN
from tests.seeding import add_available, seed_tenant

NOW = datetime(2026, 3, 1, 12, tzinfo=UTC)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IRM_")}
    return subprocess.run(
        [str(BIN / "irm-tool"), *args],
        capture_output=True, text=True, check=False, timeout=120, env=env,
    )  # fmt: skip


def ok(*args: str) -> Any:
    result = run(*args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _seat(db: Path, places: list[tuple[str, int, bool]]) -> None:
    """Put routers of T in line as a gateway would: (router, arrival, seated)."""

    async def write() -> None:
        store = await SqliteStore.open(db)
        events = [
            Joined(Place("T", r, f"s-{r}", 2, arrival, seated, NOW), False)
            for r, arrival, seated in places
        ]
        await store.apply(events, NOW)
        await store.close()

    asyncio.run(write())


def test_move_tenant_copies_licenses_routers_in_order_and_audit(
    tmp_path: Path, postgres_url: str
) -> None:
    db = tmp_path / "irm.db"
    asyncio.run(seed_tenant(db, "T", basic1=2))
    asyncio.run(add_available(db, "T", 1))
    _seat(db, [("R3", 7, False), ("R1", 5, True), ("R2", 6, True)])
    before = ok("--database", str(db), "tenant", "show", "T")

    moved = ok("--database", str(db), "move-tenant", "T", "--to", postgres_url)

    assert moved["licenses"] == 3
    assert moved["in_line"] == 3
    after = ok("--store", postgres_url, "tenant", "show", "T")
    assert after["licenses"] == before["licenses"]
    routers = ok("--store", postgres_url, "routers", "--tenant", "T")
    assert [(r["router"], r["state"]) for r in routers["routers"]] == [
        ("R1", "online"),
        ("R2", "online"),
        ("R3", "waiting"),
    ]
    with psycopg.connect(postgres_url) as pg:
        codes = pg.execute("SELECT count(*) FROM licenses WHERE code <> ''").fetchone()
        events = [r[0] for r in pg.execute("SELECT event FROM audit ORDER BY seq")]
        tenant = pg.execute("SELECT next_arrival, seats FROM tenants").fetchone()
    assert codes == (3,)
    assert events[0] == "created"
    assert events[-1] == "moved"
    assert tenant == (8, 2)


def _remembered(db: Path) -> ReminderMail:
    """Give T a contact and one sent reminder mail, as the gateway would."""
    mail = ReminderMail(
        mail="m-30", tenant="T", state="waiting", recipients=("ops@t.example",),
        message=b"Subject: expiry\r\n\r\nsoon\r\n", claimed_at=NOW,
        claimed_by="gateway gw1", attempts=0, next_attempt_at=NOW, sent_at=None,
        last_error=None, steps=(ReminderStep("L1", 30, NOW, NOW + timedelta(30)),),
    )  # fmt: skip

    async def write() -> None:
        store = await SqliteStore.open(db)
        await store.add_contacts("T", ["ops@t.example"], NOW, "admin")
        assert await store.claim_reminder(mail)
        held = NOW + timedelta(minutes=10)
        taken = await store.take_reminder("m-30", NOW, held, "gateway gw1", force=True)
        assert taken is not None
        await store.reminder_sent("m-30", NOW)
        await store.close()

    asyncio.run(write())
    return mail


def test_a_moved_tenant_keeps_its_contacts_and_sends_no_reminder_twice(
    tmp_path: Path, postgres_url: str
) -> None:
    db = tmp_path / "irm.db"
    asyncio.run(seed_tenant(db, "T", basic1=1))
    mail = _remembered(db)

    ok("--database", str(db), "move-tenant", "T", "--to", postgres_url)

    async def read() -> tuple[list[str], list[ReminderMail], bool]:
        store = await PostgresStore.open(postgres_url)
        try:
            again = replace(mail, mail="m-30-again", claimed_at=NOW + timedelta(1))
            return (
                await store.contacts("T"),
                await store.reminder_mails("T"),
                await store.claim_reminder(again),
            )
        finally:
            await store.close()

    contacts, mails, claimed_again = asyncio.run(read())
    assert contacts == ["ops@t.example"]
    assert [(m.mail, m.state, m.steps) for m in mails] == [("m-30", "sent", mail.steps)]
    assert claimed_again is False


def test_moving_a_tenant_the_destination_has_is_refused_and_changes_nothing(
    tmp_path: Path, postgres_url: str
) -> None:
    db = tmp_path / "irm.db"
    asyncio.run(seed_tenant(db, "T", basic1=1))
    ok("--database", str(db), "move-tenant", "T", "--to", postgres_url)
    asyncio.run(add_available(db, "T", 2))

    again = run("--database", str(db), "move-tenant", "T", "--to", postgres_url)

    assert again.returncode == 1
    assert "tenant T exists at the destination; nothing was moved" in again.stderr
    shown = ok("--store", postgres_url, "licenses", "--tenant", "T")
    assert len(shown["licenses"]) == 1


def test_moving_an_unknown_tenant_or_to_a_file_is_refused(
    tmp_path: Path, postgres_url: str
) -> None:
    db = tmp_path / "irm.db"
    asyncio.run(seed_tenant(db, "T", basic1=1))

    unknown = run("--database", str(db), "move-tenant", "X", "--to", postgres_url)
    not_postgres = run("--database", str(db), "move-tenant", "T", "--to", "x.db")

    assert unknown.returncode == 1
    assert "tenant X does not exist" in unknown.stderr
    assert not_postgres.returncode == 2
    assert "'x.db' must be a postgresql:// URL" in not_postgres.stderr


def test_the_tool_adds_and_lists_tenants_in_postgresql(postgres_url: str) -> None:
    added = run("--store", postgres_url, "tenant", "add", "T", "--tz", "Europe/Berlin")
    assert added.returncode == 0, added.stderr
    listed = ok("--store", postgres_url, "tenant", "list")
    assert [t["tenant"] for t in listed["tenants"]] == ["T"]
