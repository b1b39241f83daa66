"""irm-tool in process: a temporary SQLite file, codes minted with the demo key."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.cells import cell_len

from policy.admission import Joined, Place
from policy.codes import CodePayload, fingerprint, mint
from policy.csvimport import write_sales_csv
from policy.licenses import Kind
from policy.sqlite_store import SqliteStore
from tools import keys
from tools.cli import cli

DEMO_KEY = keys.load_private_key(keys.DEMO_PRIVATE_KEY_PATH)
NOW = "2025-06-01T10:00:00Z"
ISSUED = datetime(2025, 1, 10, tzinfo=UTC)  # stock limit 2027-01-10T00:00:00Z
# The tests must not pick up a database, key, clock or width from the shell.
CLEAN_ENV: dict[str, str | None] = dict.fromkeys(
    (
        "IRM_DATABASE",
        "IRM_VENDOR_PUBLIC_KEY",
        "IRM_VENDOR_PRIVATE_KEY",
        "IRM_NOW",
        "COLUMNS",
    )
)
CAPACITY = {Kind.BASIC_1: 1, Kind.BASIC_25: 25, Kind.FREE: 1000}


def payload(
    lid: str,
    kind: Kind = Kind.BASIC_1,
    term_months: int = 12,
    issued: datetime = ISSUED,
) -> CodePayload:
    return CodePayload(lid, kind, CAPACITY[kind], term_months, issued)


def code(
    lid: str,
    kind: Kind = Kind.BASIC_1,
    term_months: int = 12,
    key: Ed25519PrivateKey = DEMO_KEY,
    issued: datetime = ISSUED,
) -> str:
    return mint(key, payload(lid, kind, term_months, issued))


class Tool:
    """irm-tool against one database, at ``NOW`` unless told otherwise."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.runner = CliRunner(env=CLEAN_ENV)

    def run(self, *args: str, now: str = NOW, stdin: str | None = None) -> Result:
        argv = ["--database", str(self.db), "--now", now, *args]
        return self.runner.invoke(cli, argv, input=stdin, catch_exceptions=False)

    def ok(self, *args: str, now: str = NOW, stdin: str | None = None) -> Result:
        result = self.run(*args, now=now, stdin=stdin)
        assert result.exit_code == 0, result.output
        return result

    def fails(self, *args: str, now: str = NOW) -> Result:
        result = self.run(*args, now=now)
        assert result.exit_code == 1, result.output
        said = [line for line in result.stderr.splitlines() if "DEMO" not in line]
        assert said[0].startswith("irm-tool: "), result.stderr
        return result

    def screen(self, *args: str, columns: int = 100, now: str = NOW) -> list[str]:
        """The lines a terminal ``columns`` wide shows."""
        runner = CliRunner(env={**CLEAN_ENV, "COLUMNS": str(columns)})
        argv = ["--database", str(self.db), "--now", now, *args]
        result = runner.invoke(cli, argv, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return [line.rstrip() for line in result.stdout.splitlines()]

    def json(self, *args: str, now: str = NOW) -> Any:
        return json.loads(self.ok(*args, "--json", now=now).stdout)

    def licenses(self, tenant: str = "acme", now: str = NOW) -> dict[str, Any]:
        found = self.json("licenses", "--tenant", tenant, now=now)["licenses"]
        return {lic["id"]: lic for lic in found}

    def add(self, tenant: str, *codes: str) -> None:
        for one in codes:
            self.ok("import", "--tenant", tenant, one)


@pytest.fixture
def tool(tmp_path: Path) -> Tool:
    """A tool whose database holds tenant acme, in Europe/Berlin."""
    made = Tool(tmp_path / "irm.db")
    made.ok("tenant", "add", "acme", "--tz", "Europe/Berlin")
    return made


# -- import ----------------------------------------------------------------------


def test_importing_one_code_adds_an_available_license_without_echoing_the_code(
    tool: Tool,
) -> None:
    one = code("L1", Kind.BASIC_25)

    result = tool.ok("import", "--tenant", "acme", one)

    assert "imported license L1" in result.stdout
    assert fingerprint(one) in result.stdout
    assert one not in result.output
    assert "using the DEMO vendor key" in result.stderr
    lic = tool.licenses()["L1"]
    assert (lic["state"], lic["kind"], lic["capacity"]) == (
        "available",
        "cloud-basic-25",
        25,
    )
    assert lic["activation_at"] is None
    assert lic["stock_limit"] == "2027-01-10T00:00:00Z"


def test_importing_a_code_from_stdin_with_dash_works_like_an_argument(
    tool: Tool,
) -> None:
    tool.ok("import", "--tenant", "acme", "-", stdin=code("L1") + "\n")

    assert list(tool.licenses()) == ["L1"]


def test_importing_a_code_again_says_already_present_and_succeeds(tool: Tool) -> None:
    one = code("L1")
    tool.add("acme", one)

    result = tool.ok("import", "--tenant", "acme", one)

    assert "license L1 is already present in tenant acme" in result.stdout
    assert list(tool.licenses()) == ["L1"]
    imported = tool.json("audit", "--tenant", "acme", "--license", "L1")["entries"]
    assert [entry["event"] for entry in imported] == ["imported"]


def test_a_code_redeemed_in_one_tenant_is_refused_in_another(tool: Tool) -> None:
    one = code("L1")
    tool.add("acme", one)
    tool.ok("tenant", "add", "other")

    result = tool.fails("import", "--tenant", "other", one)

    assert "license L1 is already redeemed in another tenant" in result.stderr
    assert tool.licenses("other") == {}


def test_a_forged_code_is_refused(tool: Tool) -> None:
    forged = code("L1", key=Ed25519PrivateKey.generate())

    result = tool.fails("import", "--tenant", "acme", forged)

    assert "does not match the vendor key" in result.stderr
    assert forged not in result.output
    assert tool.licenses() == {}


def test_a_code_past_its_stock_limit_is_refused_as_non_redeemable(tool: Tool) -> None:
    result = tool.fails("import", "--tenant", "acme", code("L1"), now="2027-01-10")

    assert "non-redeemable" in result.stderr


def test_a_german_bom_semicolon_crlf_csv_imports_like_the_plain_one(
    tool: Tool, tmp_path: Path
) -> None:
    kinds = {"L1": Kind.BASIC_1, "L2": Kind.BASIC_25, "L3": Kind.FREE}
    minted = [(payload(lid, kind), code(lid, kind)) for lid, kind in kinds.items()]
    plain, german = tmp_path / "plain.csv", tmp_path / "german.csv"
    plain.write_bytes(write_sales_csv(minted))
    german.write_bytes(write_sales_csv(minted, german=True))
    assert german.read_bytes().startswith(b"\xef\xbb\xbfLizenz-ID;")
    assert b"\r\n" in german.read_bytes()
    second = Tool(tmp_path / "second.db")
    second.ok("tenant", "add", "acme", "--tz", "Europe/Berlin")

    from_plain = tool.json("import", "--tenant", "acme", "--csv", str(plain))
    from_german = second.json("import", "--tenant", "acme", "--csv", str(german))

    assert from_german == from_plain
    assert [row["license"] for row in from_plain["new"]] == ["L1", "L2", "L3"]
    assert second.licenses() == tool.licenses()


def test_a_csv_with_bad_rows_lists_every_bad_line_and_stores_nothing(
    tool: Tool, tmp_path: Path
) -> None:
    rows = [
        "license_id,kind,code",
        f"L1,Cloud Basic 1,{code('L1')}",
        f"L2,Cloud Basic 1,{code('L2', key=Ed25519PrivateKey.generate())}",
        f"L3,Cloud Basic 1,{code('L3', Kind.BASIC_25)}",
        f"L1,Cloud Basic 1,{code('L1')}",
        f"L5,Cloud Basic 1,{code('L5')}",
    ]
    path = tmp_path / "sales.csv"
    path.write_text("\n".join(rows) + "\n")

    result = tool.fails("import", "--tenant", "acme", "--csv", str(path))

    assert "3 bad row(s), nothing imported" in result.stderr
    bad = [line for line in result.stderr.splitlines() if "line " in line]
    assert [line.split(":")[0].strip() for line in bad] == [
        "line 3",
        "line 4",
        "line 5",
    ]
    assert "signature does not match" in bad[0]
    assert "Cloud Basic 25" in bad[1]
    assert "repeats line 2" in bad[2]
    assert tool.licenses() == {}


def test_an_empty_code_hides_no_other_bad_row_of_a_csv(
    tool: Tool, tmp_path: Path
) -> None:
    """The tester's file: the empty code at line 7 was all it reported."""
    good = code("L1")
    head, body, signature = code("L2").split(".")
    altered = f"{head}.{body[:-2]}{'A' if body[-2] != 'A' else 'B'}{body[-1]}"
    rows = [
        "license_id;kind;code",
        f"L1;Cloud Basic 1;{good}",
        f"L2;Cloud Basic 1;{code('L2', key=Ed25519PrivateKey.generate())}",
        f"L1;Cloud Basic 1;{good}",
        "L4;Cloud Basic 1;not-a-code",
        f"L2;Cloud Basic 1;{altered}.{signature}",
        "L6;Cloud Basic 1;",
        f"L7;Cloud Basic 1;{code('L7')[:50]}",
        f"L8;Cloud Basic 1;{code('L8', Kind.BASIC_25)}",
        f"L9;Cloud;Basic 1;{code('L9')}",
        f"L10;Cloud Basic 1;{code('L10')}",
    ]
    path = tmp_path / "sales.csv"
    path.write_text("\r\n".join(rows) + "\r\n")

    result = tool.fails("import", "--tenant", "acme", "--csv", str(path))

    assert "8 bad row(s), nothing imported" in result.stderr
    bad = [line.strip() for line in result.stderr.splitlines() if "  line " in line]
    assert [line.split(":")[0] for line in bad] == [f"line {n}" for n in range(3, 11)]
    assert "forged or was altered" in bad[0]
    assert "repeats line 2" in bad[1]
    assert "not a code of this product" in bad[2]
    assert "forged or was altered" in bad[3]
    assert "the license code is empty" in bad[4]
    assert "damaged" in bad[5]
    assert "Cloud Basic 25" in bad[6]
    assert "has 4 fields where the header has 3" in bad[7]
    assert "line 11" not in result.stderr  # L10 is good
    assert tool.licenses() == {}


def test_a_pipe_delimited_csv_is_refused_naming_the_delimiters(
    tool: Tool, tmp_path: Path
) -> None:
    path = tmp_path / "sales.csv"
    path.write_text(f"code|kind\n{code('L1')}|Cloud Basic 1\n")

    result = tool.fails("import", "--tenant", "acme", "--csv", str(path))

    assert "line 1: the first line is neither a header" in result.stderr
    assert "',', ';' and tab" in result.stderr
    assert "'|'" in result.stderr
    assert tool.licenses() == {}


def test_a_csv_larger_than_any_sales_file_is_refused_unread(
    tool: Tool, tmp_path: Path
) -> None:
    path = tmp_path / "huge.csv"
    with path.open("wb") as out:  # sparse: nothing is written
        out.truncate(200 * 1024 * 1024)

    result = tool.fails("import", "--tenant", "acme", "--csv", str(path))

    assert "the file is 200.0 MiB, larger than the 64 MiB" in result.stderr
    assert tool.licenses() == {}


def test_the_import_help_names_the_file_limits() -> None:
    result = CliRunner(env=CLEAN_ENV).invoke(cli, ["import", "--help"])

    said = " ".join(result.stdout.split())
    assert "at most 64 MiB and 10,000 characters a line" in said


def test_a_dry_run_reports_the_import_and_writes_nothing(
    tool: Tool, tmp_path: Path
) -> None:
    path = tmp_path / "sales.csv"
    path.write_bytes(write_sales_csv([(payload("L1"), code("L1"))]))

    from_file = tool.ok("import", "--tenant", "acme", "--csv", str(path), "--dry-run")
    one = tool.ok("import", "--tenant", "acme", code("L2"), "--dry-run")

    assert "line 2: would import license L1" in from_file.stdout
    assert "dry run, nothing written: 1 would be imported" in from_file.stdout
    assert "would import license L2" in one.stdout
    assert tool.licenses() == {}
    entries = tool.json("audit", "--tenant", "acme")["entries"]
    assert [entry["event"] for entry in entries] == ["created"]


# -- activate --------------------------------------------------------------------


def test_activating_now_makes_a_license_active_until_its_term_ends(tool: Tool) -> None:
    tool.add("acme", code("L1"))

    result = tool.ok("activate", "--tenant", "acme", "L1")

    assert "tenant acme: 1 license(s) activated" in result.stdout
    assert "L1" in result.stdout
    assert "active" in result.stdout
    lic = tool.licenses()["L1"]
    assert lic["state"] == "active"
    assert lic["activation_at"] == NOW
    assert lic["expires_at"] == "2026-06-01T10:00:00Z"


def test_activating_at_a_bare_date_schedules_midnight_in_the_tenant_zone(
    tool: Tool,
) -> None:
    tool.add("acme", code("L1"))

    said = tool.ok("activate", "--tenant", "acme", "L1", "--at", "2025-12-01")

    lic = tool.licenses()["L1"]
    assert "tenant acme: 1 license(s) scheduled" in said.stdout
    assert lic["state"] == "scheduled"
    assert lic["activation_at"] == "2025-11-30T23:00:00Z"  # midnight CET
    assert lic["expires_at"] == "2026-11-30T23:00:00Z"
    assert tool.licenses(now="2025-11-30T22:59:59Z")["L1"]["state"] == "scheduled"
    assert tool.licenses(now="2025-11-30T23:00:00Z")["L1"]["state"] == "active"


def test_activation_past_the_stock_limit_is_refused_saying_what_that_is(
    tool: Tool,
) -> None:
    tool.add("acme", code("L1"))

    result = tool.fails("activate", "--tenant", "acme", "L1", "--at", "2027-01-11")

    said = " ".join(result.stderr.split())
    assert "stock limit 2027-01-10T00:00:00Z of license L1" in said
    assert "must become active within 24 months (2 years) of its issue date" in said
    assert "license L1 was issued 2025-01-10T00:00:00Z" in said
    assert tool.licenses()["L1"]["state"] == "available"


def test_a_license_past_its_stock_limit_says_when_it_passed(tool: Tool) -> None:
    tool.add("acme", code("L1"))

    result = tool.fails("activate", "--tenant", "acme", "L1", now="2027-02-01")

    said = " ".join(result.stderr.split())
    assert "license L1 is non-redeemable" in said
    assert "within 24 months (2 years) of its issue date" in said
    assert "stock limit passed at 2027-01-10T00:00:00Z" in said


@pytest.mark.parametrize(
    ("at", "said"),
    [
        (
            "2026-03-29T02:30",
            "'2026-03-29T02:30' does not exist in time zone Europe/Berlin: the "
            "clocks go forward that day",
        ),
        (
            "2026-10-25T02:30",
            "'2026-10-25T02:30' is ambiguous in time zone Europe/Berlin: the "
            "clocks go back that day",
        ),
    ],
    ids=["skipped-in-spring", "repeated-in-autumn"],
)
def test_a_wall_time_the_clock_change_skips_or_repeats_is_refused(
    tool: Tool, at: str, said: str
) -> None:
    tool.add("acme", code("L1"))

    result = tool.fails("activate", "--tenant", "acme", "L1", "--at", at)

    message = " ".join(result.stderr.split())
    assert said in message
    assert "without an offset is read in the tenant's time zone" in message
    assert tool.licenses()["L1"]["state"] == "available"


@pytest.mark.parametrize(
    ("at", "activation"),
    [
        ("2026-03-29T02:30+01:00", "2026-03-29T01:30:00Z"),
        ("2026-10-25T02:30+02:00", "2026-10-25T00:30:00Z"),
        ("2026-10-25T02:30+01:00", "2026-10-25T01:30:00Z"),
        ("2026-10-25T03:30", "2026-10-25T02:30:00Z"),
    ],
)
def test_with_an_offset_such_a_time_names_one_instant(
    tool: Tool, at: str, activation: str
) -> None:
    tool.add("acme", code("L1"))

    tool.ok("activate", "--tenant", "acme", "L1", "--at", at)

    assert tool.licenses()["L1"]["activation_at"] == activation


@pytest.mark.parametrize(
    ("at", "said"),
    [
        (
            "2026-02-30",
            "'2026-02-30' is not a valid date: day 30 is out of range for "
            "February 2026, which has 28 days",
        ),
        ("2026-02-30T10:00", "'2026-02-30T10:00' is not a valid date: day 30"),
        ("2026-13-01", "month 13 is out of range (1 to 12)"),
        ("next week", "'next week' is not an ISO 8601 date (YYYY-MM-DD)"),
    ],
)
def test_a_date_not_in_the_calendar_is_named_as_such(
    tool: Tool, at: str, said: str
) -> None:
    tool.add("acme", code("L1"))

    result = tool.fails("activate", "--tenant", "acme", "L1", "--at", at)

    assert said in " ".join(result.stderr.split())


def test_now_gets_the_same_calendar_check() -> None:
    result = CliRunner(env=CLEAN_ENV).invoke(
        cli, ["--now", "2026-02-30", "tenant", "list"]
    )

    assert result.exit_code == 2
    assert "day 30 is out of range for February 2026" in result.stderr


def test_the_activate_help_says_a_time_without_offset_is_the_tenant_zone() -> None:
    result = CliRunner(env=CLEAN_ENV).invoke(cli, ["activate", "--help"])

    said = " ".join(result.stdout.split())
    assert "without an offset (Z or +01:00) is read in the tenant's time zone" in said
    assert "skipped or repeated there" in said


# -- --now -------------------------------------------------------------------------

WARNING = "acting as of 2025-06-01T10:00:00Z (--now/IRM_NOW), not the real time"


def test_now_is_warned_of_by_every_command_that_changes_the_store(
    tmp_path: Path,
) -> None:
    tool = Tool(tmp_path / "irm.db")
    csv_path = tmp_path / "sales.csv"
    csv_path.write_bytes(write_sales_csv([(payload("L2"), code("L2"))]))

    changes = [
        tool.ok("tenant", "add", "acme"),
        tool.ok("import", "--tenant", "acme", code("L1")),
        tool.ok("import", "--tenant", "acme", "--csv", str(csv_path)),
        tool.ok("activate", "--tenant", "acme", "L1"),
        tool.ok("routers", "register", "--tenant", "acme", "R1"),
        tool.ok("contacts", "add", "--tenant", "acme", "ops@acme.example"),
    ]
    reads = [
        tool.ok("licenses", "--tenant", "acme"),
        tool.ok("tenant", "show", "acme"),
        tool.ok("import", "--tenant", "acme", code("L3"), "--dry-run"),
    ]

    for result in changes:
        assert result.stderr.count(WARNING) == 1, result.stderr
    for result in reads:
        assert WARNING not in result.stderr


def test_now_from_the_environment_is_warned_of_too(tmp_path: Path) -> None:
    runner = CliRunner(env={**CLEAN_ENV, "IRM_NOW": "2025-06-01T10:00:00Z"})

    result = runner.invoke(
        cli, ["--database", str(tmp_path / "irm.db"), "tenant", "add", "acme"]
    )

    assert result.exit_code == 0, result.output
    assert WARNING in result.stderr


def test_without_now_nothing_is_said_about_the_time(tmp_path: Path) -> None:
    runner = CliRunner(env=CLEAN_ENV)

    result = runner.invoke(
        cli, ["--database", str(tmp_path / "irm.db"), "tenant", "add", "acme"]
    )

    assert result.exit_code == 0, result.output
    assert "acting as of" not in result.stderr


def test_an_activation_before_the_issue_date_is_refused(tool: Tool) -> None:
    """Issued 2026-12-04, activated with --now 2000-01-01: it expired at once."""
    issued = datetime(2026, 12, 4, 9, 30, tzinfo=UTC)
    tool.add("acme", code("L1", issued=issued))

    result = tool.fails("activate", "--tenant", "acme", "L1", now="2000-01-01")

    said = " ".join(result.stderr.split())
    assert (
        "activation instant 2000-01-01T00:00:00Z is before the issue date "
        "2026-12-04 of license L1 (issued 2026-12-04T09:30:00Z)"
    ) in said
    assert "cannot become active before the day it was issued" in said
    assert tool.licenses()["L1"]["state"] == "available"
    tool.ok("activate", "--tenant", "acme", "L1", now="2026-12-04T00:00:00Z")
    assert tool.licenses()["L1"]["activation_at"] == "2026-12-04T00:00:00Z"


def test_codes_minted_with_now_are_issued_then_and_activate_then(
    tmp_path: Path,
) -> None:
    """scripts/demo: licenses activated 13 months ago, with --now."""
    tool = Tool(tmp_path / "irm.db")
    tool.ok("tenant", "add", "acme")
    minted = tool.ok(
        "vendor", "mint", "--kind", "cloud-basic-1", now="2024-05-01T08:00:00Z"
    )
    assert "codes are issued then" in minted.stderr
    tool.ok(
        "import", "--tenant", "acme", minted.stdout.strip(), now="2024-05-01T09:00:00Z"
    )
    (lid,) = tool.licenses()
    tool.ok("activate", "--tenant", "acme", lid, now="2024-05-01T09:00:00Z")

    lic = tool.licenses(now="2025-06-01T10:00:00Z")[lid]
    assert lic["issued_at"] == "2024-05-01T08:00:00Z"
    assert lic["state"] == "expired"


def test_activation_on_the_stock_limit_date_is_allowed_before_it_in_utc(
    tool: Tool,
) -> None:
    # 2027-01-10 in Berlin starts at 2027-01-09T23:00Z, before the limit.
    tool.add("acme", code("L1"))

    tool.ok("activate", "--tenant", "acme", "L1", "--at", "2027-01-10")

    assert tool.licenses()["L1"]["activation_at"] == "2027-01-09T23:00:00Z"


def test_activating_a_license_that_is_not_available_is_refused(tool: Tool) -> None:
    tool.add("acme", code("L1"))
    tool.ok("activate", "--tenant", "acme", "L1")

    result = tool.fails("activate", "--tenant", "acme", "L1")

    assert "license L1 is active; only available licenses" in result.stderr


def test_one_refused_license_refuses_the_whole_activation(tool: Tool) -> None:
    tool.add("acme", code("L1"), code("L2"))
    tool.ok("activate", "--tenant", "acme", "L2")

    result = tool.fails("activate", "--tenant", "acme", "L1", "L2")

    assert "license L2" in result.stderr
    assert tool.licenses()["L1"]["state"] == "available"


def test_activating_a_license_the_tenant_does_not_have_is_refused(tool: Tool) -> None:
    result = tool.fails("activate", "--tenant", "acme", "nope")

    assert "tenant acme has no license nope" in result.stderr


def test_all_available_activates_every_available_license(tool: Tool) -> None:
    tool.add("acme", code("L1"), code("L2"), code("L3", Kind.BASIC_25))

    tool.ok("activate", "--tenant", "acme", "--all-available")

    assert {lic["state"] for lic in tool.licenses().values()} == {"active"}
    shown = tool.json("tenant", "show", "acme")
    assert shown["capacity"] == {"seats": 27, "tier": "full"}


def test_a_paid_activation_warns_and_invalidates_the_cloud_free_license(
    tool: Tool,
) -> None:
    tool.add("acme", code("F1", Kind.FREE), code("F2", Kind.FREE))
    tool.add("acme", code("P1"), code("P2"))
    tool.ok("activate", "--tenant", "acme", "F1")

    later = tool.ok("activate", "--tenant", "acme", "P1", "--at", "2025-09-01")
    free = tool.licenses()["F1"]
    now = tool.json("activate", "--tenant", "acme", "P2")

    assert "Cloud Free license F1 becomes invalid for good" in later.stdout
    assert "2025-09-01 00:00 CEST" in later.stdout
    assert (free["state"], free["invalidated_at"]) == ("active", "2025-08-31T22:00:00Z")
    # The unused F2 ends too: every Cloud Free license of the tenant does.
    assert now["invalidates"] == [
        {"license": "F1", "at": NOW},
        {"license": "F2", "at": NOW},
    ]
    assert tool.licenses()["F1"]["state"] == "invalidated"
    refused = tool.fails("activate", "--tenant", "acme", "F2", "--at", "2026-07-01")
    assert "never combined with paid licenses" in refused.stderr


# -- listing ---------------------------------------------------------------------


def test_licenses_state_filter_finds_a_license_that_expired_by_time(
    tool: Tool,
) -> None:
    past = "2025-01-15T09:00:00Z"
    tool.ok("import", "--tenant", "acme", code("L1", term_months=1), now=past)
    tool.ok("import", "--tenant", "acme", code("L2"), now=past)
    tool.ok("activate", "--tenant", "acme", "L1", now=past)

    expired = tool.json("licenses", "--tenant", "acme", "--state", "expired")
    available = tool.json("licenses", "--tenant", "acme", "--state", "available")

    assert [lic["id"] for lic in expired["licenses"]] == ["L1"]
    assert expired["licenses"][0]["expires_at"] == "2025-02-15T09:00:00Z"
    assert [lic["id"] for lic in available["licenses"]] == ["L2"]


def _seat(db: Path, places: list[tuple[str, int, bool]]) -> None:
    """Put routers in line as the gateway would: (router, arrival, seated)."""

    async def write() -> None:
        store = await SqliteStore.open(db)
        lease = datetime(2025, 6, 1, 10, 5, tzinfo=UTC)
        events = [
            Joined(
                Place("acme", router, f"s-{router}", 3, arrival, seated, lease), False
            )
            for router, arrival, seated in places
        ]
        await store.apply(events, datetime(2025, 6, 1, 10, 1, tzinfo=UTC))
        await store.close()

    asyncio.run(write())


def test_routers_json_lists_each_router_with_its_place_in_line(tool: Tool) -> None:
    registered = tool.ok("routers", "register", "--tenant", "acme", "R01", "R02")
    tool.ok("routers", "--tenant", "acme", "register", "R03", "R04", "R01")
    _seat(tool.db, [("R03", 7, False), ("R01", 5, True), ("R02", 6, False)])

    listed = tool.json("routers", "--tenant", "acme")
    table = tool.ok("routers", "--tenant", "acme")

    assert "registered 2 router(s): R01 R02" in registered.stdout
    assert listed["tenant"] == "acme"
    by_name = {r["router"]: r for r in listed["routers"]}
    assert by_name["R01"] == {
        "router": "R01",
        "state": "online",
        "online": True,
        "position": None,
        "epoch": 3,
        "since": "2025-06-01T10:01:00Z",
    }
    assert [(r["router"], r["state"], r["position"]) for r in listed["routers"]] == [
        ("R01", "online", None),
        ("R02", "waiting", 1),
        ("R03", "waiting", 2),
        ("R04", "offline", None),
    ]
    assert by_name["R04"]["epoch"] == 0
    assert "1 online, 3 offline (2 waiting in line)" in table.stdout


def test_audit_json_shows_imports_and_activations_by_admin(tool: Tool) -> None:
    tool.add("acme", code("L1"), code("L2"))
    tool.ok("activate", "--tenant", "acme", "L1", "--at", "2025-07-01")

    everything = tool.json("audit", "--tenant", "acme")["entries"]
    one = tool.json("audit", "--tenant", "acme", "--license", "L1")["entries"]
    latest = tool.json("audit", "--tenant", "acme", "--limit", "1")["entries"]

    events = [(e["subject_id"], e["event"], e["actor"]) for e in everything]
    assert events == [
        ("acme", "created", "admin"),
        ("L1", "imported", "admin"),
        ("L2", "imported", "admin"),
        ("L1", "activated", "admin"),
    ]
    assert [e["event"] for e in one] == ["imported", "activated"]
    assert one[1]["detail"]["activation_at"] == "2025-06-30T22:00:00Z"
    assert one[1]["at"] == NOW
    assert latest == everything[-1:]


def test_tenant_show_json_gives_capacity_now_and_over_the_coming_year(
    tool: Tool,
) -> None:
    tool.add("acme", code("B25", Kind.BASIC_25), code("B1"), code("B1b"))
    tool.ok("activate", "--tenant", "acme", "B25")
    tool.ok("activate", "--tenant", "acme", "B1", "--at", "2025-09-01")
    tool.ok("routers", "register", "--tenant", "acme", "R01")

    shown = tool.json("tenant", "show", "acme")

    assert shown["capacity"] == {"seats": 25, "tier": "full"}
    timeline = {point["at"]: point for point in shown["timeline"]}
    assert timeline[NOW]["seats"] == 25
    assert timeline["2025-06-30T22:00:00Z"] == {
        "at": "2025-06-30T22:00:00Z",
        "seats": 25,
        "tier": "full",
        "changes": [],
    }
    change = timeline["2025-08-31T22:00:00Z"]
    assert change["seats"] == 26
    assert change["changes"] == [{"license": "B1", "from": "scheduled", "to": "active"}]
    assert timeline["2026-06-01T10:00:00Z"]["seats"] == 1  # B25 expires
    month_starts = [
        at for at in timeline if at.endswith("T22:00:00Z") or at.endswith("T23:00:00Z")
    ]
    assert len(month_starts) == 12
    assert shown["next_event"] == change
    assert [lic["id"] for lic in shown["licenses"]["active"]] == ["B25"]
    assert [lic["id"] for lic in shown["licenses"]["scheduled"]] == ["B1"]
    assert [lic["id"] for lic in shown["licenses"]["available"]] == ["B1b"]
    assert shown["routers"] == {"online": 0, "waiting": 0, "offline": 1}


# -- tenant show and licenses on a terminal --------------------------------------


def _timeline(lines: list[str]) -> list[str]:
    """The rows of tenant show's capacity table, below its title and header."""
    start = next(i for i, line in enumerate(lines) if line.startswith("capacity, next"))
    return lines[start + 3 :]


def _line(lines: list[str], start: str) -> str:
    return next(line for line in lines if line.startswith(start))


def test_tenant_show_lists_now_then_only_the_instants_where_something_changes(
    tool: Tool,
) -> None:
    tool.add("acme", code("B25", Kind.BASIC_25), code("B1"))
    tool.ok("activate", "--tenant", "acme", "B25")
    tool.ok("activate", "--tenant", "acme", "B1", "--at", "2025-09-01")

    rows = _timeline(tool.screen("tenant", "show", "acme"))

    assert [row.split()[:4] for row in rows] == [
        ["2025-06-01", "12:00", "25", "full"],
        ["2025-09-01", "00:00", "26", "full"],
        ["2026-06-01", "12:00", "1", "full"],
    ]
    assert rows[1].endswith("1 × Cloud Basic 1 becomes active")
    assert rows[2].endswith("1 × Cloud Basic 25 expires")


def test_tenant_show_counts_changes_by_kind_instead_of_listing_ids(
    tool: Tool,
) -> None:
    ids = [f"{n:032x}" for n in range(3)]
    tool.add("acme", *(code(lid) for lid in ids))
    tool.ok("activate", "--tenant", "acme", *ids, "--at", "2025-09-01")

    lines = tool.screen("tenant", "show", "acme")

    assert _line(lines, "next change:") == (
        "next change: 2025-09-01 00:00 CEST: 3 × Cloud Basic 1 become active"
    )
    assert _timeline(lines)[1].endswith("3 × Cloud Basic 1 become active")
    assert not any(lid in row for lid in ids for row in _timeline(lines))


def test_tenant_show_says_when_a_paid_license_invalidates_cloud_free(
    tool: Tool,
) -> None:
    tool.add("acme", code("F1", Kind.FREE), code("P1"))
    tool.ok("activate", "--tenant", "acme", "F1")
    tool.ok("activate", "--tenant", "acme", "P1", "--at", "2025-07-01")

    lines = tool.screen("tenant", "show", "acme")

    both = "1 × Cloud Basic 1 becomes active, 1 × Cloud Free invalidated"
    assert _line(lines, "next change:").endswith(f"CEST: {both}")
    assert _timeline(lines)[1].split()[:4] == ["2025-07-01", "00:00", "1", "full"]
    assert _timeline(lines)[1].endswith(both)


def test_times_show_seconds_only_when_two_shown_instants_share_a_minute(
    tool: Tool,
) -> None:
    tool.add("acme", code("B1"), code("B2"))
    tool.ok("activate", "--tenant", "acme", "B1", "--at", "2025-09-01T00:00:00")
    minutes = tool.screen("tenant", "show", "acme")
    tool.ok("activate", "--tenant", "acme", "B2", "--at", "2025-09-01T00:00:30")

    seconds = tool.screen("tenant", "show", "acme")

    assert not any(re.search(r"\d\d:\d\d:\d\d", line) for line in minutes)
    assert [row.split()[:3] for row in _timeline(seconds)[1:3]] == [
        ["2025-09-01", "00:00:00", "1"],
        ["2025-09-01", "00:00:30", "2"],
    ]
    assert "created 2025-06-01 12:00:00 CEST" in seconds[0]


def test_tenant_show_without_changes_ahead_says_so_in_one_line(tool: Tool) -> None:
    lines = tool.screen("tenant", "show", "acme")

    assert "next change: none" in lines
    assert "capacity, next 12 months: no change" in lines


def _crowded(tool: Tool) -> list[str]:
    """A tenant with a license in every state, two of them in the same minute."""
    lids = {name: name.lower().rjust(32, "0") for name in ("OLD", "F", "P", "A", "B")}
    old = code(lids["OLD"], issued=datetime(2023, 6, 20, tzinfo=UTC))
    tool.add("acme", old, code(lids["F"], Kind.FREE), code(lids["P"]), code("C"))
    tool.add("acme", code(lids["A"], Kind.BASIC_25), code(lids["B"], Kind.BASIC_25))
    tool.ok("activate", "--tenant", "acme", lids["F"])
    tool.ok("activate", "--tenant", "acme", lids["P"], "--at", "2025-06-15")
    tool.ok("activate", "--tenant", "acme", lids["B"], "--at", "2025-09-01T00:00:00")
    tool.ok("activate", "--tenant", "acme", "C", "--at", "2025-09-01T00:00:30")
    return list(lids.values())


def test_tenant_show_and_licenses_fit_100_columns_with_every_id_whole(
    tool: Tool,
) -> None:
    ids = _crowded(tool)

    shown = tool.screen("tenant", "show", "acme", now="2025-07-01T10:00:00Z")
    listed = tool.screen("licenses", "--tenant", "acme", now="2025-07-01T10:00:00Z")

    for lines in (shown, listed):
        assert max(cell_len(line) for line in lines) <= 100, "\n".join(lines)
        assert all(any(lid in line for line in lines) for lid in ids)
        assert "non-redeemable (1)" in lines
        assert "invalidated (1)" in lines
        assert any("2025-09-01 00:00:30" in line for line in lines)


def test_licenses_shows_the_stock_limit_only_as_an_available_license_deadline(
    tool: Tool,
) -> None:
    tool.add("acme", code("L1"), code("L2", Kind.BASIC_25))
    tool.ok("activate", "--tenant", "acme", "L1")

    lines = tool.screen("licenses", "--tenant", "acme")

    assert lines[2:] == [
        "available (1)",
        "  L2           Basic 25  by 2027-01-10 01:00  -",
        "active (1)",
        "  L1           Basic 1   2025-06-01 12:00     2026-06-01 12:00",
        "2 license(s), times in Europe/Berlin",
    ]


def test_tenant_list_shows_each_tenant_with_its_seats_now(tool: Tool) -> None:
    tool.ok("tenant", "add", "beta")
    tool.add("acme", code("L1"))
    tool.ok("activate", "--tenant", "acme", "L1")

    listed = tool.json("tenant", "list")["tenants"]

    assert [(t["tenant"], t["tz"], t["seats"]) for t in listed] == [
        ("acme", "Europe/Berlin", 1),
        ("beta", "UTC", 0),
    ]


def test_tenant_add_refuses_an_unknown_time_zone(tool: Tool) -> None:
    result = tool.fails("tenant", "add", "beta", "--tz", "Mars/Olympus")

    assert "'Mars/Olympus' is not an IANA zone name" in result.stderr


def test_commands_on_an_unknown_tenant_are_refused(tool: Tool) -> None:
    result = tool.fails("licenses", "--tenant", "nobody")

    assert "unknown tenant 'nobody'" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["import", "--tenant", "acme"],
        ["activate", "--tenant", "acme"],
        ["routers"],
        ["audit", "--tenant", "acme", "--license", "L1", "--router", "R1"],
        ["vendor", "mint", "--kind", "cloud-basic-1", "--capacity", "5"],
        ["vendor", "mint", "--kind", "cloud-free", "--german"],
        ["--now", "yesterday-ish", "tenant", "list"],
    ],
)
def test_usage_errors_exit_with_status_2(tool: Tool, args: list[str]) -> None:
    result = tool.runner.invoke(cli, ["--database", str(tool.db), *args])

    assert result.exit_code == 2, result.output


