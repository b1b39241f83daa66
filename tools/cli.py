"""irm-tool: the tenant admin's and the vendor's command line.

A thin layer over :mod:`policy`: a command reads what it needs from the
store, lets the rule book decide, writes through the store and prints a
table (or JSON with ``--json``). The project's own errors
(:class:`~policy.errors.IrmError`) end a command with ``irm-tool:
<message>`` on stderr and exit status 1; click's usage errors exit 2.

Full license codes are bearer tokens: only ``vendor mint`` prints them,
everything else names a code by :func:`policy.codes.fingerprint`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, TypeVar, cast

import click
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from rich import box
from rich.console import Console
from rich.table import Table

from gateway.protocol import NAME, refuse_reserved
from policy import codes, csvimport, imports
from policy.errors import BadInput, CsvImportError, IrmError
from policy.licenses import (
    FREE_MAX_CAPACITY,
    Capacity,
    Kind,
    License,
    State,
    activate,
    cancel_activation,
    capacity_at,
    invalidated_at,
    next_change_after,
    paid_since,
    state_at,
)
from policy.store import AuditEntry, RouterRow, Store, Tenant
from policy.stores import is_postgres, open_store
from policy.timeutil import (
    add_months,
    from_text,
    parse_instant,
    start_of_day,
    to_text,
    zone,
)
from tools import keys
from tools.accounts_cli import accounts_group
from tools.fleet import fleet_command
from tools.move import move_command
from tools.reminders_cli import contacts_group, reminders_group
from tools.status import status_command

T = TypeVar("T")
ADMIN = "admin"
"""The actor the audit log names for every change made with this tool."""
TIMELINE_MONTHS = 12
# Rich folds a table to 80 columns when it cannot ask a terminal; a file
# or a pipe gets whole lines instead, since scripts should use --json,
# unless COLUMNS names a width.
PIPE_WIDTH = 200
_JUST_BEFORE = timedelta(microseconds=1)
_ROUTER_STATES = ("online", "waiting", "offline")
_WHOLE = {"license", "router", "at"}
_MINUTES, _SECONDS = "%Y-%m-%d %H:%M", "%Y-%m-%d %H:%M:%S"
PAID_CAPACITY = {Kind.BASIC_1: 1, Kind.BASIC_25: 25}


# -- errors --------------------------------------------------------------------


class ToolError(click.ClickException):
    """A project error on its way out: ``irm-tool: <message>``, status 1."""

    exit_code = 1

    def __init__(self, error: IrmError) -> None:
        super().__init__(_message(error))

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"irm-tool: {self.message}", file=file, err=file is None)


def _message(error: IrmError) -> str:
    if not isinstance(error, CsvImportError):
        return str(error)
    rows = len({line for line, _ in error.problems})
    lines = [f"{rows} bad row(s), nothing imported:"]
    lines += [f"  line {line}: {why}" for line, why in error.problems]
    return "\n".join(lines)


class ToolGroup(click.Group):
    """The root group: every command below it ends cleanly on an IrmError."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except IrmError as exc:
            raise ToolError(exc) from exc


# -- settings and the store ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Settings:
    """The root group's options, handed to every command."""

    database: Path
    vendor_key: Path | None
    now: datetime
    store: str | None = None
    """A postgresql:// URL; when given, used instead of ``database``."""
    acting_as_of: datetime | None = None
    """The instant --now or IRM_NOW gave, if either did (then ``now``)."""
    _warned: list[bool] = field(default_factory=list, compare=False, repr=False)

    def warn_acting(self, what: str = "") -> None:
        """Say once, on stderr, that a change is dated by --now, not the clock.

        Every command that changes the store calls this first (and the
        store itself does, through :meth:`run`, before it writes).
        """
        if self.acting_as_of is None or self._warned:
            return
        self._warned.append(True)
        click.echo(
            f"irm-tool: warning: acting as of {to_text(self.acting_as_of)} "
            f"(--now/IRM_NOW), not the real time{what}",
            err=True,
        )

    def public_key(self) -> Ed25519PublicKey:
        """The vendor key codes are verified with (the demo key by default)."""
        if self.vendor_key is not None:
            return keys.load_public_key(self.vendor_key)
        _warn_demo(
            keys.DEMO_PUBLIC_KEY_PATH,
            "IRM_VENDOR_PUBLIC_KEY=FILE or irm-tool --vendor-key FILE (before the "
            "command)",
        )
        return keys.load_public_key(keys.DEMO_PUBLIC_KEY_PATH)

    def run(self, work: Callable[[Store], Awaitable[T]], *, create: bool = False) -> T:
        """Open the store, do ``work`` and close the store, in one event loop.

        Only adding a tenant creates a missing database: any other command on
        a mistyped path says so instead of answering from an empty one.
        """

        async def session() -> T:
            store = await open_store(self.store or self.database, create=create)
            try:
                if self.acting_as_of is None:
                    return await work(store)
                return await work(cast("Store", _Warned(store, self.warn_acting)))
            finally:
                await store.close()

        return asyncio.run(session())


pass_settings = click.make_pass_decorator(Settings)

_WRITES = frozenset(
    {
        "add_tenant",
        "add_licenses",
        "save_activations",
        "cancel_activations",
        "register_routers",
        "apply",
        "add_contacts",
        "remove_contacts",
        "claim_reminder",
        "take_reminder",
        "reminder_sent",
        "reminder_failed",
        "reminder_dropped",
        "import_tenant",
    }
)
"""The store's methods that change it."""


class _Warned:
    """A store that calls ``before_change`` before any method that writes.

    With --now set, whichever command writes, the admin is told that what
    it writes is dated then, not now.
    """

    def __init__(self, store: Store, before_change: Callable[[], None]) -> None:
        self._store = store
        self._before_change = before_change

    def __getattr__(self, name: str) -> Any:
        found = getattr(self._store, name)
        if name in _WRITES:
            self._before_change()
        return found


def _warn_demo(path: Path, instead: str) -> None:
    click.echo(
        f"irm-tool: using the DEMO vendor key {path}: anyone can mint codes it "
        f"accepts; give {instead} for real codes",
        err=True,
    )


async def _tenant(store: Store, name: str) -> Tenant:
    found = await store.tenant(name)
    if found is None:
        near = await _case_twin(store, name)
        if near is not None:
            raise BadInput(f"no tenant {name!r}; did you mean {near.id!r}?")
        raise BadInput(
            f"unknown tenant {name!r}: add it first with 'irm-tool tenant add {name}'"
        )
    return found


