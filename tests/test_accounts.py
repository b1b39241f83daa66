"""Broker accounts and flood control, without a broker."""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from gateway import protocol
from gateway.flood import Limiter, Verdict
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


def test_a_process_without_a_sighup_handler_is_never_signalled(
    tmp_path: Path,
) -> None:
    """A broker still starting (pid file written, no handler yet) would die of
    the reload; so would a stranger that took over a stale pid."""
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        pid_file = tmp_path / "mosquitto.pid"
        pid_file.write_text(f"{stranger.pid}\n")
        with pytest.raises(accounts.BrokerError, match="does not handle SIGHUP"):
            accounts.reload_broker(pid_file, starting=0.3)
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_the_reload_waits_for_a_starting_broker_to_handle_it(tmp_path: Path) -> None:
    script = (
        "import signal, sys, time\n"
        "time.sleep(0.5)\n"
        "signal.signal(signal.SIGHUP, lambda *_: (print('reloaded', flush=True),"
        " sys.exit(0)))\n"
        "print('ready', flush=True)\n"
        "time.sleep(30)\n"
    )
    starting = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True
    )
    try:
        pid_file = tmp_path / "mosquitto.pid"
        pid_file.write_text(f"{starting.pid}\n")
        assert accounts.reload_broker(pid_file) == starting.pid
        out, _ = starting.communicate(timeout=10)
    finally:
        starting.kill()
    assert out.split() == ["ready", "reloaded"]
    assert starting.returncode == 0


def test_a_router_gets_its_burst_then_its_rate_and_is_told_once() -> None:
    limiter = Limiter(rate=1.0, burst=3)
    key = ("acme", "R01")

    burst = [limiter.take(key, 0.0) for _ in range(6)]
    later = [limiter.take(key, 0.5), limiter.take(key, 1.0), limiter.take(key, 1.1)]

    assert burst == [Verdict.PASS] * 3 + [Verdict.TELL, Verdict.DROP, Verdict.DROP]
    assert later == [Verdict.DROP, Verdict.PASS, Verdict.TELL]


def test_one_router_flooding_leaves_the_others_their_budget() -> None:
    limiter = Limiter(rate=1.0, burst=2)
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


def accounts_tool(tmp_path: Path, *args: str, pid_file: Path | None = None) -> Result:
    """``irm-tool accounts`` on the password file in ``tmp_path``."""
    files = ["--password-file", str(tmp_path / "passwd")]
    if pid_file is not None:
        files += ["--pid-file", str(pid_file)]
    runner = CliRunner(env={"IRM_BROKER_PID_FILE": None, "IRM_ROUTER_CA_DIR": None})
    return runner.invoke(cli, ["accounts", *files, *args])


def ended_pid(tmp_path: Path) -> Path:
    """A pid file naming a process that has ended, as after a broker crash."""
    done = subprocess.Popen(["true"])
    done.wait()
    path = tmp_path / "stale.pid"
    path.write_text(f"{done.pid}\n")
    return path


def test_a_change_the_broker_cannot_be_told_of_is_not_made(tmp_path: Path) -> None:
    made = accounts_tool(tmp_path, "add", "--tenant", "acme", "R1")
    before = (tmp_path / "passwd").read_text()

    results = [
        accounts_tool(tmp_path, *args, pid_file=pid_file)
        for pid_file in (ended_pid(tmp_path), tmp_path / "none.pid")
        for args in (
            ("add", "--tenant", "acme", "R7"),
            ("rotate", "--tenant", "acme", "R1"),
        )
    ]

    assert made.exit_code == 0, made.output
    assert [r.exit_code for r in results] == [1, 1, 1, 1]
    assert all("nothing changed" in r.stderr for r in results)
    assert all("password" not in r.stdout for r in results)
    assert "No such process" in results[0].stderr
    assert "No such file" in results[2].stderr
    assert (tmp_path / "passwd").read_text() == before


