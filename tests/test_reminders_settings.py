"""The gateway's mail settings: bad values stop it naming the rule, and the
password never shows."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from gateway.__main__ import cli
from gateway.config import Settings
from gateway.reminders import smtp_of
from tools.cli import cli as tool

SMTP_ENV = ("HOST", "PORT", "TLS", "USERNAME", "PASSWORD", "FROM", "CHECK_SECONDS")
CLEAN_ENV: dict[str, str | None] = {f"IRM_SMTP_{name}": None for name in SMTP_ENV}


@pytest.mark.parametrize(
    ("option", "value", "rule"),
    [
        ("--smtp-port", "0", "a whole number from 1 to 65535"),
        ("--smtp-from", "nobody", "one address, name@domain, that the server"),
        ("--smtp-check-seconds", "0", "a finite number from 1 to 86400"),
        ("--smtp-check-seconds", "inf", "a finite number from 1 to 86400"),
    ],
)
def test_a_bad_mail_setting_exits_2_naming_option_value_and_rule(
    option: str, value: str, rule: str
) -> None:
    result = CliRunner(env=CLEAN_ENV).invoke(cli, [option, value])

    assert result.exit_code == 2
    assert f"{option} = {value}: must be {rule}" in result.output


def test_an_unknown_tls_mode_is_refused_by_name() -> None:
    result = CliRunner(env=CLEAN_ENV).invoke(cli, ["--smtp-tls", "ssl"])

    assert result.exit_code == 2
    assert "--smtp-tls = ssl: must be one of starttls, implicit, none" in result.output


def test_the_password_reaches_the_sender_and_nothing_that_is_shown() -> None:
    settings = Settings(smtp_host="mail.example", smtp_password="pa55")  # type: ignore[arg-type]

    smtp = smtp_of(settings)

    assert smtp is not None
    assert smtp.password == "pa55"
    assert "pa55" not in repr(smtp)
    assert "pa55" not in repr(settings)
    assert smtp_of(Settings()) is None


def test_the_tool_refuses_a_sender_that_cannot_be_one_address(tmp_path: Path) -> None:
    result = CliRunner(env=CLEAN_ENV).invoke(
        tool,
        ["--database", str(tmp_path / "irm.db"), "reminders", "send",
         "--smtp-host", "127.0.0.1", "--smtp-from", "not an address"],
    )  # fmt: skip

    assert result.exit_code == 2
    assert "'not an address' must be one address, name@domain" in result.output
