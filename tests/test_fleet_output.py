"""irm-tool fleet's table and summary line, from hand-built reports, and
what it refuses before it reaches a broker: no broker."""

from __future__ import annotations

from io import StringIO
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from rich.console import Console

from gateway.protocol import Decision
from policy.admission import Cause, Reason
from policy.licenses import Tier
from tools.broker import free_port
from tools.cli import cli
from tools.fleet import FleetReport, _summary, _summary_line, _table

# The tests must not pick up a database, broker or accounts from the shell.
CLEAN_ENV: dict[str, str | None] = dict.fromkeys(
    (
        "IRM_DATABASE",
        "IRM_STORE",
        "IRM_NOW",
        "IRM_BROKER_HOST",
        "IRM_BROKER_PORT",
        "IRM_BROKER_PASSWORD_FILE",
        "IRM_BROKER_PID_FILE",
    )
)


def told(
    router: str,
    accepted: bool,
    *,
    reason: Reason | None = None,
    cause: Cause = Cause.HELLO,
    position: int | None = None,
    tier: Tier | None = Tier.FULL,
) -> Decision:
    return Decision(
        tenant="acme",
        router=router,
        session=f"s-{router}",
        epoch=1,
        decision="accept" if accepted else "reject",
        reason=reason or (Reason.LICENSED if accepted else Reason.CAPACITY_EXCEEDED),
        tier=tier,
        position=position,
        lease_seconds=60,
        cause=cause,
        at="2025-06-01T10:00:00Z",
    )


def rows(report: FleetReport) -> dict[str, str]:
    """Each router's line of the table as a 120-column terminal shows it."""
    out = StringIO()
    Console(file=out, width=120).print(_table(report, "acme"))
    lines = [line.rstrip() for line in out.getvalue().splitlines()]
    return {line.split()[0]: line for line in lines[3:]}


def held_fleet() -> FleetReport:
    """R01 seated; R02 in line until a seat is freed; R03 never answered."""
    return FleetReport(
        decisions={
            "R01": told("R01", True),
            "R02": told("R02", False, position=1),
        },
        latency={"R01": 0.0021, "R02": 0.0034},
        unanswered=["R03"],
        updates=[told("R02", True, cause=Cause.SEAT_FREED)],
        held=20.0,
    )


def test_a_router_admitted_during_the_hold_shows_both_answers() -> None:
    row = rows(held_fleet())["R02"].split()

    assert row[:6] == ["R02", "reject", "capacity_exceeded", "1", "full", "3.4"]
    assert " ".join(row[6:]) == "→ accept (seat_freed)"


def test_a_router_whose_answer_held_shows_it_once() -> None:
    row = rows(held_fleet())["R01"]

    assert row.split() == ["R01", "accept", "licensed", "full", "2.1"]
    assert "→" not in row


def test_a_router_that_never_answered_shows_no_reply() -> None:
    assert rows(held_fleet())["R03"].split() == ["R03", "no", "reply"]


def test_the_summary_counts_final_states_and_the_routers_that_changed() -> None:
    assert _summary_line(held_fleet()) == (
        "2 online, 0 offline, 1 unanswered; 1 changed during the hold"
    )


def test_a_move_up_the_line_is_not_a_change_but_a_lost_seat_is() -> None:
    report = FleetReport(
        decisions={
            "R01": told("R01", True),
            "R02": told("R02", False, position=2),
        },
        updates=[
            told("R02", False, position=1, cause=Cause.SEAT_FREED),
            told("R01", False, position=1, cause=Cause.CAPACITY),
        ],
        held=5.0,
    )

    shown = rows(report)

    assert "→" not in shown["R02"]
    assert shown["R01"].endswith("→ reject, capacity_exceeded (capacity)")
    assert _summary_line(report) == (
        "0 online, 2 offline (2 waiting in line); 1 changed during the hold"
    )


def test_a_tier_change_of_a_seated_router_names_the_new_tier() -> None:
    report = FleetReport(
        decisions={"R01": told("R01", True, tier=Tier.FREE)},
        updates=[told("R01", True, cause=Cause.CAPACITY, tier=Tier.FULL)],
        held=5.0,
    )

    assert rows(report)["R01"].endswith("→ accept, full tier (capacity)")


def test_without_a_hold_there_is_no_hold_column_and_no_hold_count() -> None:
    report = FleetReport(
        decisions={"R01": told("R01", True), "R02": told("R02", False)},
        latency={"R01": 0.002, "R02": 0.003},
    )

    out = StringIO()
    Console(file=out, width=120).print(_table(report, "acme"))

    assert "during hold" not in out.getvalue()
    assert _summary_line(report) == "1 online, 1 offline"


