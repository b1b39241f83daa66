"""``irm-tool fleet``: a simulated fleet of routers, each its own MQTT connection.

The fleet waits for a gateway to announce itself, then connects its
routers one after another (or all at once) and reports what each was
told. With ``--hold`` the routers stay connected, renew their leases with
heartbeats and report any seat change the gateway announces meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import socket
import sys
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import click
import gmqtt
from gmqtt.mqtt.handler import MQTTConnectError
from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from gateway import protocol
from gateway.protocol import Decision
from policy.errors import BadInput
from policy.stores import is_postgres, open_store
from tools import accounts
from tools.load import LoadSpec, Mode, Summary, run_load
from tools.router import SimRouter


@dataclass(slots=True)
class FleetReport:
    """What each router was told, in the order the routers said hello.

    ``decisions`` and ``latency`` are the answers to the hellos;
    ``updates`` is what the gateway announced later, during ``held``
    seconds of heartbeats.
    """

    decisions: dict[str, Decision] = field(default_factory=dict)
    latency: dict[str, float] = field(default_factory=dict)
    unanswered: list[str] = field(default_factory=list)
    updates: list[Decision] = field(default_factory=list)
    held: float = 0.0

    def final(self) -> dict[str, Decision]:
        """Each router's latest decision, updates included."""
        latest = dict(self.decisions)
        for update in self.updates:
            latest[update.router] = update
        return latest

    def moves(self) -> dict[str, list[Decision]]:
        """Per router, the updates that changed its decision, reason or tier."""
        last: dict[str, Decision] = dict(self.decisions)
        moves: dict[str, list[Decision]] = {}
        for update in self.updates:
            before = last.get(update.router)
            if before is None or _told(before) != _told(update):
                moves.setdefault(update.router, []).append(update)
            last[update.router] = update
        return moves


def _told(decision: Decision) -> tuple[str, str, str | None]:
    # Not the position: a router moving up the line has not changed state.
    return decision.decision, decision.reason.value, decision.tier


def _router(
    host: str, port: int, tenant: str, name: str, prefix: str,
    passwords: Mapping[str, str] | None,
) -> SimRouter:  # fmt: skip
    """A router of the fleet, logged in with its account when it has one."""
    if passwords is None:
        return SimRouter(host, port, tenant, name, prefix)
    account = accounts.router_account(tenant, name)
    return SimRouter(
        host, port, tenant, name, prefix, username=account, password=passwords[name]
    )


def _provision(
    spec: LoadSpec, password_file: Path | None, pid_file: Path | None,
    replace: bool,
) -> dict[str, str]:  # fmt: skip
    """Accounts for every router of the fleet, known to the broker on return.

    Accounts that already exist are real routers' until said otherwise: the
    fleet would give them new passwords and lock those routers out.
    """
    if password_file is None:
        return {}
    if pid_file is None:
        raise click.UsageError("--password-file needs --pid-file to reload the broker")
    wanted = {
        accounts.router_account(tenant, router): accounts.new_password()
        for tenant, router in spec.names()
    }
    taken = sorted(set(wanted) & set(accounts.PasswordFile(password_file).entries))
    if taken and not replace:
        shown = ", ".join(taken[:5]) + (
            f" and {len(taken) - 5} more" if taken[5:] else ""
        )
        have = "has an account" if len(taken) == 1 else "have accounts"
        raise click.UsageError(
            f"{shown} already {have} in {password_file}, and the fleet would "
            "give them new passwords: name the fleet's routers apart "
            "(--name-prefix), or give --replace-accounts if those accounts "
            "are a fleet's own"
        )
    # No account is written for a broker that is not there.
    _probe(spec.host, spec.port)
    accounts.provision(password_file, pid_file, wanted, (spec.host, spec.port))
    return wanted


class FleetError(click.ClickException):
    """The fleet cannot run: ``irm-tool: <message>``, exit status 1."""

    exit_code = 1

    def show(self, file: Any = None) -> None:
        click.echo(f"irm-tool: {self.message}", file=file, err=file is None)


def _no_broker(host: str, port: int, exc: OSError) -> FleetError:
    refused = isinstance(exc, ConnectionRefusedError)
    why = "connection refused" if refused else exc.strerror or str(exc)
    return FleetError(
        f"no MQTT broker on {host}:{port} ({why}); start one, or give "
        "--host/--port (IRM_BROKER_HOST/IRM_BROKER_PORT)"
    )