def test_a_password_made_is_shown_even_when_the_reload_then_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker goes away between the tool's check and its signal."""
    live = tmp_path / "live.pid"
    live.write_text(f"{os.getpid()}\n")

    def gone(pid_file: Path) -> int:
        raise accounts.BrokerError(f"cannot reload the broker from pid file {pid_file}")

    monkeypatch.setattr(accounts, "reload_broker", gone)
    result = accounts_tool(tmp_path, "add", "--tenant", "acme", "R7", pid_file=live)

    assert result.exit_code == 1
    password = result.stdout.split("added acme/R7 password ")[1].strip()
    entry = accounts.PasswordFile(tmp_path / "passwd").entries["acme/R7"]
    assert accounts.check_password(password, entry)
    assert "the accounts above were added in" in result.stderr
    assert "reload the broker (SIGHUP)" in result.stderr


def test_service_accounts_share_the_one_password_file_and_list_shows_all(
    tmp_path: Path,
) -> None:
    service = accounts_tool(tmp_path, "add", "--service", "_gateway")
    router = accounts_tool(tmp_path, "add", "--tenant", "acme", "R1")
    consumer = accounts_tool(tmp_path, "add", "--tenant", "acme")
    rotated = accounts_tool(tmp_path, "rotate", "--service", "_gateway")
    again = accounts_tool(tmp_path, "add", "--service", "_gateway")
    listed = accounts_tool(tmp_path, "list", "--json")
    grouped = accounts_tool(tmp_path, "--json", "list")
    gateway_name = accounts_tool(tmp_path, "add", "--tenant", "irm-gateway-gw1")

    assert [r.exit_code for r in (service, router, consumer, rotated)] == [0] * 4
    assert list(accounts.PasswordFile(tmp_path / "passwd").entries) == [
        "_gateway", "acme", "acme/R1",
    ]  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["passwd"]
    assert again.exit_code == 1
    assert "_gateway exists: rotate it" in again.stderr
    assert json.loads(listed.stdout) == {"accounts": ["_gateway", "acme", "acme/R1"]}
    assert grouped.stdout == listed.stdout
    assert gateway_name.exit_code == 1
    assert "may not begin with 'irm-gateway-'" in gateway_name.stderr


def test_every_account_needs_the_password_file_named(tmp_path: Path) -> None:
    runner = CliRunner(env={"IRM_BROKER_PASSWORD_FILE": None})
    results = [
        runner.invoke(cli, ["accounts", *args])
        for args in (["add", "--service", "_admin"], ["list"])
    ]
    # The service accounts' file of its own is gone: its option is refused.
    old = runner.invoke(
        cli,
        ["accounts", "--service-password-file", str(tmp_path / "other"),
         "add", "--service", "_admin"],
    )  # fmt: skip

    assert [r.exit_code for r in results] == [2, 2]
    assert all("give --password-file" in r.stderr for r in results)
    assert old.exit_code == 2
    assert "No such option" in old.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    made = accounts_tool(
        tmp_path, "cert", "--ca-dir", str(tmp_path / "ca"), "init",
        "--server-name", "mqtt.example.com",
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    return tmp_path / "ca"


def test_certificates_of_a_missing_or_broken_ca_are_refused(
    tmp_path: Path, ca_dir: Path
) -> None:
    junk = tmp_path / "junk"
    shutil.copytree(ca_dir, junk)
    (junk / "ca.pem").write_text("not a certificate\n")
    out = tmp_path / "out"

    def cert(directory: Path, *args: str) -> Result:
        return accounts_tool(tmp_path, "cert", "--ca-dir", str(directory), *args)

    missing = tmp_path / "none"
    results = {
        "issue, no CA": cert(
            missing, "issue", "--tenant", "acme", "--out", str(out), "R1"
        ),
        "revoke, no CA": cert(missing, "revoke", "--tenant", "acme", "R1"),
        "junk CA": cert(junk, "issue", "--tenant", "acme", "--out", str(out), "R1"),
        "bad out": cert(ca_dir, "issue", "--tenant", "acme", "--out", "/proc/x", "R1"),
    }

    assert {k: r.exit_code for k, r in results.items()} == dict.fromkeys(results, 1)
    assert f"{missing / 'ca.pem'}: no such file" in results["issue, no CA"].stderr
    assert f"{missing / 'ca.pem'}: no such file" in results["revoke, no CA"].stderr
    assert f"{junk / 'ca.pem'}: not a PEM certificate" in results["junk CA"].stderr
    assert "cannot make the directory /proc/x" in results["bad out"].stderr
    assert not any("Traceback" in r.output for r in results.values())
    assert not out.exists()
    assert not missing.exists()
    assert not (ca_dir / "issued").exists()


def test_revoking_a_certificate_never_issued_is_one_clear_refusal(
    tmp_path: Path, ca_dir: Path
) -> None:
    crl = (ca_dir / "crl.pem").read_bytes()

    result = accounts_tool(
        tmp_path, "cert", "--ca-dir", str(ca_dir), "revoke", "--tenant", "acme", "R77"
    )

    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"irm-tool: no certificate was issued to acme/R77 by the CA in {ca_dir}; "
        "nothing revoked"
    ]
    assert (ca_dir / "crl.pem").read_bytes() == crl