def test_the_json_summary_still_reports_the_final_decisions() -> None:
    summary = _summary(held_fleet())

    assert summary["online"] == ["R01", "R02"]
    assert summary["offline"] == []
    assert summary["unanswered"] == ["R03"]


# -- what the command refuses, before any broker --------------------------------


def fleet(*args: str, database: Path | None = None) -> Result:
    root = ["--database", str(database)] if database is not None else []
    return CliRunner(env=CLEAN_ENV).invoke(cli, [*root, "fleet", *args])


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--hold", "-5"),
        ("--hold", "nan"),
        ("--routers", "0"),
        ("--routers", "-3"),
        ("--processes", "0"),
        ("--connect-rate", "-1"),
        ("--duration", "0"),
        ("--duration", "inf"),
        ("--rate", "0"),
        ("--rate", "-100"),
        ("--churn", "-0.1"),
        ("--churn", "1.5"),
        ("--heartbeat", "0"),
        ("--timeout", "-1"),
        ("--port", "0"),
    ],
)
def test_a_negative_zero_or_endless_number_is_refused_naming_the_option(
    option: str, value: str
) -> None:
    result = fleet("--tenant", "acme", option, value)

    assert result.exit_code == 2
    assert f"Invalid value for '{option}'" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "mode", [[], ["--mode", "once"], ["--mode", "rate"], ["--mode", "storm"]]
)
def test_nothing_listening_is_named_by_host_and_port_in_every_mode(
    mode: list[str],
) -> None:
    port = free_port()

    result = fleet("--tenant", "acme", "--port", str(port), *mode)

    assert result.exit_code == 1
    assert result.stderr.startswith(
        f"irm-tool: no MQTT broker on 127.0.0.1:{port} (connection refused)"
    )
    assert "Traceback" not in result.output


def test_nothing_listening_makes_no_account(tmp_path: Path) -> None:
    port = free_port()

    result = fleet(
        "--tenant", "acme", "--port", str(port),
        "--password-file", str(tmp_path / "passwd"),
        "--pid-file", str(tmp_path / "mosquitto.pid"),
    )  # fmt: skip

    assert result.exit_code == 1
    assert f"no MQTT broker on 127.0.0.1:{port}" in result.stderr
    assert not (tmp_path / "passwd").exists()


def test_a_tenant_the_database_lacks_gets_no_accounts(tmp_path: Path) -> None:
    database = tmp_path / "irm.db"
    runner = CliRunner(env=CLEAN_ENV)
    added = runner.invoke(cli, ["--database", str(database), "tenant", "add", "acme"])
    assert added.exit_code == 0, added.output

    result = fleet(
        "--tenant", "nosuch", "--port", str(free_port()),
        "--password-file", str(tmp_path / "passwd"),
        "--pid-file", str(tmp_path / "mosquitto.pid"),
        database=database,
    )  # fmt: skip

    assert result.exit_code == 1
    assert f"irm-tool: unknown tenant 'nosuch' in {database}" in result.stderr
    assert "irm-tool tenant add nosuch" in result.stderr
    assert not (tmp_path / "passwd").exists()


def test_every_tenant_of_a_load_is_checked(tmp_path: Path) -> None:
    database = tmp_path / "irm.db"
    runner = CliRunner(env=CLEAN_ENV)
    runner.invoke(cli, ["--database", str(database), "tenant", "add", "acme"])

    result = fleet(
        "--tenant", "acme", "--tenant", "ghost", "--mode", "once",
        database=database,
    )  # fmt: skip

    assert result.exit_code == 1
    assert "unknown tenant 'ghost'" in result.stderr


def test_a_known_tenant_goes_on_to_the_broker(tmp_path: Path) -> None:
    database = tmp_path / "irm.db"
    runner = CliRunner(env=CLEAN_ENV)
    runner.invoke(cli, ["--database", str(database), "tenant", "add", "acme"])
    port = free_port()

    result = fleet("--tenant", "acme", "--port", str(port), database=database)

    assert result.exit_code == 1
    assert f"no MQTT broker on 127.0.0.1:{port}" in result.stderr


def test_without_a_database_the_fleet_may_name_any_tenant() -> None:
    """How the gateway's refusal of an unknown tenant is shown (and measured)."""
    port = free_port()

    result = fleet("--tenant", "nosuch", "--port", str(port))

    assert result.exit_code == 1
    assert f"no MQTT broker on 127.0.0.1:{port}" in result.stderr
