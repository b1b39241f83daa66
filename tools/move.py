"""``irm-tool move-tenant``: copy one tenant from its store into PostgreSQL.

A deployment that grows from one gateway on SQLite to several on
PostgreSQL moves its tenants one by one. The copy is all or nothing (one
PostgreSQL transaction) and keeps everything the gateways and admins rely
on: licenses with their codes and recorded states, routers with their
epochs and places in arrival order, the audit log, the tenant's contacts
and every reminder mail claimed so far (so none is sent twice). The source is left
as it was, as a backup; stop the gateway that uses it first.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from pathlib import Path
from typing import Protocol

import click

from policy.errors import BadInput
from policy.licenses import capacity_at
from policy.postgres_store import PostgresStore
from policy.sqlite_store import SqliteStore
from policy.stores import is_postgres

ADMIN = "admin"


class _Settings(Protocol):
    database: Path
    now: datetime


@click.command("move-tenant")
@click.argument("tenant")
@click.option(
    "--to", "destination", required=True, metavar="URL",
    help="The postgresql:// URL of the store to move the tenant into.",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_obj
def move_command(
    settings: _Settings, tenant: str, destination: str, as_json: bool
) -> None:
    """Copy TENANT from the SQLite file (--database) into PostgreSQL.

    Refused if the tenant exists at the destination. Nothing is removed
    from the source.
    """
    if not is_postgres(destination):
        raise click.BadParameter(
            f"{destination!r} must be a postgresql:// URL", param_hint="--to"
        )
    moved = asyncio.run(_move(settings, tenant, destination))
    if as_json:
        click.echo(json.dumps({"tenant": tenant, **moved}))
    else:
        click.echo(
            f"Moved tenant {tenant}: {moved['licenses']} licenses, "
            f"{moved['routers']} routers ({moved['in_line']} in line), "
            f"{moved['audit']} audit entries, {moved['contacts']} contacts, "
            f"{moved['reminders']} reminder mails."
        )


async def _move(settings: _Settings, tenant: str, destination: str) -> dict[str, int]:
    source = await SqliteStore.open(settings.database, create=False)
    try:
        data = await source.export_tenant(tenant)
        if data is None:
            raise BadInput(f"tenant {tenant} does not exist in {settings.database}")
        licenses = await source.licenses(tenant)
    finally:
        await source.close()
    target = await PostgresStore.open(destination)
    try:
        capacity = capacity_at(licenses, settings.now)
        await target.import_tenant(data, capacity, settings.now, ADMIN)
    finally:
        await target.close()
    return {
        "licenses": len(data.licenses),
        "routers": len(data.routers),
        "in_line": sum(r[3] is not None for r in data.routers),
        "audit": len(data.audit),
        "contacts": len(data.contacts),
        "reminders": len(data.reminders),
    }