# -- vendor ----------------------------------------------------------------------


def test_vendor_mint_prints_one_code_per_line(tool: Tool) -> None:
    result = tool.ok(
        "vendor", "mint", "--kind", "cloud-free", "--count", "2", "--capacity", "50"
    )

    minted = result.stdout.splitlines()
    assert len(minted) == 2
    assert all(line.startswith("IRM1.") for line in minted)
    assert "using the DEMO vendor key" in result.stderr
    tool.add("acme", *minted)
    assert {lic["capacity"] for lic in tool.licenses().values()} == {50}


@pytest.mark.parametrize("german", [False, True])
def test_a_minted_sales_csv_imports_into_a_tenant(
    tool: Tool, tmp_path: Path, german: bool
) -> None:
    out = tmp_path / "sales.csv"
    flags = ["--german"] if german else []
    batch = ["--kind", "cloud-basic-25", "--count", "3", "--issued", "2025-01-10"]
    tool.ok("vendor", "mint", *batch, "--csv", str(out), *flags)

    tool.ok("import", "--tenant", "acme", "--csv", str(out))

    licenses = tool.licenses().values()
    assert len(licenses) == 3
    assert {(lic["kind"], lic["issued_at"]) for lic in licenses} == {
        ("cloud-basic-25", "2025-01-10T00:00:00Z")
    }
    again = tool.fails("vendor", "mint", "--kind", "cloud-basic-1", "--csv", str(out))
    assert "refusing to overwrite" in again.stderr


