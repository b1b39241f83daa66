"""``irm-tool status``: every tenant's seats and line at a glance.

The live state comes from a running gateway's ``/status`` (its HTTP port,
gateway/web.py), read as :class:`gateway.protocol.GatewayState`. When no
gateway answers, the tool says so and shows what the database holds
instead: the capacity the licenses give now and the routers as last
recorded, which is what a gateway would restore at its next start.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from pydantic import ValidationError
from rich import box
from rich.console import Console
from rich.table import Table

from gateway.protocol import GatewayState
from policy.licenses import capacity_at, next_change_after
from policy.stores import open_store
from policy.timeutil import from_text, to_text

if TYPE_CHECKING:
    from tools.cli import Settings

DEFAULT_URL = "http://127.0.0.1:18832"
"""Where deploy/irm-gateway.toml puts the gateway's HTTP port."""
TIMEOUT = 2.0


def live(url: str) -> tuple[dict[str, Any] | None, str]:
    """The gateway's ``/status``, or None and why it could not be read."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/status", timeout=TIMEOUT) as r:
            state = GatewayState.model_validate_json(r.read())
    except (OSError, ValueError) as exc:
        return None, _why(exc)
    found = state.model_dump()
    return {"source": "gateway", "url": url, **found}, ""


def _why(exc: Exception) -> str:
    if isinstance(exc, urllib.error.URLError) and not isinstance(
        exc, urllib.error.HTTPError
    ):
        return str(exc.reason)
    if isinstance(exc, ValidationError):
        return "its answer is not a gateway's status"
    return str(exc)


async def stored(database: Path | str, now: datetime) -> dict[str, Any]:
    """The same view from the store: licenses now, routers as recorded."""
    store = await open_store(database, create=False)
    try:
        tenants = []
        for tenant in await store.tenants():
            licenses = await store.licenses(tenant.id)
            states = [row.state for row in await store.routers(tenant.id)]
            capacity = capacity_at(licenses, now)
            tenants.append(
                {
                    "tenant": tenant.id,
                    "tier": capacity.tier,
                    "capacity": capacity.seats,
                    "seats_used": states.count("online"),
                    "waiting": states.count("waiting"),
                    "capacity_alarm": None,
                    "next_license_event": to_text(next_change_after(licenses, now)),
                }
            )
    finally:
        await store.close()
    return {"source": "database", "database": str(database), "at": to_text(now),
            "tenants": tenants}  # fmt: skip


def table(view: dict[str, Any]) -> Table:
    if view["source"] == "gateway":
        title = f"live state of gateway {view['gateway']} ({view['url']})"
    else:
        title = "stored state (no gateway answered)"
    out = Table(box=box.SIMPLE_HEAD, title=title, title_justify="left")
    for column in ("tenant", "capacity", "seats used", "waiting", "alarm",
                   "next license event (UTC)"):  # fmt: skip
        out.add_column(column, overflow="fold")
    for t in view["tenants"]:
        alarm = {True: "RAISED", False: "-", None: "?"}[t["capacity_alarm"]]
        capacity = f"{t['capacity']} {t['tier']}" if t["tier"] else "0 (no license)"
        upcoming = from_text(t["next_license_event"])
        when = upcoming.strftime("%Y-%m-%d %H:%M") if upcoming else "-"
        out.add_row(t["tenant"], capacity, str(t["seats_used"]), str(t["waiting"]),
                    alarm, when)  # fmt: skip
    return out


@click.command("status")
@click.option(
    "--gateway",
    "url",
    default=DEFAULT_URL,
    show_default=True,
    envvar="IRM_GATEWAY_URL",
    show_envvar=True,
    help="The gateway's HTTP address (its http_port).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_obj
def status_command(settings: Settings, url: str, as_json: bool) -> None:
    """Per tenant: capacity, seats used, routers waiting, next license event.

    Read live from the gateway; when none answers, from the database (and
    said so on stderr).
    """
    view, why = live(url)
    if view is None:
        click.echo(
            f"irm-tool: no gateway answered at {url} ({why}): showing the state "
            f"stored in {settings.database}",
            err=True,
        )
        view = asyncio.run(stored(settings.store or settings.database, settings.now))
    if as_json:
        click.echo(json.dumps(view, indent=2))
    else:
        Console(highlight=False, markup=False, emoji=False).print(table(view))
