"""Which expiry reminder is due, for which license, at an instant.

A tenant's contacts are told every week from 30 days before a license
expires: at 30, 23, 16, 9 and 2 days before. Each of those is a *step*.

How "days before" is measured: on the tenant's wall clock, the way a
license's term runs in calendar months of the tenant's calendar. A license
that expires at midnight in Berlin has its 30-day step at midnight in
Berlin 30 days earlier, whatever daylight saving did meanwhile (so in UTC
the step may be 30 days less or more one hour). The edge is half-open like
validity (CASES.md F07): a step is due from its instant on, not a
microsecond before.

Only an active license gets reminders, and only for steps that fall within
its validity: a one-month license activated on 1 February (expiry 1 March)
gets 23, 16, 9 and 2, not a "30 days left" at activation. After downtime
only the latest step that is due counts: the ones passed over are never
sent later, and neither is a step once a later one was recorded.

One mail carries every step of a tenant that is due and not yet sent when
the sender looks: licenses activated together (one ``activate`` command)
expire together and share every mail. Licenses whose steps fall at
different instants get separate mails, each at its own instant, since
sending one early would break the edge rule above.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from policy.licenses import License, State, paid_since, state_at
from policy.timeutil import zone

STEPS = (30, 23, 16, 9, 2)
"""Days before expiry at which a reminder is due, earliest first."""


@dataclass(frozen=True, slots=True)
class Due:
    """One license's reminder step that is due."""

    license: License
    days: int
    at: datetime
    """The instant the step became due."""

    @property
    def expires_at(self) -> datetime:
        assert self.license.expires_at is not None
        return self.license.expires_at


def step_at(lic: License, days: int) -> datetime:
    """The instant ``days`` before the expiry of ``lic``, on the tenant's clock."""
    assert lic.expires_at is not None, "only an activated license expires"
    local = lic.expires_at.astimezone(zone(lic.tz))
    # Aware arithmetic in one zone is wall-clock arithmetic; the offset is
    # taken afresh for the result when it is converted back to UTC.
    return (local - timedelta(days=days)).astimezone(UTC)


def due_step(lic: License, now: datetime, paid_from: datetime | None) -> Due | None:
    """The latest step of ``lic`` due at ``now``, if it is active and has one."""
    if state_at(lic, now, paid_from) is not State.ACTIVE:
        return None
    assert lic.activation_at is not None
    for days in reversed(STEPS):
        at = step_at(lic, days)
        if at <= now:
            return Due(lic, days, at) if at >= lic.activation_at else None
    return None


def due(licenses: Sequence[License], now: datetime) -> list[Due]:
    """Every license of one tenant with a step due at ``now``, by expiry."""
    paid_from = paid_since(licenses)
    found = [d for lic in licenses if (d := due_step(lic, now, paid_from))]
    return sorted(found, key=lambda d: (d.expires_at, d.license.id))


def unrecorded(dues: Iterable[Due], recorded: Mapping[str, int]) -> list[Due]:
    """The due steps still to send, given the last step recorded per license.

    ``recorded`` maps a license id to the fewest days before expiry of any
    reminder already claimed for it; that step or an earlier one is never
    sent again.
    """
    return [d for d in dues if d.license.id not in recorded or
            d.days < recorded[d.license.id]]  # fmt: skip


def mail_key(tenant: str, dues: Iterable[Due]) -> str:
    """A stable name for one mail: the tenant and its (license, step) pairs.

    The same reminders always make the same key, and so the same
    Message-ID, whoever composes the mail and however often.
    """
    pairs = sorted(f"{d.license.id}:{d.days}" for d in dues)
    text = "\n".join([tenant, *pairs])
    return hashlib.sha256(text.encode()).hexdigest()[:32]
