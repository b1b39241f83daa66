"""``irm-tool contacts`` and ``irm-tool reminders``: who is told, and when.

A tenant's contacts get the expiry reminders (policy/reminders.py says
which is due). The gateway sends them on its own schedule;
``reminders send`` sends the due ones by hand, with the same claims in the
store, so a reminder goes out once whichever sends it.

The root group (tools/cli.py) hands every command its settings as the
context object and turns the project's errors into ``irm-tool: <message>``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

import click
from email_validator import EmailNotValidError, validate_email
from rich import box
from rich.console import Console
from rich.table import Table

from gateway.mail import SENDER_PATTERN, SENDER_RULE, Pass, Reminders, Smtp
from policy.errors import BadInput, IrmError
from policy.reminders import due, unrecorded
from policy.store import ReminderMail, Store, Tenant
from policy.timeutil import from_text, to_text, zone

if TYPE_CHECKING:
    from tools.cli import Settings

T = TypeVar("T")
ADMIN = "admin"
_SHOWN = "%Y-%m-%d %H:%M"
PIPE_WIDTH = 200


async def _tenant(store: Store, name: str) -> Tenant:
    found = await store.tenant(name)
    if found is None:
        raise BadInput(
            f"unknown tenant {name!r}: add it first with 'irm-tool tenant add {name}'"
        )
    return found


def _address(value: str) -> str:
    """The address in its normal form, or an error naming it and the rule."""
    try:
        # Syntax only: the tool may run where DNS does not reach the domain.
        return validate_email(value, check_deliverability=False).normalized
    except EmailNotValidError as exc:
        raise BadInput(
            f"contact address {value!r} is not an e-mail address: {exc}"
        ) from exc


def _print(*items: Table | str) -> None:
    # As tools/cli.py does: whole lines to a pipe, where scripts use --json.
    console = Console(highlight=False, markup=False, emoji=False)
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        console.width = PIPE_WIDTH
    for item in items:
        console.print(item)


def _table(*columns: str, title: str | None = None) -> Table:
    table = Table(
        box=box.SIMPLE_HEAD, title=title, title_justify="left", show_edge=False,
        pad_edge=False, collapse_padding=True,
    )  # fmt: skip
    for column in columns:
        table.add_column(column, no_wrap=column == "license", overflow="fold")
    return table


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


def _local(moment: datetime | None, tz: str) -> str:
    return "-" if moment is None else moment.astimezone(zone(tz)).strftime(_SHOWN)


# -- contacts --------------------------------------------------------------------


@click.group("contacts")
def contacts_group() -> None:
    """The addresses that get a tenant's expiry reminders."""


@contacts_group.command("add")
@click.argument("addresses", nargs=-1, required=True, metavar="ADDRESS...")
@click.option("--tenant", required=True, help="The tenant the contacts are for.")
@click.pass_obj
def contacts_add(settings: Settings, addresses: tuple[str, ...], tenant: str) -> None:
    """Add contacts; an address the tenant has already is left as it is."""
    wanted = [_address(a) for a in addresses]

    async def work(store: Store) -> list[str]:
        await _tenant(store, tenant)
        # Mail systems treat the local part without regard to case, so
        # OPS@acme.example beside ops@acme.example would get every mail twice.
        have = {a.casefold() for a in await store.contacts(tenant)}
        fresh = [a for a in dict.fromkeys(wanted) if a.casefold() not in have]
        unique = list({a.casefold(): a for a in reversed(fresh)}.values())[::-1]
        return await store.add_contacts(tenant, unique, settings.now, ADMIN)

    added = settings.run(work)
    for address in wanted:
        said = "added" if address in added else "already a contact"
        click.echo(f"{address}: {said}")