async def _case_twin(store: Store, name: str) -> Tenant | None:
    """The tenant whose id differs from ``name`` only in case, if one does.

    Ids are compared exactly by the store, and a tenant cannot be removed:
    the tool keeps ``ACME`` from being added beside ``acme`` instead.
    """
    folded = name.casefold()
    for tenant in await store.tenants():
        if tenant.id != name and tenant.id.casefold() == folded:
            return tenant
    return None


@dataclass(frozen=True, slots=True)
class Facts:
    """One tenant as the store knows it, read in one go."""

    tenant: Tenant
    licenses: list[License]
    routers: list[RouterRow]


async def _facts(store: Store, name: str, routers: bool = False) -> Facts:
    tenant = await _tenant(store, name)
    found = await store.routers(name) if routers else []
    return Facts(tenant, await store.licenses(name), found)


class Instant(click.ParamType[datetime]):
    """An ISO 8601 instant; a bare date is midnight UTC, no offset is UTC."""

    name = "ISO-INSTANT"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            return parse_instant(str(value), "UTC")
        except BadInput as exc:
            self.fail(str(exc), param, ctx)


def _check_name(value: str, what: str) -> None:
    """Tenant and router ids become MQTT topic levels: keep them plain."""
    if not NAME.fullmatch(value):
        raise BadInput(
            f"{what} {value!r} is not 1 to 64 letters, digits, '_', '.' or '-' "
            "starting with a letter or digit"
        )


# -- output --------------------------------------------------------------------


def _console() -> Console:
    # Ids and audit details are data, not rich markup or emoji codes.
    console = Console(highlight=False, markup=False, emoji=False)
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        console.width = PIPE_WIDTH
    return console


def _table(*columns: str, title: str | None = None) -> Table:
    # Two spaces between columns, not three: the licenses table, with its
    # 32-character ids, then fits a 100-column terminal. A title is never
    # folded over a table narrower than itself.
    table = Table(
        box=box.SIMPLE_HEAD,
        title=title,
        title_justify="left",
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
        min_width=len(title) if title else None,
    )
    # Never cut a value short with "…": an id is typed back in elsewhere,
    # so ids and instants keep to one line and other values fold.
    for column in columns:
        table.add_column(column, no_wrap=column in _WHOLE, overflow="fold")
    return table


def _print(*renderables: Table | str) -> None:
    console = _console()
    for item in renderables:
        console.print(item)


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


Moment = datetime | str | None
"""An instant as the tool holds it: a datetime, its wire text, or none."""


@dataclass(frozen=True, slots=True)
class Clock:
    """How one screen shows instants: in the tenant's zone, to the minute.

    To the second when two instants it shows fall in the same minute, so
    that two rows of a table never read alike yet differ.
    """

    tz: str
    seconds: bool = False

    @classmethod
    def showing(cls, tz: str, moments: Iterable[Moment]) -> Clock:
        return cls(tz, _same_minute(moments))

    def local(self, moment: Moment) -> str:
        """An instant with its zone's abbreviation, for a line of text."""
        return self._show(moment, " %Z")

    def cell(self, moment: Moment) -> str:
        """An instant in a table cell: the table's title names the zone."""
        return self._show(moment, "")

    def _show(self, moment: Moment, suffix: str) -> str:
        at = _instant(moment)
        if at is None:
            return "-"
        shape = _SECONDS if self.seconds else _MINUTES
        return at.astimezone(zone(self.tz)).strftime(shape + suffix)


def _instant(moment: Moment) -> datetime | None:
    return from_text(moment) if isinstance(moment, str) else moment


def _same_minute(moments: Iterable[Moment]) -> bool:
    """Whether two different instants would read the same to the minute."""
    seen: dict[datetime, datetime] = {}
    for moment in moments:
        at = _instant(moment)
        if at is not None:
            minute = at.replace(second=0, microsecond=0)
            if seen.setdefault(minute, at) != at:
                return True
    return False


def _capacity_text(seats: int, tier: str | None) -> str:
    if not seats:
        return "no valid license (0 seats)"
    return f"{seats} seat(s), {tier} tier"


def _license_json(lic: License, now: datetime, paid_from: datetime | None) -> Any:
    return {
        "id": lic.id,
        "kind": lic.kind.value,
        "capacity": lic.capacity,
        "term_months": lic.term_months,
        "state": state_at(lic, now, paid_from).value,
        "issued_at": to_text(lic.issued_at),
        "imported_at": to_text(lic.imported_at),
        "activation_at": to_text(lic.activation_at),
        "expires_at": to_text(lic.expires_at),
        "stock_limit": to_text(lic.stock_limit),
        "invalidated_at": to_text(invalidated_at(lic, paid_from)),
    }


def _license_table(
    entries: Iterable[Any], clock: Clock, title: str | None = None
) -> Table:
    """Licenses with their ids, grouped by state, in under 100 columns."""
    # A heading per state instead of a state column; the capacity is in
    # the kind; the stock limit shows only while it matters, as an
    # available license's "activate by"; the issue date is 24 months
    # before it. With 32-character ids, a column more would wrap.
    table = _table("license", "kind", "activation", "expiry", title=title)
    for state, group in _by_state(entries).items():
        table.add_row(f"{state} ({len(group)})")
        for e in group:
            table.add_row(
                f"  {e['id']}",
                _kind_cell(e),
                _activation_cell(e, clock),
                clock.cell(e["expires_at"]),
            )
    return table


def _by_state(entries: Iterable[Any]) -> dict[State, list[Any]]:
    groups: dict[State, list[Any]] = {state: [] for state in State}
    for e in entries:
        groups[State(e["state"])].append(e)
    return {state: found for state, found in groups.items() if found}


def _license_moments(entries: Iterable[Any]) -> Iterator[str | None]:
    for e in entries:
        yield e["activation_at"]
        yield e["expires_at"]
        if e["state"] == State.AVAILABLE:
            yield e["stock_limit"]


def _kind_cell(entry: Any) -> str:
    """Basic 1, Basic 25, or Free with its size: a Cloud Free license's varies."""
    kind = Kind(entry["kind"])
    short = kind.label.removeprefix("Cloud ")
    return short if kind.paid else f"{short} {entry['capacity']}"


