"""``irm-gateway``: run the licensing gate as a service.

``irm-gateway`` alone (or ``irm-gateway run``) runs it; ``irm-gateway
check-config`` prints the configuration it would run with, secrets
masked. Both read the same options, ``IRM_*`` variables and TOML file
(gateway/config.py); a bad setting exits 2 naming the key, where it was
set and the rule it breaks.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import structlog
from click.core import ParameterSource

from gateway import logs, metrics, reminders, web
from gateway.cluster import ClusterGateway
from gateway.config import (
    ENV_PREFIX,
    ConfigError,
    Loaded,
    Settings,
    cautions,
    load,
    shown,
    stray_variables,
)
from gateway.service import Gateway
from policy.errors import IrmError
from policy.postgres_store import PostgresStore
from policy.sqlite_store import SqliteStore
from policy.store import Store

log = structlog.get_logger("gateway")

F = TypeVar("F", bound=Callable[..., Any])


SQLITE_WORKER = "(_connection_worker_thread)"
"""How the name of aiosqlite's worker thread ends: threading names a thread
made without a name ``Thread-N (target)``, after the function it runs."""


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then finish in-flight hellos and leave.

    The loop is not left until the store's worker threads have ended, even
    when the store could not be opened: aiosqlite's thread hands its last
    result to the loop, and one still running when :func:`asyncio.run`
    closes the loop dies with an "Event loop is closed" traceback. A
    connection that fails to open is stopped without being waited for.
    """
    try:
        await _serve(settings)
    finally:
        await _sqlite_workers_ended()


async def _sqlite_workers_ended(timeout: float = 5.0) -> None:
    """Wait, up to ``timeout`` in all, for aiosqlite's threads to end."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    for thread in threading.enumerate():
        remaining = deadline - loop.time()
        if thread.name.endswith(SQLITE_WORKER) and remaining > 0:
            await asyncio.to_thread(thread.join, remaining)


async def _serve(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    gateway: Gateway
    store: Store
    if settings.store is not None:
        store = shared = await PostgresStore.open(settings.store)
        gateway = ClusterGateway(settings, shared)
    else:
        store = await SqliteStore.open(settings.database, create=False)
        gateway = Gateway(settings, store)
    reminding = asyncio.create_task(
        reminders.remind(settings, gateway.is_leader), name="reminders"
    )
    try:
        async with (
            web.serving(gateway, settings.http_host, settings.http_port),
            metrics.alarms_checked(gateway.metrics),
        ):
            await gateway.run(stop)
    finally:
        await reminders.stop(reminding)
        await store.close()


# (name, metavar, help) of each setting that has a command-line option; the
# rest are set in the file or the environment. Values are read as text and
# checked by Settings, so a bad value gets one kind of message wherever it
# was typed.
OPTIONS = [
    ("broker_host", "HOST", "MQTT broker host."),
    ("broker_port", "PORT", "MQTT broker port."),
    ("broker_username", "NAME", "Broker account of the gateway."),
    ("broker_password", "SECRET", "Its password."),
    ("database", "PATH", "SQLite file shared with irm-tool."),
    (
        "store",
        "URL",
        "postgresql:// URL that several gateways share (then no --database).",
    ),
    ("share_group", "NAME", "Gateways of one store share hellos in this MQTT group."),
    ("prefix", "TOPIC", "Topic prefix of the protocol."),
    ("gateway_id", "NAME", "Names the gateway's MQTT session."),
    ("lease_seconds", "SECONDS", "A silent router's seat lasts this (1 to 86400)."),
    ("grace_seconds", "SECONDS", "A last will holds the seat this (1 to 3600)."),
    ("hello_rate", "PER_SECOND", "Hellos a second per router after its burst."),
    ("hello_burst", "COUNT", "Hellos one router may send at once."),
    ("log_format", "[auto|json|console]", "JSON, or readable lines on a terminal."),
    ("log_level", "[debug|info|warning|error]", "info: one line per decision."),
    ("http_host", "HOST", "Address of /metrics, /healthz, /readyz, /status."),
    ("http_port", "PORT", "Their port [default: none, no HTTP server]."),
    ("smtp_host", "HOST", "Mail server for expiry reminders (none: off)."),
    ("smtp_port", "PORT", "Its port."),
    ("smtp_tls", "[starttls|implicit|none]", "STARTTLS, TLS from the start, or none."),
    ("smtp_username", "NAME", "Account on the mail server."),
    ("smtp_password", "SECRET", "Its password (never logged)."),
    ("smtp_from", "ADDRESS", "Sender address of the reminders."),
    ("smtp_check_seconds", "SECONDS", "How often due reminders are looked for."),
]


def settings_options(command: F) -> F:
    """Every setting's option, and ``--config``, on ``command``."""
    for name, metavar, text in reversed(OPTIONS):
        # The option's own default stays None (not given), so the file and
        # the environment can set the value; help shows the real one.
        default = Settings.model_fields[name].default
        shown = "" if default is None else f" [default: {default}]"
        command = click.option(
            f"--{name.replace('_', '-')}",
            name,
            metavar=metavar,
            help=text + shown,
            envvar=f"{ENV_PREFIX}{name.upper()}",
            show_envvar=True,
        )(command)
    return click.option(
        "--config",
        type=click.Path(dir_okay=False, path_type=Path),
        envvar=f"{ENV_PREFIX}CONFIG",
        show_envvar=True,
        help="TOML file of settings; options and IRM_* variables override it.",
    )(command)