@contacts_group.command("remove")
@click.argument("addresses", nargs=-1, required=True, metavar="ADDRESS...")
@click.option("--tenant", required=True, help="The tenant the contacts are for.")
@click.pass_obj
def contacts_remove(
    settings: Settings, addresses: tuple[str, ...], tenant: str
) -> None:
    """Remove contacts; naming one the tenant does not have is an error."""
    wanted = [_address(a) for a in addresses]

    async def work(store: Store) -> list[str]:
        await _tenant(store, tenant)
        unknown = set(wanted) - set(await store.contacts(tenant))
        if unknown:
            raise BadInput(
                f"{', '.join(sorted(unknown))}: not a contact of tenant {tenant}; "
                "nothing was removed"
            )
        return await store.remove_contacts(tenant, wanted, settings.now, ADMIN)

    for address in settings.run(work):
        click.echo(f"{address}: removed")


@contacts_group.command("list")
@click.option("--tenant", required=True, help="The tenant whose contacts to list.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_obj
def contacts_list(settings: Settings, tenant: str, as_json: bool) -> None:
    """List a tenant's contacts."""

    async def work(store: Store) -> list[str]:
        await _tenant(store, tenant)
        return await store.contacts(tenant)

    found = settings.run(work)
    if as_json:
        _echo_json({"tenant": tenant, "contacts": found})
        return
    for address in found:
        click.echo(address)
    click.echo(f"{len(found)} contact(s) of tenant {tenant}")


# -- reminders --------------------------------------------------------------------


@click.group("reminders", invoke_without_command=True)
@click.option("--tenant", help="Only this tenant.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def reminders_group(ctx: click.Context, tenant: str | None, as_json: bool) -> None:
    """Show the expiry reminders due now and the mails claimed or sent.

    A reminder goes out at 30, 23, 16, 9 and 2 days before a license
    expires, once. The gateway sends them when given --smtp-host;
    'reminders send' sends the due ones now.
    """
    if ctx.invoked_subcommand is not None:
        return
    settings: Settings = ctx.obj
    view = settings.run(lambda store: _overview(store, tenant, settings.now))
    if as_json:
        _echo_json({"now": to_text(settings.now), "tenants": view})
    else:
        _print_overview(view)


async def _overview(store: Store, only: str | None, now: datetime) -> list[Any]:
    tenants = [await _tenant(store, only)] if only else await store.tenants()
    view = []
    for tenant in tenants:
        recorded = await store.reminder_steps(tenant.id)
        dues = unrecorded(due(await store.licenses(tenant.id), now), recorded)
        mails = await store.reminder_mails(tenant.id)
        view.append(
            {
                "tenant": tenant.id,
                "tz": tenant.tz,
                "contacts": await store.contacts(tenant.id),
                "due": [
                    _step_json(d.license.id, d.days, d.at, d.expires_at) for d in dues
                ],
                "mails": [_mail_json(m) for m in mails],
            }
        )
    return view


def _step_json(license_id: str, days: int, at: datetime, expires: datetime) -> Any:
    return {
        "license": license_id,
        "days": days,
        "due_at": to_text(at),
        "expires_at": to_text(expires),
    }


def _mail_json(mail: ReminderMail) -> Any:
    return {
        "mail": mail.mail,
        "state": mail.state,
        "to": list(mail.recipients),
        "steps": [
            _step_json(s.license, s.days, s.due_at, s.expires_at) for s in mail.steps
        ],
        "claimed_at": to_text(mail.claimed_at),
        "claimed_by": mail.claimed_by,
        "attempts": mail.attempts,
        "next_attempt_at": to_text(mail.next_attempt_at),
        "sent_at": to_text(mail.sent_at),
        "last_error": mail.last_error,
    }


def _print_overview(view: Sequence[Any]) -> None:
    for t in view:
        tz = t["tz"]
        table = _table(
            "license", "days before", "due at", "expires", "state", "sent at",
            title=f"tenant {t['tenant']}, times in {tz}",
        )  # fmt: skip
        for d in t["due"]:
            table.add_row(
                d["license"], str(d["days"]), _at(d["due_at"], tz),
                _at(d["expires_at"], tz), "due", "-",
            )  # fmt: skip
        for m in reversed(t["mails"]):
            for s in m["steps"]:
                table.add_row(
                    s["license"], str(s["days"]), _at(s["due_at"], tz),
                    _at(s["expires_at"], tz), _state_text(m), _at(m["sent_at"], tz),
                )  # fmt: skip
        contacts = ", ".join(t["contacts"]) or "none: add one with 'contacts add'"
        _print(table, f"contacts: {contacts}", "")


def _at(text: str | None, tz: str) -> str:
    return _local(from_text(text), tz)


def _state_text(mail: Any) -> str:
    if mail["state"] == "waiting" and mail["attempts"]:
        return f"retrying ({mail['attempts']} attempts): {mail['last_error']}"
    if mail["state"] == "dropped":
        return f"dropped: {mail['last_error']}"
    return str(mail["state"])


@reminders_group.command("send")
@click.option("--tenant", help="Only this tenant.")
@click.option(
    "--smtp-host", required=True, envvar="IRM_SMTP_HOST", show_envvar=True,
    help="Mail server, as the gateway's --smtp-host.",
)  # fmt: skip
@click.option(
    "--smtp-port", default=587, type=click.IntRange(1, 65535),
    envvar="IRM_SMTP_PORT", show_envvar=True, show_default=True, help="Its port.",
)  # fmt: skip
@click.option(
    "--smtp-tls", default="starttls",
    type=click.Choice(["starttls", "implicit", "none"]),
    envvar="IRM_SMTP_TLS", show_envvar=True, show_default=True,
    help="STARTTLS on a plain port, TLS from the start (465), or none.",
)  # fmt: skip
@click.option(
    "--smtp-username", envvar="IRM_SMTP_USERNAME", show_envvar=True,
    help="Account on the mail server.",
)  # fmt: skip
@click.option(
    "--smtp-password", envvar="IRM_SMTP_PASSWORD", show_envvar=True,
    help="Its password; prefer the variable, which 'ps' does not show.",
)  # fmt: skip
@click.option(
    "--smtp-from", default="irm-gateway@localhost", envvar="IRM_SMTP_FROM",
    show_envvar=True, show_default=True, help="Sender address.",
)  # fmt: skip
@click.pass_obj
def reminders_send(
    settings: Settings,
    tenant: str | None,
    smtp_host: str,
    smtp_port: int,
    smtp_tls: Any,
    smtp_username: str | None,
    smtp_password: str | None,
    smtp_from: str,
) -> None:
    """Send the due reminders now, and retry mails that failed before.

    The claims are the gateway's: a reminder it sent already is not sent
    again, and one it is sending right now is left to it.
    """
    if not re.match(SENDER_PATTERN, smtp_from):
        raise click.BadParameter(
            f"{smtp_from!r} must be {SENDER_RULE}", param_hint="--smtp-from"
        )
    smtp = Smtp(smtp_host, smtp_port, smtp_tls, smtp_from, smtp_username, smtp_password)

    async def work(store: Store) -> Pass:
        if tenant is not None:
            await _tenant(store, tenant)
        return await Reminders(store, smtp, ADMIN).run_once(
            settings.now, tenant, force=True
        )

    done = settings.run(work)
    for mail in done.sent:
        click.echo(f"sent {_steps(mail)} of tenant {mail.tenant} to "
                   f"{', '.join(mail.recipients)}")  # fmt: skip
    for mail, why in done.dropped:
        click.echo(f"dropped {_steps(mail)} of tenant {mail.tenant}: {why}")
    if not done.sent and not done.failed and not done.dropped:
        click.echo("nothing due")
    if done.failed:
        lines = [f"{_steps(m)} of tenant {m.tenant}: {why}" for m, why in done.failed]
        raise IrmError(
            f"{len(done.failed)} mail(s) not sent, to be retried:\n  "
            + "\n  ".join(lines)
        )


def _steps(mail: ReminderMail) -> str:
    return ", ".join(f"{s.license} ({s.days} days)" for s in mail.steps)