def _activation_cell(entry: Any, clock: Clock) -> str:
    if entry["state"] == State.AVAILABLE:
        return f"by {clock.cell(entry['stock_limit'])}"
    return clock.cell(entry["activation_at"])


# -- the root group --------------------------------------------------------------


@click.group(cls=ToolGroup)
@click.option(
    "--database",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("irm.db"),
    show_default=True,
    envvar="IRM_DATABASE",
    help="The SQLite file the gateway uses [env: IRM_DATABASE].",
)
@click.option(
    "--store",
    metavar="URL",
    envvar="IRM_STORE",
    callback=lambda ctx, param, value: _postgres_url(value),
    help="A postgresql:// URL shared by several gateways; used instead of "
    "--database [env: IRM_STORE].",
)
@click.option(
    "--vendor-key",
    metavar="PEM",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="IRM_VENDOR_PUBLIC_KEY",
    help="The vendor's public key that license codes are verified with "
    "[env: IRM_VENDOR_PUBLIC_KEY; default: the DEMO key, with a warning].",
)
@click.option(
    "--now",
    type=Instant(),
    envvar="IRM_NOW",
    help="For demos and tests: act as if the current time were this instant "
    "(ISO 8601; a bare date is midnight UTC, a date-time without an offset "
    "is UTC) [env: IRM_NOW; default: the real UTC clock]. What a command "
    "changes is dated then, and it warns so on stderr; licenses cannot be "
    "activated before their issue date.",
)
@click.version_option(package_name="irm-gateway")
@click.pass_context
def cli(
    ctx: click.Context,
    database: Path,
    store: str | None,
    vendor_key: Path | None,
    now: datetime | None,
) -> None:
    """irm-tool: manage tenants, licenses and routers of irm-gateway.

    Admins add tenants, import and activate license codes and watch their
    routers; the vendor makes its key pair and mints codes. Changes take
    effect in a running gateway within a second.

    Exit status: 0 done, 1 refused or failed (the reason is on stderr),
    2 a usage error.
    """
    settings = Settings(
        database, vendor_key, now or datetime.now(UTC), store, acting_as_of=now
    )
    ctx.obj = settings
    if ctx.invoked_subcommand == "move-tenant":
        # It opens both stores itself, and dates what it writes by --now.
        settings.warn_acting()


def _postgres_url(value: str | None) -> str | None:
    if value is not None and not is_postgres(value):
        raise click.BadParameter(f"{value!r} must be a postgresql:// URL")
    return value


# -- tenants ---------------------------------------------------------------------


@cli.group("tenant")
def tenant_group() -> None:
    """Add, list and inspect tenants."""


@tenant_group.command("add")
@click.argument("tenant")
@click.option(
    "--tz",
    default="UTC",
    show_default=True,
    metavar="ZONE",
    help="IANA time zone, e.g. Europe/Berlin: a date given without a time "
    "means midnight there.",
)
@pass_settings
def tenant_add(settings: Settings, tenant: str, tz: str) -> None:
    """Add TENANT (adding it again with the same zone changes nothing)."""
    _check_name(tenant, "tenant")
    zone(tz)
    settings.warn_acting()

    async def work(store: Store) -> bool:
        existed = await store.tenant(tenant) is not None
        twin = None if existed else await _case_twin(store, tenant)
        if twin is not None:
            raise BadInput(
                f"tenant {tenant!r} would differ from existing tenant "
                f"{twin.id!r} only in case"
            )
        await store.add_tenant(tenant, tz, settings.now)
        return existed

    existed = settings.run(work, create=True)
    said = "exists already" if existed else "added"
    click.echo(f"tenant {tenant} {said} (time zone {tz})")


@tenant_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@pass_settings
def tenant_list(settings: Settings, as_json: bool) -> None:
    """List the tenants with the capacity their licenses give now."""

    async def work(store: Store) -> list[Any]:
        found = []
        for tenant in await store.tenants():
            now = capacity_at(await store.licenses(tenant.id), settings.now)
            found.append(_tenant_json(tenant, now))
        return found

    tenants = settings.run(work)
    if as_json:
        _echo_json({"tenants": tenants})
        return
    table = _table("tenant", "time zone", "created", "seats now", "tier")
    seconds = _same_minute(t["created_at"] for t in tenants)
    for t in tenants:
        created = Clock(t["tz"], seconds).local(t["created_at"])
        table.add_row(t["tenant"], t["tz"], created, str(t["seats"]), t["tier"] or "-")
    _print(table, f"{len(tenants)} tenant(s)")


def _tenant_json(tenant: Tenant, now: Capacity) -> Any:
    return {
        "tenant": tenant.id,
        "tz": tenant.tz,
        "created_at": to_text(tenant.created_at),
        "seats": now.seats,
        "tier": now.tier,
    }


@tenant_group.command("show")
@click.argument("tenant")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@pass_settings
def tenant_show(settings: Settings, tenant: str, as_json: bool) -> None:
    """Show TENANT at a glance.

    Capacity now and at each license change over the coming 12 months
    (--json adds each month start), licenses by state with their dates,
    routers online, waiting and offline, and the next license change.
    """
    facts = settings.run(lambda store: _facts(store, tenant, routers=True))
    overview = _overview(facts, settings.now)
    if as_json:
        _echo_json(overview)
    else:
        _print_overview(overview)


def _overview(facts: Facts, now: datetime) -> Any:
    licenses, tz = facts.licenses, facts.tenant.tz
    paid_from = paid_since(licenses)
    by_state: dict[str, list[Any]] = {state.value: [] for state in State}
    for lic in licenses:
        entry = _license_json(lic, now, paid_from)
        by_state[entry["state"]].append(entry)
    return {
        "tenant": facts.tenant.id,
        "tz": tz,
        "created_at": to_text(facts.tenant.created_at),
        "now": to_text(now),
        "capacity": _capacity_json(capacity_at(licenses, now)),
        "timeline": _timeline(licenses, now, tz),
        "licenses": by_state,
        "routers": _router_counts(facts.routers),
        "next_event": next((p for _, p in _events(licenses, now, None)), None),
    }


def _capacity_json(capacity: Capacity) -> Any:
    return {"seats": capacity.seats, "tier": capacity.tier}


