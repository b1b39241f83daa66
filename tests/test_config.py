"""Settings from options, IRM_* variables and a TOML file; check-config.

Every test runs the command in process with a clean environment, so no
setting leaks in from the shell that runs the tests.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result
from pydantic import SecretStr

from gateway.__main__ import cli
from gateway.config import MASK, ConfigError, Settings, known_variables, load, shown

CLEAN_ENV: dict[str, str | None] = {
    f"IRM_{name.upper()}": None for name in (*Settings.model_fields, "config")
}
ROOT = Path(__file__).parent.parent


def gateway(*args: str, **env: str) -> Result:
    # Any IRM_* variable of the shell is hidden too: unknown ones are warned of.
    shell = {name: None for name in os.environ if name.upper().startswith("IRM_")}
    runner = CliRunner(env={**shell, **CLEAN_ENV, **env})
    return runner.invoke(cli, list(args), catch_exceptions=False)


def config_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "irm-gateway.toml"
    path.write_text(text)
    return path


def effective(result: Result) -> dict[str, object]:
    assert result.exit_code == 0, result.stderr
    return dict(json.loads(result.stdout))


def test_an_option_beats_the_environment_which_beats_the_file(tmp_path: Path) -> None:
    path = config_file(
        tmp_path, "broker_port = 1001\nlease_seconds = 11\ngrace_seconds = 3\n"
    )

    result = gateway(
        "check-config", "--json", "--config", str(path), "--broker-port", "1003",
        IRM_BROKER_PORT="1002", IRM_LEASE_SECONDS="12",
    )  # fmt: skip

    values = effective(result)
    assert values["broker_port"] == 1003
    assert values["lease_seconds"] == 12.0
    assert values["grace_seconds"] == 3.0
    assert values["gateway_id"] == "gw1"


def test_check_config_says_where_each_value_came_from(tmp_path: Path) -> None:
    path = config_file(tmp_path, "broker_port = 1001\n")

    result = gateway(
        "check-config", "--config", str(path), "--lease-seconds", "30",
        IRM_GATEWAY_ID="gw7",
    )  # fmt: skip

    assert result.exit_code == 0, result.stderr
    lines = {line.split(" = ")[0]: line for line in result.stdout.splitlines()}
    assert lines["broker_port"].endswith(f"# {path}: broker_port")
    assert lines["gateway_id"].endswith("# IRM_GATEWAY_ID")
    assert lines["lease_seconds"].endswith("# --lease-seconds")
    assert lines["prefix"].endswith("# default")


def test_the_file_can_be_named_by_irm_config(tmp_path: Path) -> None:
    path = config_file(tmp_path, 'gateway_id = "site-7"\n')

    values = effective(gateway("check-config", "--json", IRM_CONFIG=str(path)))

    assert values["gateway_id"] == "site-7"


def test_an_option_before_the_command_counts_too(tmp_path: Path) -> None:
    values = effective(gateway("--http-port", "9100", "check-config", "--json"))

    assert values["http_port"] == 9100


def test_an_unknown_key_in_the_file_is_an_error_that_suggests_the_key(
    tmp_path: Path,
) -> None:
    path = config_file(tmp_path, "lease_second = 30\n")

    result = gateway("check-config", "--config", str(path))

    assert result.exit_code == 2
    assert result.stderr == (
        f"irm-gateway: {path}: lease_second = 30: unknown key; did you mean "
        "lease_seconds? ('irm-gateway check-config' lists them all)\n"
    )


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("broker_port = 70000", "broker_port = 70000: must be a whole number from 1"),
        ('lease_seconds = "soon"', "lease_seconds = soon: must be a finite number"),
        ('prefix = "irm/#"', "prefix = irm/#: must be a topic prefix without + or #"),
        ('log_level = "loud"', "log_level = loud: must be one of debug, info,"),
        ("http_port = 0", "http_port = 0: must be a whole number from 1 to 65535"),
    ],
)
def test_a_bad_value_in_the_file_names_file_key_value_and_rule(
    tmp_path: Path, line: str, problem: str
) -> None:
    path = config_file(tmp_path, line + "\n")

    result = gateway("check-config", "--config", str(path))

    assert result.exit_code == 2
    assert result.stderr.startswith(f"irm-gateway: {path}: {problem}")


def test_every_problem_of_every_source_is_reported_at_once(tmp_path: Path) -> None:
    path = config_file(tmp_path, "broker_port = 0\nnonsense = 1\n")

    result = gateway(
        "check-config", "--config", str(path), "--grace-seconds", "-1",
        IRM_LEASE_SECONDS="inf",
    )  # fmt: skip

    assert result.exit_code == 2
    problems = result.stderr.splitlines()
    assert len(problems) == 4
    assert any(p.startswith("irm-gateway: --grace-seconds = -1:") for p in problems)
    assert any(p.startswith("irm-gateway: IRM_LEASE_SECONDS = inf:") for p in problems)
    assert any(p.startswith(f"irm-gateway: {path}: broker_port = 0:") for p in problems)
    assert any(p.startswith(f"irm-gateway: {path}: nonsense = 1:") for p in problems)


def test_an_alarm_that_clears_at_or_above_where_it_is_raised_is_refused() -> None:
    result = gateway(
        "check-config", IRM_ALARM_ON_PERCENT="80", IRM_ALARM_OFF_PERCENT="80"
    )

    assert result.exit_code == 2
    assert result.stderr == (
        "irm-gateway: IRM_ALARM_OFF_PERCENT = 80: must be below "
        "alarm_on_percent (80.0)\n"
    )


def test_an_alarm_refused_by_its_default_names_the_key_and_both_values(
    tmp_path: Path,
) -> None:
    path = config_file(tmp_path, "alarm_on_percent = 80\n")

    result = gateway("check-config", "--config", str(path))

    assert result.exit_code == 2
    assert result.stderr == (
        "irm-gateway: default alarm_off_percent = 85.0: must be below "
        "alarm_on_percent (80.0)\n"
    )


def test_a_broken_or_missing_file_is_named(tmp_path: Path) -> None:
    broken = config_file(tmp_path, "broker_port = \n")

    unreadable = gateway("check-config", "--config", str(broken))
    missing = gateway("check-config", "--config", str(tmp_path / "none.toml"))

    assert unreadable.exit_code == missing.exit_code == 2
    assert unreadable.stderr.startswith(f"irm-gateway: {broken}: not valid TOML:")
    assert "(at line 1" in unreadable.stderr
    assert missing.stderr == (
        f"irm-gateway: {tmp_path / 'none.toml'}: cannot read: "
        "No such file or directory\n"
    )


def test_the_gateway_itself_refuses_to_start_on_a_bad_file(tmp_path: Path) -> None:
    path = config_file(tmp_path, "broker_port = 0\n")

    result = gateway("--config", str(path))

    assert result.exit_code == 2
    assert result.stderr.startswith(f"irm-gateway: {path}: broker_port = 0: must be")


def test_check_config_masks_the_password_from_every_source(tmp_path: Path) -> None:
    path = config_file(tmp_path, 'broker_password = "from-the-file"\n')

    from_file = gateway("check-config", "--config", str(path))
    from_env = gateway("check-config", IRM_BROKER_PASSWORD="from-the-env")
    as_json = gateway("check-config", "--json", "--broker-password", "from-the-option")

    for result, secret in [
        (from_file, "from-the-file"),
        (from_env, "from-the-env"),
        (as_json, "from-the-option"),
    ]:
        assert result.exit_code == 0, result.stderr
        assert secret not in result.stdout
    assert f'broker_password = "{MASK}"' in from_file.stdout
    assert json.loads(as_json.stdout)["broker_password"] == MASK


def test_an_unset_secret_is_shown_as_unset_not_masked() -> None:
    result = gateway("check-config")

    assert "# broker_password unset" in result.stdout


def test_check_config_warns_of_a_gateway_without_a_broker_account() -> None:
    result = gateway("check-config", "--json")

    values = effective(result)
    assert values["broker_username"] is None
    assert result.stderr.startswith(
        "irm-gateway: warning: broker_username is not set: the shipped "
        "mosquitto.conf admits no anonymous client"
    )
    assert "(MQTT code 135, not authorized)" in result.stderr


def test_check_config_does_not_warn_of_a_gateway_with_its_account(
    tmp_path: Path,
) -> None:
    database = tmp_path / "irm.db"
    database.touch()

    result = gateway(
        "check-config", "--broker-username", "_gateway", "--database",
        str(database), IRM_BROKER_PASSWORD="s",
    )  # fmt: skip

    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""


class _Extended(Settings):
    """Settings as they grow: new secrets are masked by type or by name."""

    smtp_password: str | None = None
    api_secret: SecretStr | None = None
    broker_tls_key_secret: str = "k"
    store_url: str = "postgresql://irm:hunter2@db.example:5432/irm"


def test_secrets_are_masked_by_type_by_name_and_inside_urls() -> None:
    settings = _Extended(smtp_password="p", api_secret=SecretStr("s"))

    values = shown(settings)

    assert values["smtp_password"] == MASK
    assert values["api_secret"] == MASK
    assert values["broker_tls_key_secret"] == MASK
    assert values["store_url"] == f"postgresql://irm:{MASK}@db.example:5432/irm"
    assert values["broker_host"] == "127.0.0.1"


def test_load_names_every_problem_in_its_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load({"broker_port": "0", "grace_seconds": "x"})

    assert len(caught.value.problems) == 2
    assert caught.value.problems[0].startswith("--broker-port = 0: must be")


def test_the_example_configuration_is_valid_and_names_every_key() -> None:
    example = Path(__file__).parent.parent / "deploy" / "irm-gateway.toml"

    result = gateway("check-config", "--json", "--config", str(example))

    assert result.exit_code == 0, result.stderr
    text = example.read_text()
    missing = [k for k in Settings.model_fields if f"{k} = " not in text]
    assert not missing, f"deploy/irm-gateway.toml does not mention {missing}"


def test_run_reads_the_same_settings_and_refuses_the_same_way() -> None:
    result = gateway("run", "--broker-port", "0")

    assert result.exit_code == 2
    assert result.stderr.startswith("irm-gateway: --broker-port = 0: must be")


# -- warnings: stray IRM_* variables, a missing database -----------------------


def quiet(tmp_path: Path) -> tuple[str, ...]:
    """Options under which check-config has nothing else to warn of."""
    database = tmp_path / "irm.db"
    database.touch()
    return ("--broker-username", "_gateway", "--database", str(database))


def test_check_config_warns_of_a_misspelled_variable_suggesting_the_setting(
    tmp_path: Path,
) -> None:
    result = gateway(
        "check-config", "--json", *quiet(tmp_path),
        IRM_BROKER_PORTT="1884", IRM_LEASE_SECOND="30",
    )  # fmt: skip

    assert effective(result)["broker_port"] == 18830
    assert result.stderr.splitlines() == [
        "irm-gateway: warning: environment variable IRM_BROKER_PORTT is not a "
        "setting and is ignored; did you mean IRM_BROKER_PORT? "
        "('irm-gateway check-config' lists the settings)",
        "irm-gateway: warning: environment variable IRM_LEASE_SECOND is not a "
        "setting and is ignored; did you mean IRM_LEASE_SECONDS? "
        "('irm-gateway check-config' lists the settings)",
    ]


def test_a_variable_far_from_any_gets_no_suggestion(tmp_path: Path) -> None:
    result = gateway("check-config", *quiet(tmp_path), IRM_XYZZY="1")

    assert result.exit_code == 0, result.stderr
    assert "IRM_XYZZY is not a setting and is ignored (" in result.stderr


def _envvars(command: click.Command) -> Iterator[str]:
    for param in command.params:
        envvar = param.envvar
        yield from [envvar] if isinstance(envvar, str) else list(envvar or [])
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            yield from _envvars(sub)


def test_no_variable_of_the_tools_or_the_gateway_is_warned_of(tmp_path: Path) -> None:
    from tools.cli import cli as irm_tool  # noqa: PLC0415 - only this test

    used = {*_envvars(irm_tool), *_envvars(cli)}
    assert {"IRM_NOW", "IRM_DATABASE", "IRM_VENDOR_PUBLIC_KEY", "IRM_STORE"} <= used
    tools = dict.fromkeys(used - set(CLEAN_ENV), "1")

    result = gateway("check-config", *quiet(tmp_path), **tools)

    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    assert used <= known_variables()


def test_every_irm_variable_the_code_names_is_known() -> None:
    """Variables read with os.environ, or written for demos, count too."""
    named = set()
    for folder in ("gateway", "policy", "tools", "bench", "scripts", "deploy"):
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and path.suffix not in {".pyc", ".png", ".db"}:
                text = path.read_text(errors="replace")
                named |= set(re.findall(r"\bIRM_[A-Z0-9_]*[A-Z0-9]\b", text))
    named |= set(
        re.findall(r"\bIRM_[A-Z0-9_]+\b", (ROOT / "tests/postgres.py").read_text())
    )

    assert {"IRM_ROUTER_PORT", "IRM_BENCH_POSTGRES", "IRM_NOW"} <= named
    assert named - known_variables() == set()


def test_the_gateway_warns_of_a_misspelled_variable_when_it_starts(
    tmp_path: Path,
) -> None:
    result = gateway(
        "run", "--database", str(tmp_path / "none.db"), "--log-format", "json",
        IRM_GATEWAY_IDD="gw9",
    )  # fmt: skip

    assert result.exit_code == 1  # the database is missing: it stops there
    events = [json.loads(line) for line in result.output.splitlines()]
    assert events[0]["event"] == "environment variable ignored"
    assert events[0]["level"] == "warning"
    assert (
        "IRM_GATEWAY_IDD is not a setting and is ignored; did you mean "
        in (events[0]["warning"])
    )


def test_check_config_warns_of_a_database_that_does_not_exist(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "var" / "irm.db"

    result = gateway(
        "check-config", "--broker-username", "_gateway", "--database", str(missing)
    )

    assert result.exit_code == 0, result.stderr
    assert result.stderr == (
        f"irm-gateway: warning: database {missing} does not exist: the gateway "
        "will refuse to start; create it by adding the first tenant, as the "
        f"gateway's user: irm-tool --database {missing} tenant add TENANT "
        "(or check the path)\n"
    )


def test_a_relative_database_is_named_where_it_would_be(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    result = gateway("check-config", "--broker-username", "_gateway")

    assert result.exit_code == 0, result.stderr
    assert result.stderr.startswith(
        f"irm-gateway: warning: database irm.db (here, {tmp_path / 'irm.db'}) "
        "does not exist"
    )
    assert "irm-tool --database irm.db tenant add TENANT" in result.stderr


def test_a_postgres_store_needs_no_database_file(tmp_path: Path) -> None:
    result = gateway(
        "check-config", "--broker-username", "_gateway",
        "--database", str(tmp_path / "none.db"),
        "--store", "postgresql://irm@db.example/irm",
    )  # fmt: skip

    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
