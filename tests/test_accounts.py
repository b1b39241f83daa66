"""Broker accounts and flood control, without a broker."""

from __future__ import annotations

import base64
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from gateway.flood import HelloLimiter, Verdict
from policy.errors import BadInput
from tools import accounts
from tools.cli import cli


def test_our_entries_are_the_ones_mosquitto_passwd_writes(tmp_path: Path) -> None:
    tool = shutil.which("mosquitto_passwd")
    assert tool is not None, "mosquitto_passwd comes with mosquitto"
    path = tmp_path / "passwd"
    path.touch()
    subprocess.run([tool, "-b", str(path), "acme/R01", "s3cret"], check=True)
    theirs = accounts.PasswordFile(path).entries["acme/R01"]

    _, _, rounds, salt, _ = theirs.split("$")
    ours = accounts.hash_password("s3cret", base64.b64decode(salt))

    assert int(rounds) == accounts.ITERATIONS
    assert ours == theirs
    assert accounts.check_password("s3cret", theirs)
    assert not accounts.check_password("s3cret!", theirs)


def test_the_password_file_keeps_other_accounts_and_no_plain_password(
    tmp_path: Path,
) -> None:
    path = tmp_path / "passwd"
    first = accounts.PasswordFile(path)
    first.set_many({"_gateway": "a-password", "acme/R01": "b-password"})
    first.save()

    again = accounts.PasswordFile(path)
    missing = again.remove(["acme/R01", "acme/R09"])
    again.save()

    assert missing == ["acme/R09"]
    assert list(accounts.PasswordFile(path).entries) == ["_gateway"]
    assert "a-password" not in path.read_text()
    assert path.stat().st_mode & 0o777 == 0o640


def test_a_rewritten_password_file_keeps_the_group_and_mode_the_broker_reads_by(
    tmp_path: Path,
) -> None:
    path = tmp_path / "passwd"
    first = accounts.PasswordFile(path)
    first.set("acme/R01", "one")
    first.save()
    group = 65534 if os.geteuid() == 0 else os.getegid()  # nogroup when root
    os.chown(path, -1, group)
    path.chmod(0o440)

    again = accounts.PasswordFile(path)
    again.set("acme/R02", "two")
    again.save()

    after = path.stat()
    assert (after.st_gid, stat.S_IMODE(after.st_mode)) == (group, 0o440)
    assert set(accounts.PasswordFile(path).entries) == {"acme/R01", "acme/R02"}


def test_a_file_that_is_not_a_password_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    path.write_text("acme/R01:plain\n")

    with pytest.raises(BadInput, match="line 1"):
        accounts.PasswordFile(path)


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "_gateway", "a b", "x" * 65])
def test_account_names_come_only_from_valid_ids(bad: str) -> None:
    with pytest.raises(BadInput, match="must be 1 to 64"):
        accounts.router_account("acme", bad)
    with pytest.raises(BadInput, match="must be 1 to 64"):
        accounts.tenant_account(bad)


def test_reloading_without_a_broker_names_the_pid_file(tmp_path: Path) -> None:
    with pytest.raises(accounts.BrokerError, match="pid file"):
        accounts.reload_broker(tmp_path / "none.pid")


def test_a_router_gets_its_burst_then_its_rate_and_is_told_once() -> None:
    limiter = HelloLimiter(rate=1.0, burst=3)
    key = ("acme", "R01")

    burst = [limiter.take(key, 0.0) for _ in range(6)]
    later = [limiter.take(key, 0.5), limiter.take(key, 1.0), limiter.take(key, 1.1)]

    assert burst == [Verdict.PASS] * 3 + [Verdict.TELL, Verdict.DROP, Verdict.DROP]
    assert later == [Verdict.DROP, Verdict.PASS, Verdict.TELL]


def test_one_router_flooding_leaves_the_others_their_budget() -> None:
    limiter = HelloLimiter(rate=1.0, burst=2)
    for _ in range(1000):
        limiter.take(("acme", "R01"), 0.0)

    assert limiter.take(("acme", "R02"), 0.0) is Verdict.PASS
    assert limiter.take(("other", "R01"), 0.0) is Verdict.PASS


def test_the_tool_refuses_to_add_twice_or_revoke_nothing_and_changes_nothing(
    tmp_path: Path,
) -> None:
    passwd = tmp_path / "passwd"
    base = ["accounts", "--password-file", str(passwd)]
    runner = CliRunner(env={"IRM_BROKER_PID_FILE": None})
    made = runner.invoke(cli, [*base, "add", "--tenant", "acme", "R01"])
    before = passwd.read_text()

    again = runner.invoke(cli, [*base, "add", "--tenant", "acme", "R01"])
    nothing = runner.invoke(cli, [*base, "revoke", "--tenant", "acme", "R02"])
    bad = runner.invoke(cli, [*base, "add", "--tenant", "acme", "R/1"])

    assert made.exit_code == 0, made.output
    assert "reload the broker yourself" in made.stderr
    assert (again.exit_code, nothing.exit_code, bad.exit_code) == (1, 1, 1)
    assert "acme/R01 exists: rotate it" in again.stderr
    assert "no such account: acme/R02" in nothing.stderr
    assert "router 'R/1'" in bad.stderr
    assert passwd.read_text() == before