def _timeline(licenses: Sequence[License], now: datetime, tz: str) -> list[Any]:
    """Capacity now, at each license change and at each month start ahead."""
    end = add_months(now, TIMELINE_MONTHS)
    points = dict(_events(licenses, now, end))
    local = now.astimezone(zone(tz))
    first = datetime(local.year, local.month, 1)
    for n in range(1, TIMELINE_MONTHS + 2):
        start = start_of_day(add_months(first, n).date(), tz)
        if start <= end:
            points.setdefault(start, _point(licenses, start))
    points.setdefault(now, _point(licenses, now))
    return [points[at] for at in sorted(points)]


def _events(
    licenses: Sequence[License], after: datetime, until: datetime | None
) -> Iterator[tuple[datetime, Any]]:
    """The instants after ``after`` at which some license changes state."""
    at = next_change_after(licenses, after)
    while at is not None and (until is None or at <= until):
        point = _point(licenses, at)
        if point["changes"]:
            yield at, point
        at = next_change_after(licenses, at)


def _point(licenses: Sequence[License], at: datetime) -> Any:
    """Capacity at ``at`` and the license changes that happen at that instant."""
    paid_from = paid_since(licenses)
    changes = []
    for lic in licenses:
        before = state_at(lic, at - _JUST_BEFORE, paid_from)
        after = state_at(lic, at, paid_from)
        if before is not after:
            changes.append({"license": lic.id, "from": before.value, "to": after.value})
    return {
        "at": to_text(at),
        **_capacity_json(capacity_at(licenses, at)),
        "changes": changes,
    }


_ENTERS = {
    State.ACTIVE: ("becomes active", "become active"),
    State.EXPIRED: ("expires", "expire"),
    State.NON_REDEEMABLE: ("becomes non-redeemable", "become non-redeemable"),
    State.INVALIDATED: ("invalidated", "invalidated"),
}
"""What a license does at a timeline instant, said of one and of several."""


def _changes_text(changes: Iterable[Any], kinds: dict[str, str]) -> str:
    """License changes counted by kind and by the state entered, one phrase each."""
    counts = Counter((Kind(kinds[c["license"]]), State(c["to"])) for c in changes)
    order = sorted(counts, key=lambda key: (list(State).index(key[1]), key[0]))
    return ", ".join(_change_text(*key, counts[key]) for key in order) or "-"


def _change_text(kind: Kind, state: State, count: int) -> str:
    one, several = _ENTERS.get(state, (f"becomes {state}", f"become {state}"))
    return f"{count} × {kind.label} {one if count == 1 else several}"


def _print_overview(view: Any) -> None:
    tz, now, routers = view["tz"], view["capacity"], view["routers"]
    kinds = _license_kinds(view)
    timeline = _shown_points(view["timeline"])
    clock = Clock.showing(tz, _overview_moments(view, timeline))
    lines = [
        f"tenant {view['tenant']} (time zone {tz}), "
        f"created {clock.local(view['created_at'])}",
        f"capacity now ({clock.local(view['now'])}): "
        f"{_capacity_text(now['seats'], now['tier'])}",
        f"routers: {_router_summary(routers)}",
        "next change: " + _next_text(view["next_event"], kinds, clock),
    ]
    entries = [e for found in view["licenses"].values() for e in found]
    licenses = _license_table(entries, clock, f"licenses (times in {tz})")
    _print("\n".join(lines), licenses, _timeline_table(timeline, kinds, clock))


def _timeline_table(
    timeline: Sequence[Any], kinds: dict[str, str], clock: Clock
) -> Table | str:
    if len(timeline) < 2:
        return f"capacity, next {TIMELINE_MONTHS} months: no change"
    title = f"capacity, next {TIMELINE_MONTHS} months (times in {clock.tz})"
    table = _table("at", "seats", "tier", "changes", title=title)
    for p in timeline:
        changes = _changes_text(p["changes"], kinds)
        table.add_row(clock.cell(p["at"]), str(p["seats"]), p["tier"] or "-", changes)
    return table


def _next_text(point: Any, kinds: dict[str, str], clock: Clock) -> str:
    # Not the capacity it leads to, which the timeline shows: with it, a
    # paid license that invalidates Cloud Free would not fit one line.
    if point is None:
        return "none"
    return f"{clock.local(point['at'])}: {_changes_text(point['changes'], kinds)}"


def _license_kinds(view: Any) -> dict[str, str]:
    return {e["id"]: e["kind"] for found in view["licenses"].values() for e in found}


def _shown_points(timeline: Sequence[Any]) -> list[Any]:
    """Now, then only the instants at which capacity, tier or a license changes.

    --json keeps every month start too; on a terminal they only repeat
    the row above them.
    """
    shown = list(timeline[:1])
    for point in timeline[1:]:
        last = shown[-1]
        moved = (point["seats"], point["tier"]) != (last["seats"], last["tier"])
        if point["changes"] or moved:
            shown.append(point)
    return shown


def _overview_moments(view: Any, timeline: Sequence[Any]) -> Iterator[str | None]:
    yield view["created_at"]
    yield from (point["at"] for point in timeline)
    if view["next_event"] is not None:
        yield view["next_event"]["at"]
    for found in view["licenses"].values():
        yield from _license_moments(found)


# -- import ----------------------------------------------------------------------

Planner = Callable[[set[str], dict[str, str]], imports.ImportPlan]
"""Plans an import, given the ids the tenant holds and every id's owner."""


