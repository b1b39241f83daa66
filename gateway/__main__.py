"""``irm-gateway``: run the licensing gate as a service."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

import click
import structlog
from pydantic import ValidationError

from gateway import logs
from gateway.config import Settings
from gateway.service import Gateway
from policy.errors import IrmError
from policy.sqlite_store import SqliteStore

log = structlog.get_logger("gateway")


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then finish in-flight hellos and leave."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    store = await SqliteStore.open(settings.database)
    try:
        await Gateway(settings, store).run(stop)
    finally:
        await store.close()


@click.command(context_settings={"auto_envvar_prefix": "IRM", "show_default": True})
@click.option("--broker-host", default="127.0.0.1", help="MQTT broker host.")
@click.option("--broker-port", default=18830, type=int, help="MQTT broker port.")
@click.option("--broker-username", default=None, help="Broker account of the gateway.")
@click.option("--broker-password", default=None, help="Its password.")
@click.option(
    "--database", default="irm.db", type=click.Path(path_type=Path),
    help="SQLite file shared with irm-tool.",
)  # fmt: skip
@click.option("--gateway-id", default="gw1", help="Names the gateway's MQTT session.")
@click.option(
    "--lease-seconds", default=90.0, help="A silent router's seat lasts this."
)
@click.option("--grace-seconds", default=10.0, help="A last will holds the seat this.")
@click.option(
    "--log-format", default="auto", type=click.Choice(["auto", "json", "console"]),
)  # fmt: skip
@click.option(
    "--log-level", default="info",
    type=click.Choice(["debug", "info", "warning", "error"]),
)  # fmt: skip
@click.option("--uvloop/--no-uvloop", default=False, help="Use uvloop if installed.")
def cli(uvloop: bool, **options: Any) -> None:
    """Admit routers that say hello over MQTT against their tenant's licenses."""
    try:
        settings = Settings(**options)
    except ValidationError as exc:
        for error in exc.errors():
            key = ".".join(str(p) for p in error["loc"])
            click.echo(f"irm-gateway: setting {key}: {error['msg']}", err=True)
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


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