def _probe(host: str, port: int, timeout: float = 5.0) -> None:
    """Refuse at once, naming host and port, if nothing listens there."""
    try:
        with socket.create_connection((host, port), timeout):
            pass
    except OSError as exc:
        raise _no_broker(host, port, exc) from exc


@contextlib.contextmanager
def _broker_errors(host: str, port: int) -> Iterator[None]:
    """Whatever the mode, a broker that is not there or refuses is said so."""
    try:
        yield
    except MQTTConnectError as exc:
        # Mosquitto refuses a router account it does not know (code 135).
        raise FleetError(
            f"the broker on {host}:{port} refused the fleet's login "
            f"({exc}); give --password-file and --pid-file "
            "(IRM_BROKER_PASSWORD_FILE/IRM_BROKER_PID_FILE) so that the fleet's "
            "accounts are made first"
        ) from exc
    except OSError as exc:
        if exc.filename is not None:  # a password or pid file, not the broker
            raise FleetError(f"{exc.filename}: {exc.strerror or exc}") from exc
        raise _no_broker(host, port, exc) from exc


def _given(ctx: click.Context, name: str) -> Any:
    """The root option ``name`` if the admin gave it (not its default)."""
    root = ctx.find_root()
    if name not in root.params:
        return None
    source = root.get_parameter_source(name)
    if source in (None, click.core.ParameterSource.DEFAULT):
        return None
    return root.params[name]


def _check_tenants(ctx: click.Context, tenants: Sequence[str]) -> None:
    """With a database given, refuse tenants it does not know, before any
    account is made for their routers.

    Without one the fleet still runs: it is how routers of a tenant no one
    added are shown to be refused by the gateway.
    """
    location = _given(ctx, "store") or _given(ctx, "database")
    if location is None:
        return

    async def unknown() -> list[str]:
        store = await open_store(location, create=False)
        try:
            known = {t.id for t in await store.tenants()}
        finally:
            await store.close()
        return [t for t in dict.fromkeys(tenants) if t not in known]

    missing = asyncio.run(unknown())
    if missing:
        names = ", ".join(repr(t) for t in missing)
        # A URL may hold a password: it is not repeated.
        where = "the --store database" if is_postgres(location) else location
        raise BadInput(
            f"unknown tenant {names} in {where}: the fleet makes no broker "
            "account for the routers of a tenant the database does not have; "
            f"add it first with 'irm-tool tenant add {missing[0]}', or run the "
            "fleet without --database/--store (IRM_DATABASE/IRM_STORE) to see "
            "the gateway refuse routers of an unknown tenant"
        )


def router_names(count: int, prefix: str = "R") -> list[str]:
    width = max(2, len(str(count)))
    return [f"{prefix}{i:0{width}d}" for i in range(1, count + 1)]


async def wait_for_gateway(
    host: str,
    port: int,
    prefix: str,
    timeout: float,
    login: tuple[str, str] | None = None,
) -> bool:
    """True once some gateway's retained status says online (every router
    may read it)."""
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
    if login is not None:
        client.set_auth_credentials(*login)
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
    passwords: Mapping[str, str] | None = None,
) -> FleetReport:
    """Connect the fleet, say hello, hold, leave; report what each was told.

    ``passwords`` holds each router's broker password; its account is
    ``{tenant}/{router}`` (tools/accounts.py).
    """
    report = FleetReport()
    routers = [_router(host, port, tenant, n, prefix, passwords) for n in names]

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
            report.held = hold
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
    """One row per router: its first answer, then what it changed to, if it did."""
    columns = ["router", "answer", "reason", "place", "tier", "ms"]
    if report.held or report.updates:
        columns.append("during hold")
    table = Table(
        *columns,
        title=f"fleet of tenant {tenant}",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
    )
    moves = report.moves()
    for name, first in report.decisions.items():
        # The latency is the hello's round trip: it belongs to the first answer.
        ms = report.latency.get(name)
        row = [
            name,
            first.decision,
            first.reason.value,
            str(first.position or ""),
            first.tier or "",
            "" if ms is None else f"{ms * 1000:.1f}",
            _moves_text(first, moves.get(name)),
        ]
        table.add_row(*row[: len(columns)])
    for name in report.unanswered:
        row = [name, "no reply", "", "", "", "", _moves_text(None, moves.get(name))]
        table.add_row(*row[: len(columns)])
    return table


def _moves_text(first: Decision | None, moves: list[Decision] | None) -> str:
    """Each change in turn, e.g. "→ accept (seat_freed)", with the gateway's cause."""
    said, before = [], first
    for after in moves or []:
        said.append(f"→ {_move(before, after)} ({after.cause.value})")
        before = after
    return " ".join(said)