uvloop_option = click.option(
    "--uvloop/--no-uvloop",
    default=False,
    envvar=f"{ENV_PREFIX}UVLOOP",
    show_envvar=True,
    help="Use uvloop if installed.",
)


def _loaded(ctx: click.Context, options: dict[str, Any]) -> Loaded:
    """The settings from this command's options and its parent's; exit 2 if bad.

    click also reads each option's variable, only to show it in --help:
    values from the environment are left to Settings, which names them so.
    """
    given: dict[str, Any] = dict(ctx.obj or {})
    for name, value in options.items():
        if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE:
            given[name] = value
    config = given.pop("config", None) or options.get("config")
    try:
        return load(given, config)
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(f"irm-gateway: {problem}", err=True)
        sys.exit(2)


@click.group(invoke_without_command=True)
@settings_options
@uvloop_option
@click.pass_context
def cli(ctx: click.Context, /, uvloop: bool, **options: Any) -> None:
    """Admit routers that say hello over MQTT against their tenant's licenses.

    With no command, runs the gateway (as 'irm-gateway run' does).
    """
    if ctx.invoked_subcommand is None:
        _run(_loaded(ctx, options).settings, uvloop)
        return
    ctx.obj = {
        name: value
        for name, value in options.items()
        if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE
    }


@cli.command("run")
@settings_options
@uvloop_option
@click.pass_context
def run_command(ctx: click.Context, /, uvloop: bool, **options: Any) -> None:
    """Run the gateway until SIGTERM or SIGINT."""
    _run(_loaded(ctx, options).settings, uvloop)


@cli.command("check-config")
@settings_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def check_config(ctx: click.Context, /, as_json: bool, **options: Any) -> None:
    """Print the settings the gateway would run with, secrets masked.

    Exit status 0 when they are valid, 2 (with every problem) when not.
    Warnings of settings that are valid but will not work (such as a
    database that does not exist yet), and of IRM_* variables that nothing
    reads, go to stderr and leave the status 0.
    """
    loaded = _loaded(ctx, options)
    for caution in [*stray_variables(os.environ), *cautions(loaded.settings)]:
        click.echo(f"irm-gateway: warning: {caution}", err=True)
    values = shown(loaded.settings)
    if as_json:
        click.echo(json.dumps(values, indent=2))
        return
    click.echo("# irm-gateway: effective configuration (secrets masked)")
    width = max(len(f"{k} = {_toml(v)}") for k, v in values.items())
    for key, value in values.items():
        line = f"{key} = {_toml(value)}" if value is not None else f"# {key} unset"
        click.echo(f"{line:<{width}}  # {loaded.origins[key]}")


def _toml(value: object) -> str:
    """A value as a TOML line would hold it."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value)


def _run(settings: Settings, uvloop: bool) -> None:
    logs.setup(settings.log_format, settings.log_level)
    for stray in stray_variables(os.environ):
        log.warning("environment variable ignored", warning=stray)
    runner: Any = asyncio.run
    if uvloop:
        import uvloop as fast  # noqa: PLC0415 - optional dependency

        runner = fast.run
    try:
        runner(serve(settings))
    except IrmError as exc:
        log.error("gateway failed", error=str(exc))  # noqa: TRY400 - ours: no trace
        sys.exit(1)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