def test_a_server_name_that_is_not_a_host_name_is_refused(tmp_path: Path) -> None:
    result = accounts_tool(
        tmp_path, "cert", "--ca-dir", str(tmp_path / "ca"), "init",
        "--server-name", "bad name!",
    )  # fmt: skip

    assert result.exit_code == 1
    assert "server name 'bad name!': must be a DNS name" in result.stderr
    assert not (tmp_path / "ca").exists()


def test_a_revocation_keeps_the_lists_group_and_mode(
    tmp_path: Path, ca_dir: Path
) -> None:
    """The broker reads crl.pem through its group."""
    crl = ca_dir / "crl.pem"
    group = 65534 if os.geteuid() == 0 else os.getegid()  # nogroup when root
    os.chown(crl, -1, group)
    crl.chmod(0o640)
    issued = accounts_tool(
        tmp_path, "cert", "--ca-dir", str(ca_dir), "issue", "--tenant", "acme",
        "--out", str(tmp_path / "out"), "R1",
    )  # fmt: skip

    revoked = accounts_tool(
        tmp_path, "cert", "--ca-dir", str(ca_dir), "revoke", "--tenant", "acme", "R1"
    )

    assert (issued.exit_code, revoked.exit_code) == (0, 0), revoked.output
    assert "revoked 1 certificate(s) of acme/R1" in revoked.stdout
    after = crl.stat()
    assert (after.st_gid, stat.S_IMODE(after.st_mode)) == (group, 0o640)


def test_a_fleet_never_gives_existing_accounts_new_passwords(tmp_path: Path) -> None:
    made = accounts_tool(tmp_path, "add", "--tenant", "acme", "R01")
    before = (tmp_path / "passwd").read_text()
    runner = CliRunner(env={"IRM_BROKER_PID_FILE": None})

    fleet = runner.invoke(cli, [
        "fleet", "--tenant", "acme", "--routers", "3", "--port", "1",
        "--password-file", str(tmp_path / "passwd"),
        "--pid-file", str(tmp_path / "mosquitto.pid"),
    ])  # fmt: skip

    assert made.exit_code == 0, made.output
    assert fleet.exit_code == 2
    assert "acme/R01 already has an account" in fleet.stderr
    assert "--name-prefix" in fleet.stderr
    assert (tmp_path / "passwd").read_text() == before


def test_no_router_may_be_named_reply_which_its_tenants_consumers_could_read(
    tmp_path: Path,
) -> None:
    added = accounts_tool(tmp_path, "add", "--tenant", "acme", "reply")

    assert added.exit_code == 1
    assert "router 'reply' is reserved" in added.stderr
    assert not (tmp_path / "passwd").exists()
    assert protocol.split_topic("irm/v1", "irm/v1/acme/reply/hello") is None
    assert protocol.split_topic("irm/v1", "irm/v1/acme/replies/hello") == (
        "acme", "replies", "hello",
    )  # fmt: skip