def test_codes_minted_with_a_new_vendor_key_verify_only_with_its_public_key(
    tool: Tool, tmp_path: Path
) -> None:
    private, public = tmp_path / "vendor.pem", tmp_path / "vendor.pub.pem"
    tool.ok("vendor", "keygen", "--private", str(private), "--public", str(public))
    minted = tool.ok("vendor", "mint", "--kind", "cloud-basic-1", "--key", str(private))
    own = minted.stdout.strip()

    accepted = tool.ok("--vendor-key", str(public), "import", "--tenant", "acme", own)
    demo = tool.fails(
        "--vendor-key", str(public), "import", "--tenant", "acme", code("L9")
    )

    assert "DEMO" not in minted.stderr + accepted.stderr
    assert "does not match the vendor key" in demo.stderr
    assert len(tool.licenses()) == 1


def test_an_encrypted_vendor_key_asks_for_its_password(
    tool: Tool, tmp_path: Path
) -> None:
    private, public = tmp_path / "vendor.pem", tmp_path / "vendor.pub.pem"
    keygen = ["vendor", "keygen", "--private", str(private), "--public", str(public)]
    tool.ok(*keygen, "--encrypt", stdin="s3cret\ns3cret\n")

    mint_args = ["vendor", "mint", "--kind", "cloud-basic-1", "--key", str(private)]
    minted = tool.ok(*mint_args, stdin="s3cret\n")
    wrong = tool.runner.invoke(cli, mint_args, input="guess\n")

    assert b"ENCRYPTED" in private.read_bytes()
    assert minted.stdout.strip().startswith("IRM1.")
    assert wrong.exit_code == 1
    assert "password is wrong" in wrong.stderr


