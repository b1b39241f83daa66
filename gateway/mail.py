"""Expiry reminders by e-mail: compose, claim, send, record.

Like :mod:`gateway.protocol` for routers, this module is the product's
wire to customers, and ``irm-tool reminders send`` uses it as the gateway
does, so that both keep the same exactly-once rules.

Exactly once, and what that can mean over SMTP. A sender first *claims*
a mail in the store: one write transaction records the mail (its bytes,
its recipients) and each (license, step) it carries under a unique key, so
of two senders racing on one store only one can claim a step. It then
*takes* an attempt (another transaction, which holds the mail for
:data:`HOLD`), hands the mail to the SMTP server, and *records* it as sent
once the server has accepted it. A sender that dies between the server's
acceptance and that record cannot be told from one that died before
sending: when the hold runs out, another attempt sends the same bytes
again, with the same Message-ID. So the store records each reminder once
and no reminder is lost to a crash; in that one window the recipient's
server receives the message twice, and mail systems that drop duplicates
by Message-ID show it once.

A server that is down or refuses is retried with capped exponential
backoff and jitter (the next attempt's time is kept in the store, so it
survives restarts and is shared by every sender). A mail whose steps were
all overtaken meanwhile (a later step came due, the license ended) is
dropped instead of sent: after downtime only the latest reminder goes out.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Literal

import aiosmtplib

from policy.errors import IrmError
from policy.licenses import Kind, License, capacity_at, paid_since
from policy.reminders import Due, due, due_step, mail_key, unrecorded
from policy.store import ReminderMail, ReminderStep, Store, Tenant
from policy.timeutil import to_text, zone

SENDER_PATTERN = r"^[^@\s<>]+@[^@\s<>]+$"
SENDER_RULE = "one address, name@domain, that the server accepts as sender"
"""The sender is the mail server's to judge ("name@localhost" is fine on
many); only what cannot be one address is refused."""

HOLD = timedelta(minutes=10)
"""How long an attempt holds a mail; past that its sender is taken as dead.
Far longer than :data:`SMTP_TIMEOUT`, so a live sender is never overtaken."""
SMTP_TIMEOUT = 60.0
"""Seconds one SMTP exchange may take before the attempt counts as failed."""
RETRY_FIRST = timedelta(seconds=30)
RETRY_CAP = timedelta(hours=1)
_JUST_BEFORE = timedelta(microseconds=1)

Tls = Literal["starttls", "implicit", "none"]


class MailError(IrmError):
    """The SMTP server could not be reached or refused a mail."""


@dataclass(frozen=True, slots=True)
class Smtp:
    """Where and how reminders are handed over; the password is never shown."""

    host: str
    port: int
    tls: Tls
    sender: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout: float = SMTP_TIMEOUT


async def deliver(smtp: Smtp, mail: ReminderMail) -> None:
    """Hand ``mail`` to the server; returns once the server has accepted it."""
    try:
        await aiosmtplib.send(
            mail.message,
            sender=smtp.sender,
            recipients=list(mail.recipients),
            hostname=smtp.host,
            port=smtp.port,
            use_tls=smtp.tls == "implicit",
            start_tls=smtp.tls == "starttls",
            username=smtp.username,
            password=smtp.password,
            timeout=smtp.timeout,
        )
    except (aiosmtplib.SMTPException, OSError) as exc:
        raise MailError(
            f"SMTP server {smtp.host}:{smtp.port} did not take the mail: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def retry_delay(attempts: int, rng: random.Random) -> timedelta:
    """30 s, 1 min, 2 min, ... up to an hour, each cut by up to half at random.

    The jitter keeps several senders, or many mails, from hammering a
    server that comes back all in the same second.
    """
    ceiling = min(RETRY_CAP, RETRY_FIRST * (1 << min(20, max(0, attempts - 1))))
    return ceiling * rng.uniform(0.5, 1.0)


@dataclass(slots=True)
class Pass:
    """What one pass over the store did."""

    claimed: list[ReminderMail] = field(default_factory=list)
    sent: list[ReminderMail] = field(default_factory=list)
    failed: list[tuple[ReminderMail, str]] = field(default_factory=list)
    dropped: list[tuple[ReminderMail, str]] = field(default_factory=list)


class Reminders:
    """Claims due reminders and sends the mails that are ready, one pass at a time.

    ``on_accepted`` is called after the server accepted a mail and before
    the store records it: the tests kill the process there.
    """

    def __init__(
        self,
        store: Store,
        smtp: Smtp,
        owner: str,
        rng: random.Random | None = None,
        on_accepted: Callable[[ReminderMail], None] | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),  # real time
    ) -> None:
        self.store = store
        self.smtp = smtp
        self.owner = owner
        self.rng = rng or random.Random()
        self.on_accepted = on_accepted
        self.clock = clock

    async def run_once(
        self,
        now: datetime | None = None,
        tenant: str | None = None,
        *,
        force: bool = False,
    ) -> Pass:
        """Claim what is due, then attempt every ready mail.

        At ``now`` if given (a virtual clock); otherwise each attempt reads
        the clock afresh, so that a pass held up by a slow server never
        takes or records a mail on a stale instant. ``force`` retries
        failed mails without waiting out their backoff.
        """
        done = Pass()
        clock = self.clock if now is None else lambda: now
        tenants = [t for t in await self.store.tenants() if tenant in (None, t.id)]
        for t in tenants:
            claim = await self.claim(t, clock())
            if claim is not None:
                done.claimed.append(claim)
        for mail in await self.store.reminder_mails(tenant, open_only=True):
            await self._attempt(mail, clock, force, done)
        return done

    async def claim(self, tenant: Tenant, now: datetime) -> ReminderMail | None:
        """Record the tenant's unclaimed due steps as one mail, if any."""
        licenses = await self.store.licenses(tenant.id)
        recorded = await self.store.reminder_steps(tenant.id)
        dues = unrecorded(due(licenses, now), recorded)
        recipients = await self.store.contacts(tenant.id)
        if not dues or not recipients:
            return None
        routers = len(await self.store.routers(tenant.id))
        labels = await self.store.fingerprints([d.license.id for d in dues])
        key = mail_key(tenant.id, dues)
        message = compose(
            Letter(tenant, dues, licenses, routers, labels, now),
            key, self.smtp.sender, recipients, now,
        )  # fmt: skip
        claim = ReminderMail(
            mail=key,
            tenant=tenant.id,
            state="waiting",
            recipients=tuple(recipients),
            message=message.as_bytes(),
            claimed_at=now,
            claimed_by=self.owner,
            attempts=0,
            next_attempt_at=now,
            sent_at=None,
            last_error=None,
            steps=tuple(
                ReminderStep(d.license.id, d.days, d.at, d.expires_at) for d in dues
            ),
        )
        return claim if await self.store.claim_reminder(claim) else None

    async def _attempt(
        self,
        mail: ReminderMail,
        clock: Callable[[], datetime],
        force: bool,
        done: Pass,
    ) -> None:
        now = clock()
        taken = await self.store.take_reminder(
            mail.mail, now, now + HOLD, self.owner, force=force
        )
        if taken is None:
            return
        why = await self._overtaken(taken, now)
        if why is not None:
            await self.store.reminder_dropped(taken.mail, now, why)
            done.dropped.append((taken, why))
            return
        try:
            await deliver(self.smtp, taken)
        except MailError as exc:
            now = clock()
            retry_at = now + retry_delay(taken.attempts, self.rng)
            await self.store.reminder_failed(taken.mail, now, retry_at, str(exc))
            done.failed.append((taken, str(exc)))
            return
        if self.on_accepted is not None:
            self.on_accepted(taken)
        await self.store.reminder_sent(taken.mail, clock())
        done.sent.append(taken)

    async def _overtaken(self, mail: ReminderMail, now: datetime) -> str | None:
        """Why ``mail`` should no longer go out, if none of its steps is current."""
        licenses = {lic.id: lic for lic in await self.store.licenses(mail.tenant)}
        paid_from = paid_since(list(licenses.values()))
        for step in mail.steps:
            lic = licenses.get(step.license)
            current = None if lic is None else due_step(lic, now, paid_from)
            if current is not None and current.days == step.days:
                return None
        return "overtaken: a later reminder is due, or the licenses ended"


