"""``irm-gateway``: run the licensing gate as a service."""

from __future__ import annotations

import asyncio
import functools
import signal
import sys
from pathlib import Path
from typing import Any

import click
import structlog
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from gateway import logs, protocol
from gateway.cluster import ClusterGateway
from gateway.config import Settings
from gateway.service import Gateway
from policy.errors import IrmError
from policy.postgres_store import PostgresStore
from policy.sqlite_store import SqliteStore

log = structlog.get_logger("gateway")


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then finish in-flight hellos and leave."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if settings.store is not None:
        shared = await PostgresStore.open(settings.store)
        try:
            await ClusterGateway(settings, shared).run(stop)
        finally:
            await shared.close()
        return
    store = await SqliteStore.open(settings.database, create=False)
    try:
        await Gateway(settings, store).run(stop)
    finally:
        await store.close()


ENV_PREFIX = "IRM"
"""Every option can also be set as ``IRM_`` plus its name, e.g. IRM_BROKER_PORT."""

option = functools.partial(click.option, show_envvar=True)
"""click shows the variable only when each option asks, not per command."""


# Numbers are read as text and checked by Settings, so that a bad value
# from the command line or the environment gets one kind of message.
@click.command(
    context_settings={"auto_envvar_prefix": ENV_PREFIX, "show_default": True}
)
@option("--broker-host", default="127.0.0.1", help="MQTT broker host.")
@option("--broker-port", default="18830", metavar="PORT", help="MQTT broker port.")
@option("--broker-username", default=None, help="Broker account of the gateway.")
@option("--broker-password", default=None, help="Its password.")
@option(
    "--database", default="irm.db", type=click.Path(path_type=Path),
    help="SQLite file shared with irm-tool.",
)  # fmt: skip
@option(
    "--store", default=None, metavar="URL",
    help="postgresql:// URL: several gateways share it (then --database is unused).",
)  # fmt: skip
@option(
    "--share-group", default="irm-gateways",
    help="Gateways of one store share hellos in this MQTT shared subscription.",
)  # fmt: skip
@option("--prefix", default=protocol.PREFIX, help="Topic prefix of the protocol.")
@option("--gateway-id", default="gw1", help="Names the gateway's MQTT session.")
@option(
    "--lease-seconds", default="90", metavar="SECONDS",
    help="A silent router's seat lasts this (1 to 86400).",
)  # fmt: skip
@option(
    "--grace-seconds", default="10", metavar="SECONDS",
    help="A last will holds the seat this (0 to 3600).",
)  # fmt: skip
@option(
    "--log-format", default="auto", type=click.Choice(["auto", "json", "console"]),
)  # fmt: skip
@option(
    "--log-level", default="info",
    type=click.Choice(["debug", "info", "warning", "error"]),
)  # fmt: skip
@option("--uvloop/--no-uvloop", default=False, help="Use uvloop if installed.")
def cli(uvloop: bool, **options: Any) -> None:
    """Admit routers that say hello over MQTT against their tenant's licenses."""
    try:
        settings = Settings(**options)
    except ValidationError as exc:
        for error in exc.errors():
            click.echo(f"irm-gateway: {_explain(error)}", err=True)
        sys.exit(2)
    logs.setup(settings.log_format, settings.log_level)
    runner: Any = asyncio.run
    if uvloop:
        import uvloop as fast  # noqa: PLC0415 - optional dependency

        runner = fast.run
    try:
        runner(serve(settings))
    except IrmError as exc:
        log.error("gateway failed", error=str(exc))  # noqa: TRY400 - ours: no trace
        sys.exit(1)


def _explain(error: ErrorDetails) -> str:
    """``--opt (IRM_OPT) = value: must be <rule>``: the operator's fault."""
    name = str(error["loc"][0])
    field = Settings.model_fields.get(name)
    rule = f"must be {field.description}" if field and field.description else None
    where = f"--{name.replace('_', '-')} ({ENV_PREFIX}_{name.upper()})"
    return f"{where} = {_shown(error['input'])}: {rule or error['msg']}"


def _shown(value: object) -> str:
    """The value as typed; quoted when blank space would hide it."""
    text = str(value)
    return text if text and text.strip() == text else repr(text)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
