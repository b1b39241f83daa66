"""Expiry reminders sent by the real ``irm-gateway`` and ``irm-tool``, in real time.

Each license here was activated almost a year ago, so its 2-day window is
already open: the gateway sends its reminder on its first pass.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from policy.sqlite_store import SqliteStore
from policy.timeutil import add_months
from tests.conftest import GatewayProcess, sim_router, tool, tool_json
from tests.mailserver import MailServer
from tests.seeding import seed_licenses
from tools.broker import Broker

pytestmark = [
    pytest.mark.broker,
    pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS"),
]
PASSWORD = "pa55-word-never-logged"


@pytest.fixture
def mail() -> Iterator[MailServer]:
    server = MailServer(accounts={"irm": PASSWORD})
    server.start()
    yield server
    server.stop()


def expiring_soon() -> datetime:
    """An activation whose 12-month term ends in a day from now."""
    return add_months(datetime.now(UTC), -12) + timedelta(days=1)


async def seed(database: Path, *tenants: str) -> None:
    store = await SqliteStore.open(database)
    try:
        for tenant in tenants:
            await seed_licenses(store, tenant, [expiring_soon()], routers=2)
    finally:
        await store.close()


def smtp_options(mail: MailServer) -> dict[str, object]:
    return {
        "smtp-host": "127.0.0.1",
        "smtp-port": mail.port,
        "smtp-tls": "none",
        "smtp-username": "irm",
        "smtp-password": PASSWORD,
        "smtp-from": "reminders@irm.example",
        "smtp-check-seconds": 1,
    }


def per_tenant(mail: MailServer) -> Counter[str]:
    return Counter(str(r.message["Subject"]).split(" tenant ")[1].split()[0]
                   for r in mail.messages())  # fmt: skip


async def test_the_gateway_sends_a_due_reminder_once_across_a_restart(
    broker: Broker, tmp_path: Path, mail: MailServer
) -> None:
    database = tmp_path / "irm.db"
    await seed(database, "acme")
    log = tmp_path / "gw.log"
    gateway = GatewayProcess(broker, database, log, **smtp_options(mail))
    await gateway.start()

    (received,) = await mail.until(1)
    assert received.recipients == ["ops@acme.example"]
    assert ", in 1 day\r\n" in received.text  # the 2-day step, opened a day ago
    assert gateway.stop() == 0

    await gateway.start()
    await seed(database, "later")  # proof that a whole pass ran after the restart
    await mail.until(2)

    assert per_tenant(mail) == {"acme": 1, "later": 1}
    assert PASSWORD not in gateway.log.read_text()
    sent = await gateway.until_logged("reminder sent", 2)
    assert [e["tenant"] for e in sent] == ["acme", "later"]


async def test_two_gateways_on_one_store_send_each_reminder_once(
    broker: Broker, tmp_path: Path, mail: MailServer
) -> None:
    # Each gateway has a broker of its own: two gateways deciding the same
    # routers on one SQLite file is not a supported setup, two sending
    # reminders from it is.
    second = Broker(tmp_path / "broker2")
    second.start()
    try:
        database = tmp_path / "irm.db"
        tenants = [f"t{i}" for i in range(6)]
        await seed(database, *tenants)
        gateways = [
            GatewayProcess(b, database, tmp_path / f"{gid}.log", **{
                **smtp_options(mail), "gateway-id": gid})
            for b, gid in ((broker, "gw1"), (second, "gw2"))
        ]  # fmt: skip
        await asyncio.gather(*(g.start() for g in gateways))

        await mail.until(len(tenants))
        await seed(database, "late")
        await mail.until(len(tenants) + 1)

        assert per_tenant(mail) == dict.fromkeys([*tenants, "late"], 1)
        ids = Counter(str(r.message["Message-ID"]) for r in mail.messages())
        assert set(ids.values()) == {1}
        for g in gateways:
            assert g.stop() == 0
    finally:
        second.stop()


async def test_a_mail_server_that_never_answers_does_not_hold_up_admission(
    broker: Broker, tmp_path: Path
) -> None:
    connected = asyncio.Event()
    release = asyncio.Event()

    async def silent(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connected.set()
        await release.wait()  # no greeting: the sender waits for its timeout
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        database = tmp_path / "irm.db"
        await seed(database, "acme")
        options = {**smtp_options(MailServer()), "smtp-port": port}
        gateway = GatewayProcess(broker, database, tmp_path / "gw.log", **options)
        await gateway.start()
        await asyncio.wait_for(connected.wait(), 20)

        router = sim_router(broker, "acme", "R01")
        await router.connect()
        decision, latency = await router.ask()

        assert (decision.decision, decision.reason) == ("accept", "licensed")
        assert latency < 2.0
        await router.disconnect()
        assert gateway.stop() == 0  # the stuck attempt does not hold up SIGTERM
    finally:
        release.set()
        server.close()
        await server.wait_closed()


async def test_the_tool_manages_contacts_and_shows_and_sends_reminders(
    tmp_path: Path, mail: MailServer
) -> None:
    database = tmp_path / "irm.db"
    await seed(database, "acme")
    smtp = [
        "--smtp-host", "127.0.0.1", "--smtp-port", str(mail.port),
        "--smtp-tls", "none", "--smtp-username", "irm", "--smtp-password", PASSWORD,
    ]  # fmt: skip

    bad = tool(database, "contacts", "add", "--tenant", "acme", "not-an-address")
    assert bad.returncode == 1
    assert "contact address 'not-an-address' is not an e-mail address" in bad.stderr
    added = tool(database, "contacts", "add", "--tenant", "acme", "Boss@Acme.example")
    assert added.returncode == 0, added.stderr
    listed = tool_json(database, "contacts", "list", "--tenant", "acme")
    assert listed["contacts"] == ["Boss@acme.example", "ops@acme.example"]
    gone = tool(database, "contacts", "remove", "--tenant", "acme", "x@acme.example")
    assert gone.returncode == 1
    assert "x@acme.example: not a contact of tenant acme" in gone.stderr

    (shown,) = tool_json(database, "reminders", "--tenant", "acme")["tenants"]
    assert [d["days"] for d in shown["due"]] == [2]
    assert shown["mails"] == []

    sent = tool(database, "reminders", "send", *smtp)
    assert sent.returncode == 0, sent.stderr
    assert "sent" in sent.stdout
    (received,) = await mail.until(1)
    assert sorted(received.recipients) == ["Boss@acme.example", "ops@acme.example"]
    again = tool(database, "reminders", "send", *smtp)
    assert again.stdout.strip() == "nothing due"

    (shown,) = tool_json(database, "reminders", "--tenant", "acme")["tenants"]
    assert shown["due"] == []
    assert [(m["state"], m["claimed_by"]) for m in shown["mails"]] == [
        ("sent", "admin")
    ]
    table = tool(database, "reminders", "--tenant", "acme")
    assert "sent" in table.stdout


async def test_the_tool_says_a_mail_was_not_sent_when_the_server_is_down(
    tmp_path: Path,
) -> None:
    database = tmp_path / "irm.db"
    await seed(database, "acme")
    port = MailServer().port  # never started: nothing listens there

    down = tool(database, "reminders", "send", "--smtp-host", "127.0.0.1",
                "--smtp-port", str(port), "--smtp-tls", "none")  # fmt: skip

    assert down.returncode == 1
    assert "1 mail(s) not sent, to be retried" in down.stderr
    (shown,) = tool_json(database, "reminders", "--tenant", "acme")["tenants"]
    assert [(m["state"], m["attempts"]) for m in shown["mails"]] == [("waiting", 1)]