# -- help ------------------------------------------------------------------------


def _paths(
    command: click.Command, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from _paths(sub, (*path, name))


def test_every_command_and_group_has_help() -> None:
    found = dict(_paths(cli))
    expected = {
        ("tenant", "add"),
        ("tenant", "list"),
        ("tenant", "show"),
        ("import",),
        ("activate",),
        ("licenses",),
        ("routers",),
        ("routers", "register"),
        ("audit",),
        ("vendor", "keygen"),
        ("vendor", "mint"),
        ("fleet",),
    }
    assert expected <= set(found)

    for path, command in found.items():
        result = CliRunner(env=CLEAN_ENV).invoke(cli, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert result.stdout.startswith("Usage: ")
        assert (command.help or "").strip(), path


def test_a_contact_differing_only_in_case_is_not_added_twice(tool: Tool) -> None:
    tool.ok("contacts", "add", "--tenant", "acme", "ops@acme.example")

    again = tool.ok(
        "contacts", "add", "--tenant", "acme", "OPS@ACME.EXAMPLE",
        "Boss@acme.example", "boss@acme.example",
    )  # fmt: skip

    assert "OPS@acme.example: already a contact" in again.output
    assert "boss@acme.example: already a contact" in again.output
    listed = tool.json("contacts", "list", "--tenant", "acme")
    assert listed == {
        "tenant": "acme",
        "contacts": ["Boss@acme.example", "ops@acme.example"],
    }


def test_a_tenant_differing_only_in_case_from_another_is_refused(tool: Tool) -> None:
    refused = tool.fails("tenant", "add", "ACME")

    assert (
        "irm-tool: tenant 'ACME' would differ from existing tenant 'acme' only in case"
    ) in refused.stderr
    listed = tool.json("tenant", "list")["tenants"]
    assert [t["tenant"] for t in listed] == ["acme"]
    again = tool.ok("tenant", "add", "acme", "--tz", "Europe/Berlin")
    assert "tenant acme exists already" in again.stdout


def test_a_tenant_named_in_the_wrong_case_gets_a_suggestion(tool: Tool) -> None:
    shown = tool.fails("tenant", "show", "Acme")
    listed = tool.fails("licenses", "--tenant", "ACME")
    unknown = tool.fails("tenant", "show", "globex")

    assert "irm-tool: no tenant 'Acme'; did you mean 'acme'?" in shown.stderr
    assert "irm-tool: no tenant 'ACME'; did you mean 'acme'?" in listed.stderr
    assert "unknown tenant 'globex': add it first" in unknown.stderr


# -- unschedule ------------------------------------------------------------------


def test_unscheduling_makes_a_scheduled_license_available_again(tool: Tool) -> None:
    tool.add("acme", code("L1"), code("L2"))
    tool.ok("activate", "--tenant", "acme", "L1", "L2", "--at", "2025-07-01")
    before = tool.licenses()["L1"]

    report = tool.json("unschedule", "--tenant", "acme", "L1")

    (item,) = report["unscheduled"]
    assert (item["id"], item["state"], item["activation_at"]) == (
        "L1", "available", None,
    )  # fmt: skip
    assert item["cancelled_activation_at"] == "2025-06-30T22:00:00Z"
    after = tool.licenses()
    assert after["L1"]["state"] == "available"
    assert after["L1"]["stock_limit"] == before["stock_limit"]
    assert after["L2"]["state"] == "scheduled"
    entries = tool.json("audit", "--tenant", "acme", "--license", "L1")["entries"]
    assert (entries[-1]["event"], entries[-1]["actor"], entries[-1]["at"]) == (
        "activation_cancelled", "admin", NOW,
    )  # fmt: skip
    assert entries[-1]["detail"]["activation_at"] == "2025-06-30T22:00:00Z"
    tool.ok("activate", "--tenant", "acme", "L1", "--at", "2025-08-01")
    assert tool.licenses()["L1"]["state"] == "scheduled"


def test_unschedule_prints_what_it_cancelled_and_warns_of_now(tool: Tool) -> None:
    tool.add("acme", code("L1"))
    tool.ok("activate", "--tenant", "acme", "L1", "--at", "2025-07-01")

    result = tool.ok("unschedule", "--tenant", "acme", "L1")

    assert "L1" in result.stdout
    assert "1 scheduled activation(s) cancelled, available again" in result.stdout
    assert "2025-07-01 00:00" in result.stdout
    assert result.stderr.count(WARNING) == 1, result.stderr


@pytest.mark.parametrize(
    ("lid", "said"),
    [
        ("L1", "license L1 is available, not scheduled"),
        ("L2", "license L2 is already active: it became active at 2025-06-01T09:00"),
        ("L3", "license L3 is already active"),
        ("G1", "tenant acme has no license G1"),
        ("nope", "tenant acme has no license nope"),
    ],
)
def test_unscheduling_what_is_not_scheduled_is_refused_and_changes_nothing(
    tool: Tool, lid: str, said: str
) -> None:
    tool.ok("tenant", "add", "globex")
    tool.add("globex", code("G1"))
    tool.ok("activate", "--tenant", "globex", "G1", "--at", "2025-07-01")
    tool.add("acme", code("L1"), code("L2"), code("L3"), code("L4"))
    earlier = "2025-06-01T09:00:00Z"
    tool.ok("activate", "--tenant", "acme", "L2", now=earlier)
    tool.ok("activate", "--tenant", "acme", "L3", "--at", NOW, now=earlier)
    tool.ok("activate", "--tenant", "acme", "L4", "--at", "2025-07-01")
    # L3's instant passed between the admin's look (09:30) and the command.
    assert tool.licenses(now="2025-06-01T09:30:00Z")["L3"]["state"] == "scheduled"
    before = tool.json("audit", "--tenant", "acme")["entries"]

    refused = tool.fails("unschedule", "--tenant", "acme", "L4", lid)

    assert said in " ".join(refused.stderr.split())
    assert tool.licenses()["L4"]["state"] == "scheduled"
    assert tool.json("audit", "--tenant", "acme")["entries"] == before


def test_all_scheduled_unschedules_every_scheduled_license(tool: Tool) -> None:
    tool.add("acme", code("L1"), code("L2"), code("L3"))
    tool.ok("activate", "--tenant", "acme", "L1")
    tool.ok("activate", "--tenant", "acme", "L2", "L3", "--at", "2025-07-01")

    report = tool.json("unschedule", "--tenant", "acme", "--all-scheduled")
    again = tool.ok("unschedule", "--tenant", "acme", "--all-scheduled")
    usage = tool.run("unschedule", "--tenant", "acme")

    assert sorted(item["id"] for item in report["unscheduled"]) == ["L2", "L3"]
    states = {lid: lic["state"] for lid, lic in tool.licenses().items()}
    assert states == {"L1": "active", "L2": "available", "L3": "available"}
    assert "tenant acme has no scheduled license: nothing done" in again.stdout
    assert usage.exit_code == 2
    assert "--all-scheduled" in usage.stderr
