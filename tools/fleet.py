"""``irm-tool fleet``: a simulated fleet of routers, each its own MQTT connection.

The fleet waits for a gateway to announce itself, then connects its
routers one after another (or all at once) and reports what each was
told. With ``--hold`` the routers stay connected, renew their leases with
heartbeats and report any seat change the gateway announces meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from dataclasses import dataclass, field

import click
import gmqtt
from rich.console import Console
from rich.table import Table

from gateway import protocol
from gateway.protocol import Decision
from tools.router import SimRouter


@dataclass(slots=True)
class FleetReport:
    """What each router was told, in the order the routers said hello."""

    decisions: dict[str, Decision] = field(default_factory=dict)
    latency: dict[str, float] = field(default_factory=dict)
    unanswered: list[str] = field(default_factory=list)
    updates: list[Decision] = field(default_factory=list)

    def final(self) -> dict[str, Decision]:
        """Each router's latest decision, updates included."""
        latest = dict(self.decisions)
        for update in self.updates:
            latest[update.router] = update
        return latest


def router_names(count: int, prefix: str = "R") -> list[str]:
    width = max(2, len(str(count)))
    return [f"{prefix}{i:0{width}d}" for i in range(1, count + 1)]


async def wait_for_gateway(host: str, port: int, prefix: str, timeout: float) -> bool:
    """True once some gateway's retained status says online."""
    online = asyncio.Event()

    def on_message(client: object, topic: str, payload: bytes, *rest: object) -> int:
        try:
            status = protocol.GatewayStatus.model_validate_json(payload)
        except ValueError:
            return 0
        if status.state == "online":
            online.set()
        return 0

    client = gmqtt.Client(None)
    client.on_message = on_message
    await client.connect(host, port)
    client.subscribe(protocol.status_topic(prefix, "+"), qos=1)
    try:
        await asyncio.wait_for(online.wait(), timeout)
    except TimeoutError:
        return False
    finally:
        await client.disconnect()
    return True


async def run_fleet(
    host: str,
    port: int,
    tenant: str,
    names: list[str],
    *,
    prefix: str = protocol.PREFIX,
    concurrent: bool = False,
    hold: float = 0.0,
    goodbye: bool = True,
    timeout: float = 10.0,
) -> FleetReport:
    """Connect the fleet, say hello, hold, leave; report what each was told."""
    report = FleetReport()
    routers = [SimRouter(host, port, tenant, name, prefix) for name in names]

    async def one(router: SimRouter) -> None:
        await router.connect()
        try:
            decision, rtt = await router.ask(timeout)
        except TimeoutError:
            report.unanswered.append(router.router)
            return
        report.decisions[router.router] = decision
        report.latency[router.router] = rtt

    try:
        if concurrent:
            await asyncio.gather(*(one(r) for r in routers))
        else:
            for router in routers:
                await one(router)
        if hold > 0:
            await _hold(routers, hold, report)
        for router in routers:
            if goodbye:
                router.goodbye()
    finally:
        for router in routers:
            await router.disconnect()
    return report


async def _hold(routers: list[SimRouter], seconds: float, report: FleetReport) -> None:
    """Stay connected with heartbeats; collect seat changes announced meanwhile."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    beat = min(5.0, seconds / 3)
    while (left := end - loop.time()) > 0:
        for router in routers:
            router.heartbeat()
            while not router.heard.empty():
                report.updates.append(router.heard.get_nowait().decision)
        await asyncio.sleep(min(beat, left))
    for router in routers:
        while not router.heard.empty():
            report.updates.append(router.heard.get_nowait().decision)


def _table(report: FleetReport, tenant: str) -> Table:
    table = Table(title=f"fleet of tenant {tenant}")
    for column in (
        "router",
        "decision",
        "presence",
        "reason",
        "position",
        "tier",
        "ms",
    ):
        table.add_column(column)
    for name, decision in report.final().items():
        presence = "online" if decision.decision == "accept" else "offline"
        ms = report.latency.get(name)
        table.add_row(
            name,
            decision.decision,
            presence,
            decision.reason.value,
            str(decision.position or ""),
            decision.tier or "",
            f"{ms * 1000:.1f}" if ms is not None else "",
        )
    for name in report.unanswered:
        table.add_row(name, "no reply", "unknown", "", "", "", "")
    return table


def _summary(report: FleetReport) -> dict[str, object]:
    final = report.final()
    reasons = Counter(d.reason.value for d in final.values())
    online = [n for n, d in final.items() if d.decision == "accept"]
    offline = [n for n, d in final.items() if d.decision == "reject"]
    return {
        "online": online,
        "offline": offline,
        "unanswered": report.unanswered,
        "reasons": dict(reasons),
        "routers": {
            name: json.loads(d.model_dump_json(exclude={"v", "type"}))
            for name, d in final.items()
        },
    }


@click.command("fleet")
@click.option("--tenant", required=True, help="Tenant the routers belong to.")
@click.option("--routers", "count", default=10, show_default=True, help="How many.")
@click.option("--name-prefix", default="R", show_default=True, help="R -> R01, R02...")
@click.option(
    "--host", default="127.0.0.1", show_default=True, envvar="IRM_BROKER_HOST"
)
@click.option("--port", default=18830, show_default=True, envvar="IRM_BROKER_PORT")
@click.option("--prefix", default=protocol.PREFIX, show_default=True, help="Topics.")
@click.option(
    "--concurrent", is_flag=True, help="All say hello at once, not one after another."
)
@click.option("--hold", default=0.0, help="Seconds to stay connected with heartbeats.")
@click.option(
    "--goodbye/--no-goodbye",
    default=True,
    show_default=True,
    help="Say goodbye at the end; without it, seats last until the leases run out.",
)
@click.option("--timeout", default=10.0, show_default=True, help="Seconds per reply.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def fleet_command(
    tenant: str,
    count: int,
    name_prefix: str,
    host: str,
    port: int,
    prefix: str,
    concurrent: bool,
    hold: float,
    goodbye: bool,
    timeout: float,
    as_json: bool,
) -> None:
    """Simulate a fleet of routers that say hello and report their answers."""
    names = router_names(count, name_prefix)

    async def go() -> FleetReport:
        if not await wait_for_gateway(host, port, prefix, timeout):
            click.echo(f"irm-tool: no gateway online on {host}:{port}", err=True)
            sys.exit(1)
        return await run_fleet(
            host, port, tenant, names, prefix=prefix, concurrent=concurrent,
            hold=hold, goodbye=goodbye, timeout=timeout,
        )  # fmt: skip

    report = asyncio.run(go())
    summary = _summary(report)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        Console().print(_table(report, tenant))
        final = report.final().values()
        online = sum(d.decision == "accept" for d in final)
        line = f"{online} online, {len(final) - online} offline"
        if report.unanswered:
            line += f", {len(report.unanswered)} unanswered"
        click.echo(line)
    if report.unanswered:
        sys.exit(1)