# -- the letter ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Letter:
    """Everything one reminder says."""

    tenant: Tenant
    dues: Sequence[Due]
    licenses: Sequence[License]
    routers: int
    labels: dict[str, str]
    """Each license's code fingerprint (never the code)."""
    now: datetime


def compose(
    letter: Letter, key: str, sender: str, recipients: Sequence[str], now: datetime
) -> EmailMessage:
    """The reminder mail; its Message-ID is the same for the same reminders."""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = ", ".join(recipients)
    message["Subject"] = _subject(letter)
    message["Date"] = format_datetime(now)
    domain = sender.rpartition("@")[2] or "irm-gateway.invalid"
    message["Message-ID"] = f"<reminder.{key}@{domain}>"
    message.set_content(body(letter))
    return message


def _subject(letter: Letter) -> str:
    first = min(d.expires_at for d in letter.dues)
    count = len(letter.dues)
    what = "1 license" if count == 1 else f"{count} licenses"
    verb = "expires on" if count == 1 else "expire from"
    return (
        f"irm-gateway: {what} of tenant {letter.tenant.id} {verb} "
        f"{_local(first, letter.tenant.tz)}"
    )


def body(letter: Letter) -> str:
    """The text of the mail: the licenses, what expiry does, how to renew."""
    tz = letter.tenant.tz
    lines = [
        "Hello,",
        "",
        f"{'a license' if len(letter.dues) == 1 else 'licenses'} of tenant "
        f"{letter.tenant.id} {'runs' if len(letter.dues) == 1 else 'run'} out "
        f"soon (times in {tz}):",
        "",
    ]
    for d in letter.dues:
        lic = d.license
        lines.append(
            f"  - {lic.kind.label}, {lic.capacity} router(s), license {lic.id}"
            f" (code {letter.labels.get(lic.id, '?')}): expires"
            f" {_local(d.expires_at, tz)}, {_days_left(letter, d)}"
        )
    lines += ["", "What happens at expiry:"]
    for expiry in sorted({d.expires_at for d in letter.dues}):
        lines += _consequence(letter, expiry)
    free = [d for d in letter.dues if d.license.kind is Kind.FREE]
    if free:
        lines += ["", *_renewal(letter, free[0])]
    lines += [
        "",
        "This reminder is sent at 30, 23, 16, 9 and 2 days before a license",
        "expires. Show the tenant's licenses with:",
        f"  irm-tool licenses --tenant {letter.tenant.id}",
    ]
    return "\n".join(lines) + "\n"