@cli.command("import")
@click.argument("code", required=False)
@click.option("--tenant", required=True, help="The tenant to import into.")
@click.option(
    "--csv",
    "csv_path",
    metavar="FILE",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Import every code of a sales CSV file, all or nothing. Delimiters "
    f"',', ';' or tab; {csvimport.LIMITS_TEXT} (a sales CSV of 100,000 "
    "codes is about 33 MiB, a row about 330 characters).",
)
@click.option("--dry-run", is_flag=True, help="Show what would happen; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@pass_settings
def import_command(
    settings: Settings,
    code: str | None,
    tenant: str,
    csv_path: Path | None,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Import one license CODE ('-' reads it from stdin) or a --csv file.

    Codes are verified with the vendor key. A file is imported all or
    nothing: if any row is bad, every problem of every bad row is listed
    by its line and nothing is stored. A file larger than any sales CSV
    (see --csv) is refused before it is read. A code the tenant holds
    already is reported as already present. Imported licenses are
    available until activated.
    """
    if (code is None) == (csv_path is None):
        raise click.UsageError("give either one license CODE or --csv FILE")
    if not dry_run:
        settings.warn_acting()
    key = settings.public_key()
    if csv_path is None:
        assert code is not None
        ids, planner = _code_planner(_code_text(code), key, tenant, settings.now)
    else:
        ids, planner = _csv_planner(csv_path, key, tenant, settings.now)

    plan = settings.run(
        lambda store: _import(store, tenant, ids, planner, settings.now, dry_run),
    )
    report = _import_json(plan, tenant, dry_run)
    if as_json:
        _echo_json(report)
    else:
        _print_import(report, from_file=csv_path is not None)


def _code_text(code: str) -> str:
    # "-" keeps a bearer code out of the shell history and process list.
    return sys.stdin.read() if code == "-" else code


def _code_planner(
    code: str, key: Ed25519PublicKey, tenant: str, now: datetime
) -> tuple[list[str], Planner]:
    def plan(present: set[str], owners: dict[str, str]) -> imports.ImportPlan:
        return imports.plan_code(code, key, tenant, now, present, owners)

    return [codes.verify(code, key).id], plan


def _csv_planner(
    path: Path, key: Ed25519PublicKey, tenant: str, now: datetime
) -> tuple[list[str], Planner]:
    try:
        # A file far larger than any sales CSV is refused unread.
        csvimport.check_file_size(path.stat().st_size)
        data = path.read_bytes()
    except OSError as exc:
        raise BadInput(f"cannot read {path}: {exc.strerror}") from exc
    decoded = imports.decode_csv(data, key)

    def plan(present: set[str], owners: dict[str, str]) -> imports.ImportPlan:
        return imports.plan_import(decoded, tenant, now, present, owners)

    return [payload.id for _, payload, _ in decoded[0]], plan


async def _import(
    store: Store,
    tenant: str,
    ids: list[str],
    planner: Planner,
    now: datetime,
    dry_run: bool,
) -> imports.ImportPlan:
    await _tenant(store, tenant)
    owners = await store.owners(ids)
    plan = planner({i for i, owner in owners.items() if owner == tenant}, owners)

    if plan.new and not dry_run:
        items = [
            (imports.license_from(payload, tenant, now), code)
            for _, payload, code in plan.new
        ]
        await store.add_licenses(tenant, items, now, actor=ADMIN)
    return plan


def _import_json(plan: imports.ImportPlan, tenant: str, dry_run: bool) -> Any:
    new = [
        {
            "line": line,
            "license": payload.id,
            "kind": payload.kind.value,
            "capacity": payload.capacity,
            "term_months": payload.term_months,
            "issued_at": to_text(payload.issued_at),
            "code": codes.fingerprint(code),
        }
        for line, payload, code in plan.new
    ]
    present = [{"line": line, "license": lid} for line, lid in plan.already_present]
    return {
        "tenant": tenant,
        "dry_run": dry_run,
        "new": new,
        "already_present": present,
    }


def _print_import(report: Any, from_file: bool) -> None:
    def where(line: int) -> str:
        return f"line {line}: " if from_file else ""

    verb = "would import" if report["dry_run"] else "imported"
    done = "would be imported" if report["dry_run"] else "imported"
    for row in report["new"]:
        click.echo(
            f"{where(row['line'])}{verb} license {row['license']} "
            f"({Kind(row['kind']).label}, {row['capacity']} router(s), "
            f"{row['term_months']} months, issued {row['issued_at'][:10]}, "
            f"code {row['code']})"
        )
    for row in report["already_present"]:
        click.echo(
            f"{where(row['line'])}license {row['license']} is already present "
            f"in tenant {report['tenant']}: nothing to do"
        )
    new, present = len(report["new"]), len(report["already_present"])
    summary = f"{new} {done}, {present} already present"
    if report["dry_run"]:
        summary = f"dry run, nothing written: {summary}"
    click.echo(f"tenant {report['tenant']}: {summary}")


# -- activate --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Activation:
    """The tenant's licenses before and after, and which ones were activated."""

    tenant: Tenant
    before: list[License]
    after: list[License]
    changed: list[License]


@cli.command("activate")
@click.argument("license_ids", nargs=-1, metavar="[LICENSE_ID]...")
@click.option("--tenant", required=True, help="The tenant whose licenses to activate.")
@click.option(
    "--all-available", is_flag=True, help="Activate every available license too."
)
@click.option(
    "--at",
    "at_text",
    metavar="DATE-OR-DATETIME",
    help="When the licenses become active (default: now): a date, midnight "
    "in the tenant's time zone, or an ISO 8601 date-time. A date-time "
    "without an offset (Z or +01:00) is read in the tenant's time zone, and "
    "refused if that wall time is skipped or repeated there when the clocks "
    "change; give an offset to name such an instant.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@pass_settings
def activate_command(
    settings: Settings,
    license_ids: tuple[str, ...],
    tenant: str,
    all_available: bool,
    at_text: str | None,
    as_json: bool,
) -> None:
    """Activate licenses now or schedule them for a later instant.

    All or nothing: if the rules refuse any one license, none is activated
    and the message names the license and the rule. A paid license makes
    an active or scheduled Cloud Free license invalid, for good.
    """
    if not license_ids and not all_available:
        raise click.UsageError(
            "name the LICENSE_IDs to activate or give --all-available"
        )
    settings.warn_acting()
    done = settings.run(
        lambda store: _activate(
            store, tenant, license_ids, all_available, at_text, settings.now
        ),
    )
    report = _activation_json(done, settings.now)
    if as_json:
        _echo_json(report)
    else:
        _print_activation(report, done.tenant.tz)


async def _activate(
    store: Store,
    name: str,
    ids: Sequence[str],
    all_available: bool,
    at_text: str | None,
    now: datetime,
) -> Activation:
    tenant = await _tenant(store, name)
    before = await store.licenses(name)
    at = now if at_text is None else parse_instant(at_text, tenant.tz)
    chosen = _choose(tenant, before, ids, all_available, now)
    after, changed = _schedule(before, chosen, at, now)

    if changed:
        paid_from = paid_since(after)
        states = {lic.id: state_at(lic, now, paid_from) for lic in changed}
        await store.save_activations(name, changed, states, now, actor=ADMIN)
    return Activation(tenant, before, after, changed)


def _choose(
    tenant: Tenant,
    licenses: Sequence[License],
    ids: Sequence[str],
    all_available: bool,
    now: datetime,
) -> list[str]:
    known = {lic.id for lic in licenses}
    unknown = [lid for lid in ids if lid not in known]
    if unknown:
        raise BadInput(f"tenant {tenant.id} has no license {', '.join(unknown)}")
    chosen = list(ids)
    if all_available:
        paid_from = paid_since(licenses)
        available = [
            lic for lic in licenses if state_at(lic, now, paid_from) is State.AVAILABLE
        ]
        # Paid first: a Cloud Free license in the same sweep is then refused
        # by the rules, instead of being activated and invalidated at once.
        available.sort(key=lambda lic: not lic.kind.paid)
        chosen += [lic.id for lic in available]
    return list(dict.fromkeys(chosen))


def _schedule(
    licenses: Sequence[License], ids: Sequence[str], at: datetime, now: datetime
) -> tuple[list[License], list[License]]:
    """Activate each license in turn against the growing list of the tenant's."""
    current = list(licenses)
    changed: list[License] = []
    for lid in ids:
        index = next(i for i, lic in enumerate(current) if lic.id == lid)
        current[index] = activate(current[index], at, now, current)
        changed.append(current[index])
    return current, changed


def _free_invalidated(done: Activation) -> list[tuple[License, datetime]]:
    """Cloud Free licenses this activation invalidates, and from when."""
    old_paid, new_paid = paid_since(done.before), paid_since(done.after)
    old = {lic.id: lic for lic in done.before}
    found: list[tuple[License, datetime]] = []
    for lic in done.after:
        when = invalidated_at(lic, new_paid)
        if when is not None and when != invalidated_at(old[lic.id], old_paid):
            found.append((lic, when))
    return found


def _activation_json(done: Activation, now: datetime) -> Any:
    paid_from = paid_since(done.after)
    invalidates = [
        {"license": lic.id, "at": to_text(at)} for lic, at in _free_invalidated(done)
    ]
    return {
        "tenant": done.tenant.id,
        "now": to_text(now),
        "activated": [_license_json(lic, now, paid_from) for lic in done.changed],
        "invalidates": invalidates,
    }


def _print_activation(report: Any, tz: str) -> None:
    if not report["activated"]:
        click.echo(f"tenant {report['tenant']} has no available license: nothing done")
        return
    invalid = [item["at"] for item in report["invalidates"]]
    clock = Clock.showing(tz, [*_license_moments(report["activated"]), *invalid])
    scheduled = sum(e["state"] == State.SCHEDULED for e in report["activated"])
    now = len(report["activated"]) - scheduled
    parts = [f"{now} license(s) activated"] if now else []
    parts += [f"{scheduled} license(s) scheduled"] if scheduled else []
    done = f"tenant {report['tenant']}: {' and '.join(parts)}"
    _print(_license_table(report["activated"], clock), f"{done}, times in {tz}")
    for item in report["invalidates"]:
        click.echo(
            f"warning: Cloud Free license {item['license']} becomes invalid for "
            f"good at {clock.local(item['at'])}, when a paid license becomes "
            "active: Cloud Free is never combined with paid licenses"
        )


@cli.command("unschedule")
@click.argument("license_ids", nargs=-1, metavar="[LICENSE_ID]...")
@click.option(
    "--tenant", required=True, help="The tenant whose licenses to unschedule."
)
@click.option(
    "--all-scheduled", is_flag=True, help="Unschedule every scheduled license too."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@pass_settings
def unschedule_command(
    settings: Settings,
    license_ids: tuple[str, ...],
    tenant: str,
    all_scheduled: bool,
    as_json: bool,
) -> None:
    """Cancel scheduled activations (activate --at) before their instant.

    Each license is available again, with its stock limit unchanged, to be
    activated or scheduled later. All or nothing: a license that is not
    scheduled (or becomes active within seconds) is refused, naming the
    license and the rule, and none is changed.
    """
    if not license_ids and not all_scheduled:
        raise click.UsageError(
            "name the LICENSE_IDs to unschedule or give --all-scheduled"
        )
    settings.warn_acting()
    tenant_row, cancelled, paid_from = settings.run(
        lambda store: _unschedule(
            store, tenant, license_ids, all_scheduled, settings.now
        ),
    )
    items: list[dict[str, Any]] = [
        {
            **_license_json(replace(lic, activation_at=None), settings.now, paid_from),
            "cancelled_activation_at": to_text(lic.activation_at),
        }
        for lic in cancelled
    ]
    report = {"tenant": tenant, "now": to_text(settings.now), "unscheduled": items}
    if as_json:
        _echo_json(report)
        return
    if not cancelled:
        click.echo(f"tenant {tenant} has no scheduled license: nothing done")
        return
    moments = [
        m for e in items for m in (e["cancelled_activation_at"], e["stock_limit"])
    ]
    clock = Clock.showing(tenant_row.tz, moments)
    table = _table("license", "kind", "cancelled activation", "activate by")
    for e in items:
        table.add_row(
            e["id"],
            _kind_cell(e),
            clock.cell(e["cancelled_activation_at"]),
            clock.cell(e["stock_limit"]),
        )
    done = f"tenant {tenant}: {len(items)} scheduled activation(s) cancelled"
    _print(table, f"{done}, available again; times in {tenant_row.tz}")


async def _unschedule(
    store: Store, name: str, ids: Sequence[str], all_scheduled: bool, now: datetime
) -> tuple[Tenant, list[License], datetime | None]:
    """Cancel the activations: the licenses as they were, instants included,
    and when a paid license is active from afterwards."""
    tenant = await _tenant(store, name)
    licenses = await store.licenses(name)
    by_id = {lic.id: lic for lic in licenses}
    unknown = [lid for lid in ids if lid not in by_id]
    if unknown:
        raise BadInput(f"tenant {tenant.id} has no license {', '.join(unknown)}")
    chosen = list(ids)
    if all_scheduled:
        paid_from = paid_since(licenses)
        chosen += [
            lic.id
            for lic in licenses
            if state_at(lic, now, paid_from) is State.SCHEDULED
        ]
    cancelled = [by_id[lid] for lid in dict.fromkeys(chosen)]
    for lic in cancelled:
        cancel_activation(lic, now, licenses)
    if cancelled:
        await store.cancel_activations(name, cancelled, now, actor=ADMIN)
    gone = {lic.id for lic in cancelled}
    after = [lic for lic in licenses if lic.id not in gone]
    return tenant, cancelled, paid_since(after)


# -- licenses --------------------------------------------------------------------


@cli.command("licenses")
@click.option("--tenant", required=True, help="The tenant whose licenses to list.")
@click.option(
    "--state",
    type=click.Choice([state.value for state in State]),
    help="Only licenses in this state now.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@pass_settings
def licenses_command(
    settings: Settings, tenant: str, state: str | None, as_json: bool
) -> None:
    """List a tenant's licenses with their state now and their dates."""
    facts = settings.run(lambda store: _facts(store, tenant))
    paid_from = paid_since(facts.licenses)
    entries = [_license_json(lic, settings.now, paid_from) for lic in facts.licenses]
    entries = [e for e in entries if state is None or e["state"] == state]

    if as_json:
        _echo_json(
            {"tenant": tenant, "now": to_text(settings.now), "licenses": entries}
        )
        return
    tz = facts.tenant.tz
    table = _license_table(entries, Clock.showing(tz, _license_moments(entries)))
    _print(table, f"{len(entries)} license(s), times in {tz}")


# -- routers ---------------------------------------------------------------------


@cli.group("routers", invoke_without_command=True)
@click.option("--tenant", help="The tenant whose routers to list.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def routers_group(ctx: click.Context, tenant: str | None, as_json: bool) -> None:
    """List a tenant's routers: online, waiting in line, or offline.

    A waiting router is connected but has no seat; its place is its
    position in the line, in arrival order.
    """
    if ctx.invoked_subcommand is not None:
        return
    if tenant is None:
        raise click.UsageError("give --tenant to list its routers", ctx)
    settings = ctx.find_object(Settings)
    assert settings is not None, "the root group sets it"
    facts = settings.run(lambda store: _facts(store, tenant, routers=True))
    rows = _routers_json(facts.routers)
    if as_json:
        _echo_json({"tenant": tenant, "routers": rows})
    else:
        _print_routers(rows, _router_counts(facts.routers), facts.tenant.tz)


def _routers_json(routers: Sequence[RouterRow]) -> list[Any]:
    waiting = sorted(
        (r for r in routers if r.state == "waiting"), key=lambda r: r.arrival or 0
    )
    position = {r.router: n for n, r in enumerate(waiting, start=1)}
    return [
        {
            "router": r.router,
            "state": r.state,
            "online": r.state == "online",
            "position": position.get(r.router),
            "epoch": r.epoch,
            "since": to_text(r.changed_at),
        }
        for r in routers
    ]


def _router_counts(routers: Iterable[RouterRow]) -> dict[str, int]:
    counts = dict.fromkeys(_ROUTER_STATES, 0)
    for router in routers:
        counts[router.state] += 1
    return counts


def _print_routers(rows: Sequence[Any], counts: dict[str, int], tz: str) -> None:
    table = _table("router", "state", "place", "epoch", "since")
    clock = Clock.showing(tz, (r["since"] for r in rows))
    for r in rows:
        place = "-" if r["position"] is None else str(r["position"])
        table.add_row(
            r["router"], r["state"], place, str(r["epoch"]), clock.cell(r["since"])
        )
    _print(table, f"{_router_summary(counts)}; times in {tz}")


def _router_summary(counts: dict[str, int]) -> str:
    """As the fleet and presence say it: a waiting router is shown offline."""
    offline = counts["waiting"] + counts["offline"]
    waiting = counts["waiting"]
    return f"{counts['online']} online, {offline} offline ({waiting} waiting in line)"


@routers_group.command("register")
@click.argument("routers", nargs=-1, required=True, metavar="ROUTER...")
@click.option("--tenant", help="The tenant the routers belong to.")
@click.pass_context
def routers_register(
    ctx: click.Context, routers: tuple[str, ...], tenant: str | None
) -> None:
    """Register ROUTERs with a tenant (known ones are left as they are)."""
    parent = ctx.parent.params.get("tenant") if ctx.parent else None
    name = tenant or parent
    if name is None:
        raise click.UsageError("give --tenant to register routers with", ctx)
    for router in routers:
        _check_name(router, "router")
        refuse_reserved(router)
    settings = ctx.find_object(Settings)
    assert settings is not None, "the root group sets it"
    settings.warn_acting()

    async def work(store: Store) -> list[str]:
        await _tenant(store, name)
        return await store.register_routers(name, routers, settings.now, actor=ADMIN)

    new = settings.run(work)
    known = [r for r in dict.fromkeys(routers) if r not in new]
    click.echo(
        f"tenant {name}: registered {len(new)} router(s): {' '.join(new) or '-'}"
    )
    if known:
        click.echo(f"already registered: {' '.join(known)}")


# -- audit -----------------------------------------------------------------------


@cli.command("audit")
@click.option("--tenant", required=True, help="The tenant whose log to show.")
@click.option("--license", "license_id", metavar="ID", help="Only this license.")
@click.option("--router", metavar="ROUTER", help="Only this router.")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=200,
    show_default=True,
    help="Show the latest N entries.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@pass_settings
def audit_command(
    settings: Settings,
    tenant: str,
    license_id: str | None,
    router: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """Show the audit log: every change, when, and by whom or which rule."""
    subject, subject_id = _subject(license_id, router)

    async def work(store: Store) -> tuple[Tenant, list[AuditEntry]]:
        found = await _tenant(store, tenant)
        return found, await store.audit(tenant, subject, subject_id, limit)

    found, entries = settings.run(work)
    rows = [_entry_json(entry) for entry in entries]
    if as_json:
        _echo_json({"tenant": tenant, "entries": rows})
        return
    table = _table("at", "subject", "event", "detail", "actor")
    clock = Clock.showing(found.tz, (r["at"] for r in rows))
    for r in rows:
        detail = ", ".join(f"{k}={_plain(v)}" for k, v in r["detail"].items())
        subject_text = f"{r['subject']} {r['subject_id']}"
        table.add_row(clock.cell(r["at"]), subject_text, r["event"], detail, r["actor"])
    count = f"{len(rows)} entr{'y' if len(rows) == 1 else 'ies'}"
    _print(table, f"{count}, times in {found.tz}")


def _subject(
    license_id: str | None, router: str | None
) -> tuple[str | None, str | None]:
    if license_id is not None and router is not None:
        raise click.UsageError("give --license or --router, not both")
    if license_id is not None:
        return "license", license_id
    return ("router", router) if router is not None else (None, None)


def _entry_json(entry: AuditEntry) -> Any:
    return {
        "seq": entry.seq,
        "at": to_text(entry.at),
        "subject": entry.subject,
        "subject_id": entry.subject_id,
        "event": entry.event,
        "detail": entry.detail,
        "actor": entry.actor,
    }


def _plain(value: Any) -> str:
    return "-" if value is None else str(value)


# -- vendor ----------------------------------------------------------------------


@cli.group("vendor")
def vendor_group() -> None:
    """The vendor's side: make the key pair and mint license codes.

    The private key signs codes; it belongs to the vendor and never goes
    onto a gateway. Gateways and admins get only the public key.
    """


@vendor_group.command("keygen")
@click.option(
    "--private",
    "private_path",
    required=True,
    metavar="PATH",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the private key (created readable by you only).",
)
@click.option(
    "--public",
    "public_path",
    required=True,
    metavar="PATH",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the public key for gateways and admins.",
)
@click.option(
    "--encrypt", is_flag=True, help="Protect the private key with a password (asked)."
)
def vendor_keygen(private_path: Path, public_path: Path, encrypt: bool) -> None:
    """Make a new Ed25519 vendor key pair; existing files are never replaced."""
    password = None
    if encrypt:
        password = click.prompt(
            "Password for the private key",
            hide_input=True,
            confirmation_prompt=True,
            err=True,
        ).encode()
    keys.generate_keypair(private_path, public_path, password)
    click.echo(f"wrote private key {private_path} (keep it secret, off every gateway)")
    click.echo(f"wrote public key {public_path} (give it to gateways and admins)")


@vendor_group.command("mint")
@click.option(
    "--kind",
    required=True,
    type=click.Choice([kind.value for kind in Kind]),
    help="The kind of license.",
)
@click.option(
    "--count",
    type=click.IntRange(1, 100_000),
    default=1,
    show_default=True,
    help="How many codes.",
)
@click.option(
    "--capacity",
    type=click.IntRange(1, FREE_MAX_CAPACITY),
    help=f"Cloud Free only: routers it admits [default: {FREE_MAX_CAPACITY}].",
)
@click.option(
    "--term-months",
    type=click.IntRange(1, codes.MAX_TERM_MONTHS),
    default=12,
    show_default=True,
    help="Term in calendar months from activation (Cloud Free: always 12).",
)
@click.option(
    "--issued",
    type=Instant(),
    metavar="DATE",
    help="Issue date or instant (a bare date is midnight UTC, a date-time "
    "without an offset is UTC) [default: now]; the 2-year stock limit "
    "counts from here.",
)
@click.option(
    "--key",
    "key_path",
    metavar="PRIVATE_PEM",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="IRM_VENDOR_PRIVATE_KEY",
    help="The vendor's private key [env: IRM_VENDOR_PRIVATE_KEY; default: "
    "the DEMO key, with a warning].",
)
@click.option(
    "--csv",
    "csv_out",
    metavar="OUT",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the sales CSV to this new file instead of printing codes.",
)
@click.option(
    "--german",
    is_flag=True,
    help="With --csv: write it as a German spreadsheet saves it (BOM, ';', CRLF).",
)
@pass_settings
def vendor_mint(
    settings: Settings,
    kind: str,
    count: int,
    capacity: int | None,
    term_months: int,
    issued: datetime | None,
    key_path: Path | None,
    csv_out: Path | None,
    german: bool,
) -> None:
    """Mint signed license codes: one per line, or a sales CSV with --csv."""
    chosen = Kind(kind)
    if capacity is not None and chosen.paid:
        raise click.UsageError(
            f"--capacity is for cloud-free only; {chosen.label} is fixed"
        )
    if german and csv_out is None:
        raise click.UsageError("--german only applies with --csv")
    size = _capacity_of(chosen, capacity)
    key = _private_key(key_path)

    if issued is None:
        settings.warn_acting(": the codes are issued then")
    when = issued or settings.now
    minted = []
    for _ in range(count):
        payload = codes.CodePayload(
            codes.new_license_id(), chosen, size, term_months, when
        )
        minted.append((payload, codes.mint(key, payload)))

    if csv_out is None:
        for _, code in minted:
            click.echo(code)
        return
    _write_new(csv_out, csvimport.write_sales_csv(minted, german=german))
    click.echo(f"wrote {count} {chosen.label} code(s) to {csv_out}")


def _capacity_of(kind: Kind, capacity: int | None) -> int:
    if kind is Kind.FREE:
        return FREE_MAX_CAPACITY if capacity is None else capacity
    return PAID_CAPACITY[kind]


def _private_key(path: Path | None) -> Ed25519PrivateKey:
    if path is None:
        _warn_demo(keys.DEMO_PRIVATE_KEY_PATH, "--key or IRM_VENDOR_PRIVATE_KEY")
        return keys.load_private_key(keys.DEMO_PRIVATE_KEY_PATH)
    password = None
    if _encrypted(path):
        password = click.prompt(f"Password for {path}", hide_input=True, err=True)
    return keys.load_private_key(path, password.encode() if password else None)


def _encrypted(path: Path) -> bool:
    try:
        with path.open("rb") as file:
            return b"ENCRYPTED" in file.readline()
    except OSError:
        return False  # load_private_key reports the unreadable file


def _write_new(path: Path, data: bytes) -> None:
    # "x": minted codes are never written over an earlier file of codes.
    try:
        with path.open("xb") as file:
            file.write(data)
    except FileExistsError as exc:
        raise BadInput(f"{path} exists; refusing to overwrite it") from exc
    except OSError as exc:
        raise BadInput(f"cannot write {path}: {exc.strerror}") from exc


# -- the rest ---------------------------------------------------------------------

cli.add_command(fleet_command, "fleet")
cli.add_command(status_command, "status")
cli.add_command(contacts_group, "contacts")
cli.add_command(reminders_group, "reminders")
cli.add_command(accounts_group, "accounts")
cli.add_command(move_command, "move-tenant")


def main() -> None:
    """The ``irm-tool`` console script."""
    # The MQTT client logs a refused login itself, packet bytes and all; the
    # commands say what went wrong in the admin's words instead.
    logging.getLogger("gmqtt").addHandler(logging.NullHandler())
    logging.getLogger("gmqtt").propagate = False
    cli.main(prog_name="irm-tool")


if __name__ == "__main__":
    main()