def _move(before: Decision | None, after: Decision) -> str:
    # The decision, and the reason or tier only where they say something new.
    if after.decision == "accept":
        if before is None or before.decision != "accept":
            return "accept"
        return f"accept, {after.tier} tier"
    if before is not None and before.reason == after.reason:
        return "reject"
    return f"reject, {after.reason.value}"


def _summary_line(report: FleetReport) -> str:
    """The fleet's final state in counts, and how many changed during the hold."""
    final = report.final().values()
    online = sum(d.decision == "accept" for d in final)
    waiting = sum(d.decision == "reject" and d.position is not None for d in final)
    offline = len(final) - online
    line = f"{online} online, {offline} offline"
    if waiting:
        line += f" ({waiting} waiting in line)"
    if report.unanswered:
        line += f", {len(report.unanswered)} unanswered"
    if report.held or report.updates:
        line += f"; {len(report.moves())} changed during the hold"
    return line


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


def _load_summary(summary: Summary) -> Table:
    report = summary.report()
    table = Table(title="load summary", show_header=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row("hellos sent / answered", f"{report['sent']} / {report['answered']}")
    table.add_row("unanswered", str(report["unanswered"]))
    for outcome, count in sorted(report["decisions"].items()):
        table.add_row(f"  {outcome.replace(':', ', ')}", str(count))
    table.add_row(
        "routers online / offline", f"{report['online']} / {report['offline']}"
    )
    table.add_row("round trips per second", str(report["round_trips_per_s"]))
    latency = report["latency_ms"]
    table.add_row(
        "latency ms p50 / p95 / p99 / max",
        " / ".join(str(latency[q]) for q in ("p50", "p95", "p99", "max")),
    )
    if report["storm_s"] is not None:
        table.add_row("reconnect storm decided in (s)", str(report["storm_s"]))
        table.add_row("same routers online after it", str(report["storm_same_online"]))
    return table


def _run_load(spec: LoadSpec, as_json: bool) -> Summary:
    """Run a load mode with a progress bar (on a terminal) and report."""
    expected = spec.routers * (2 if spec.mode == "storm" else 1)
    bounded = spec.mode in ("once", "storm")
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    with Progress(*columns, TimeElapsedColumn(), disable=as_json) as progress:
        task = progress.add_task(
            f"{spec.mode}: answers", total=expected if bounded else None
        )
        summary = run_load(spec, lambda n: progress.advance(task, n))
    if as_json:
        click.echo(json.dumps(summary.report(), indent=2))
    else:
        Console().print(_load_summary(summary))
    return summary


MAX_ROUTERS = 1_000_000
MAX_PROCESSES = 256
MAX_SECONDS = 7 * 24 * 3600.0
"""A week: longer than any test or load run."""
MAX_RATE = 1_000_000.0


class Finite(click.FloatRange):
    """A finite number in a range: click's FloatRange lets 'nan' and 'inf' by."""

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


@click.command("fleet")
@click.option(
    "--tenant", "tenants", required=True, multiple=True,
    help="Tenant of the routers; repeat it to spread a load over tenants. "
    "With a database given (--database, --store, IRM_DATABASE or IRM_STORE, "
    "before 'fleet'), each must be one of its tenants.",
)  # fmt: skip
@click.option(
    "--routers", "count", default=10, show_default=True,
    type=click.IntRange(1, MAX_ROUTERS), help="How many.",
)  # fmt: skip
@click.option("--name-prefix", default="R", show_default=True, help="R -> R01, R02...")
@click.option(
    "--host", default="127.0.0.1", show_default=True, envvar="IRM_BROKER_HOST"
)
@click.option(
    "--port", default=18830, show_default=True, envvar="IRM_BROKER_PORT",
    show_envvar=True, type=click.IntRange(1, 65535),
)  # fmt: skip
@click.option("--prefix", default=protocol.PREFIX, show_default=True, help="Topics.")
@click.option(
    "--mode",
    type=click.Choice(["table", "once", "closed", "rate", "storm"]),
    default="table",
    show_default=True,
    help="table: each router's answer; once: all say hello once; closed: hello "
    "again at once, for --duration (throughput); rate: --rate hellos a second "
    "(latency); storm: hello, then all reconnect at once.",
)
@click.option(
    "--concurrent", is_flag=True, help="All say hello at once, not one after another."
)
@click.option(
    "--hold", default=0.0, show_default=True, type=Finite(0, MAX_SECONDS),
    help="Seconds to stay connected with heartbeats (0: leave at once).",
)  # fmt: skip
@click.option(
    "--goodbye/--no-goodbye",
    default=True,
    show_default=True,
    help="Say goodbye at the end; without it, seats last until the leases run out.",
)
@click.option(
    "--processes", default=1, show_default=True,
    type=click.IntRange(1, MAX_PROCESSES), help="Worker processes.",
)  # fmt: skip
@click.option(
    "--connect-rate", default=2000.0, show_default=True,
    type=Finite(0, MAX_RATE), help="Connects/s (0: as fast as they go).",
)  # fmt: skip
@click.option(
    "--duration", default=10.0, show_default=True,
    type=Finite(0, MAX_SECONDS, min_open=True), help="Seconds (closed, rate).",
)  # fmt: skip
@click.option(
    "--rate", default=1000.0, show_default=True,
    type=Finite(0, MAX_RATE, min_open=True), help="Hellos/s (rate mode).",
)  # fmt: skip
@click.option(
    "--churn", default=0.0, show_default=True, type=Finite(0, 1),
    help="Share of routers (0 to 1) that leave and come back every third of "
    "--duration.",
)  # fmt: skip
@click.option(
    "--heartbeat", default=20.0, show_default=True,
    type=Finite(0, MAX_SECONDS, min_open=True), help="Seconds between.",
)  # fmt: skip
@click.option(
    "--timeout", default=10.0, show_default=True,
    type=Finite(0, MAX_SECONDS, min_open=True), help="Seconds per reply.",
)  # fmt: skip
@click.option(
    "--password-file", envvar="IRM_BROKER_PASSWORD_FILE", show_envvar=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Give the fleet's routers broker accounts in this password file, "
    "and reload the broker once (--pid-file) before they connect.",
)  # fmt: skip
@click.option(
    "--pid-file", envvar="IRM_BROKER_PID_FILE", show_envvar=True,
    type=click.Path(dir_okay=False, path_type=Path), help="The broker's pid_file.",
)  # fmt: skip
@click.option(
    "--replace-accounts", is_flag=True,
    help="Give routers that already have accounts in --password-file new "
    "passwords (a fleet run again on its own test broker).",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def fleet_command(
    ctx: click.Context,
    tenants: tuple[str, ...],
    count: int,
    name_prefix: str,
    host: str,
    port: int,
    prefix: str,
    mode: str,
    concurrent: bool,
    hold: float,
    goodbye: bool,
    processes: int,
    connect_rate: float,
    duration: float,
    rate: float,
    churn: float,
    heartbeat: float,
    timeout: float,
    password_file: Path | None,
    pid_file: Path | None,
    replace_accounts: bool,
    as_json: bool,
) -> None:
    """Simulate a fleet of routers, each its own MQTT connection.

    The default shows what each router was told. The other modes are a load
    generator: many tenants, worker processes, a progress bar, and a summary
    of answers, reasons and latency percentiles.
    """
    for tenant in tenants:
        if not protocol.NAME.match(tenant):
            raise click.BadParameter(
                f"{tenant!r} is not a tenant id (1 to 64 of A-Z a-z 0-9 _ . -)",
                param_hint="--tenant",
            )
    if mode == "table" and len(tenants) != 1:
        raise click.UsageError("--mode table takes one --tenant")
    _check_tenants(ctx, tenants)
    spec = LoadSpec(
        host, port, tenants, count, cast("Mode", mode),
        processes, connect_rate, duration, rate, churn, heartbeat, timeout,
        prefix, name_prefix,
    )  # fmt: skip
    with _broker_errors(host, port):
        passwords = _provision(spec, password_file, pid_file, replace_accounts)
        login = next(iter(passwords.items()), None)
        online = asyncio.run(wait_for_gateway(host, port, prefix, timeout, login))
        if not online:
            raise FleetError(f"no gateway online on {host}:{port}")
        if mode != "table":
            spec = dataclasses.replace(spec, passwords=passwords or None)
            if _run_load(spec, as_json).unanswered:
                sys.exit(1)
            return
        report = asyncio.run(
            run_fleet(
                host,
                port,
                tenants[0],
                router_names(count, name_prefix),
                prefix=prefix,
                concurrent=concurrent,
                hold=hold,
                goodbye=goodbye,
                timeout=timeout,
                passwords={a.split("/")[1]: p for a, p in passwords.items()} or None,
            )
        )
    if as_json:
        click.echo(json.dumps(_summary(report), indent=2))
    else:
        Console().print(_table(report, tenants[0]))
        click.echo(_summary_line(report))
    if report.unanswered:
        sys.exit(1)