def _consequence(letter: Letter, expiry: datetime) -> list[str]:
    before = capacity_at(letter.licenses, expiry - _JUST_BEFORE).seats
    after = capacity_at(letter.licenses, expiry).seats
    lines = [
        f"  At {_local(expiry, letter.tenant.tz)} the tenant's capacity goes "
        f"from {before} to {after} router(s).",
    ]
    rejected = letter.routers - after
    if after == 0:
        lines.append(
            f"  With no valid license left, every router is rejected "
            f"({letter.routers} registered now)."
        )
    elif rejected > 0:
        lines.append(
            f"  {letter.routers} routers are registered now: beyond the first "
            f"{after} to connect, {rejected} will be rejected (capacity exceeded)."
        )
    else:
        lines.append(
            f"  {letter.routers} routers are registered now: all fit, none "
            "will be rejected."
        )
    return lines


def _renewal(letter: Letter, d: Due) -> list[str]:
    tenant, end = letter.tenant, to_text(d.expires_at)
    stocked = [
        lic.id
        for lic in letter.licenses
        if lic.kind is Kind.FREE
        and lic.activation_at is None
        and lic.stock_limit > d.expires_at
    ]
    if stocked:
        return [
            f"How to renew Cloud Free: license {stocked[0]} is in stock; activate",
            "it at the end of the current one (two free licenses are never valid",
            "at once), and the routers keep their seats:",
            f"  irm-tool activate --tenant {tenant.id} {stocked[0]} --at {end}",
        ]
    return [
        "How to renew Cloud Free: import a new Cloud Free code and activate it",
        "at or after the end of the current one (two free licenses are never",
        "valid at once):",
        f"  irm-tool import --tenant {tenant.id} NEW-CODE",
        f"  irm-tool activate --tenant {tenant.id} NEW-LICENSE-ID --at {end}",
    ]


def _days_left(letter: Letter, d: Due) -> str:
    """Calendar days in the tenant's zone: after downtime, fewer than the step."""
    tz = zone(letter.tenant.tz)
    days = (d.expires_at.astimezone(tz).date() - letter.now.astimezone(tz).date()).days
    return {0: "today", 1: "in 1 day"}.get(days, f"in {days} days")


def _local(moment: datetime, tz: str) -> str:
    return moment.astimezone(zone(tz)).strftime("%Y-%m-%d %H:%M %Z")
