"""The durable side of the rule book: what a store keeps and how it is asked.

The gateway keeps the hot state (every line) in memory and uses the store
as its durable log: each batch of decisions is written in one transaction
before any reply of the batch is sent. The tool writes licenses and
tenants, and leaves a row in ``changes`` so a running gateway re-reads
that tenant within a second.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from policy.admission import Event, Joined, Left, Place, SeatChanged
from policy.errors import RuleViolation
from policy.licenses import License, State
from policy.timeutil import to_text


@dataclass(frozen=True, slots=True)
class Tenant:
    id: str
    tz: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class RouterRow:
    """A router as the store last recorded it: in line (seated or not) or out."""

    tenant: str
    router: str
    epoch: int
    session: str | None
    arrival: int | None
    seated: bool
    first_seen: datetime
    changed_at: datetime

    @property
    def state(self) -> str:
        if self.arrival is None:
            return "offline"
        return "online" if self.seated else "waiting"


@dataclass(frozen=True, slots=True)
class AuditEntry:
    seq: int
    at: datetime
    tenant: str
    subject: str
    subject_id: str
    event: str
    detail: dict[str, Any]
    actor: str


@dataclass(frozen=True, slots=True)
class ReminderStep:
    """One license's reminder step, as one mail carries it."""

    license: str
    days: int
    due_at: datetime
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class ReminderMail:
    """One reminder mail and how far its sending got.

    ``state`` is ``waiting`` (claimed; the next attempt is due at
    ``next_attempt_at``), ``sending`` (an attempt holds it until
    ``next_attempt_at``; past that its sender is taken to have died),
    ``sent`` (the server accepted it) or ``dropped`` (a later step made it
    pointless before it could be sent; ``last_error`` says why).
    """

    mail: str
    tenant: str
    state: str
    recipients: tuple[str, ...]
    message: bytes
    claimed_at: datetime
    claimed_by: str
    attempts: int
    next_attempt_at: datetime
    sent_at: datetime | None
    last_error: str | None
    steps: tuple[ReminderStep, ...]


@dataclass(frozen=True, slots=True)
class TenantData:
    """Everything stored of one tenant, to move it to another store.

    Rows are plain tuples in the column order of the PostgreSQL tables:
    licenses ``(id, kind, capacity, term_months, issued_at, imported_at,
    activation_at, state, code)``, routers ``(router, epoch, session,
    arrival, seated, first_seen, changed_at)``, audit ``(at, subject,
    subject_id, event, detail, actor)``, instants as datetimes.
    """

    tenant: Tenant
    licenses: list[tuple[Any, ...]]
    routers: list[tuple[Any, ...]]
    audit: list[tuple[Any, ...]]
    contacts: list[str] = field(default_factory=list)
    reminders: list[ReminderMail] = field(default_factory=list)
    """Every reminder mail claimed so far, so none is sent twice after a move."""


class Store(Protocol):
    """Everything the gateway and the tool ask of durable storage."""

    async def close(self) -> None: ...

    async def add_tenant(self, tenant: str, tz: str, now: datetime) -> None: ...

    async def tenant(self, tenant: str) -> Tenant | None: ...

    async def tenants(self) -> list[Tenant]: ...

    async def licenses(self, tenant: str) -> list[License]: ...

    async def license_states(self, tenant: str) -> dict[str, State]: ...

    async def owners(self, license_ids: Collection[str]) -> dict[str, str]: ...

    async def add_licenses(
        self,
        tenant: str,
        items: Sequence[tuple[License, str]],
        now: datetime,
        actor: str,
    ) -> None: ...

    async def save_activations(
        self,
        tenant: str,
        licenses: Sequence[License],
        states: dict[str, State],
        now: datetime,
        actor: str,
    ) -> None: ...

    async def cancel_activations(
        self, tenant: str, licenses: Sequence[License], now: datetime, actor: str
    ) -> None:
        """Make scheduled licenses available again, all or nothing.

        ``licenses`` are as read, each still carrying the activation instant
        to cancel: a license whose stored instant or state is no longer that
        (the gateway recorded it active meanwhile) is refused.
        """
        ...

    async def register_routers(
        self, tenant: str, routers: Sequence[str], now: datetime, actor: str
    ) -> list[str]: ...

    async def routers(self, tenant: str) -> list[RouterRow]: ...

    async def places(self) -> list[Place]: ...

    async def epochs(self) -> dict[tuple[str, str], int]: ...

    async def apply(self, events: Sequence[Event], now: datetime) -> None: ...

    async def audit(
        self,
        tenant: str,
        subject: str | None = None,
        subject_id: str | None = None,
        limit: int = 200,
    ) -> list[AuditEntry]: ...

    async def changes_after(self, seq: int) -> tuple[int, set[str]]: ...

    async def poll_version(self) -> int: ...

    async def add_contacts(
        self, tenant: str, addresses: Sequence[str], now: datetime, actor: str
    ) -> list[str]: ...

    async def remove_contacts(
        self, tenant: str, addresses: Sequence[str], now: datetime, actor: str
    ) -> list[str]: ...

    async def contacts(self, tenant: str) -> list[str]: ...

    async def reminder_steps(self, tenant: str) -> dict[str, int]: ...

    async def claim_reminder(self, claim: ReminderMail) -> bool: ...

    async def take_reminder(
        self, mail: str, now: datetime, until: datetime, owner: str, *, force: bool
    ) -> ReminderMail | None: ...

    async def reminder_sent(self, mail: str, now: datetime) -> None: ...

    async def reminder_failed(
        self, mail: str, now: datetime, retry_at: datetime, error: str
    ) -> None: ...

    async def reminder_dropped(self, mail: str, now: datetime, why: str) -> None: ...

    async def reminder_mails(
        self, tenant: str | None = None, *, open_only: bool = False
    ) -> list[ReminderMail]: ...

    async def fingerprints(self, license_ids: Collection[str]) -> dict[str, str]: ...


def check_cancellable(lic: License, stored: tuple[str, datetime | None] | None) -> None:
    """Refuse to cancel ``lic`` unless stored as scheduled at its instant still.

    ``stored`` is the license's row, ``(state, activation_at)``, read in the
    cancelling transaction; the gateway records a license it activated as
    active there.
    """
    rule = "only a scheduled activation can be cancelled, before its instant"
    if stored is not None and stored[0] in (State.ACTIVE, State.EXPIRED):
        raise RuleViolation(
            f"license {lic.id} is already {stored[0]}: the gateway activated it at "
            f"{to_text(stored[1])}; {rule}; nothing was cancelled"
        )
    if stored != (State.SCHEDULED, lic.activation_at) or lic.activation_at is None:
        raise RuleViolation(
            f"license {lic.id} changed meanwhile; nothing was cancelled"
        )


@dataclass(slots=True)
class RouterWrite:
    """What one batch leaves in one router's row.

    A batch may hold several events of one router: it leaves (a goodbye, or
    its lease running out) and joins again, or joins and then gains its
    seat. The stores group their row writes by kind for speed, so each
    router gets the one write that its events, applied in order, come to:

    - ``place``: the router joined (or resumed) in this batch; the store
      writes the whole row from it, with ``seated`` and, when ``left``,
      no session and no place (the row keeps the epoch it reached);
    - no ``place`` and ``left``: session and place cleared;
    - neither: only ``seated`` changed.
    """

    place: Place | None = None
    left: bool = False
    seated: bool = False


def router_writes(events: Sequence[Event]) -> dict[tuple[str, str], RouterWrite]:
    """Each router's final row write from a batch's events."""
    out: dict[tuple[str, str], RouterWrite] = {}
    for event in events:
        if isinstance(event, Joined):
            place = event.place
            out[place.tenant, place.router] = RouterWrite(place, False, place.seated)
        elif isinstance(event, SeatChanged):
            v = event.verdict
            out.setdefault((v.tenant, v.router), RouterWrite()).seated = v.accepted
        elif isinstance(event, Left):
            write = out.setdefault((event.tenant, event.router), RouterWrite())
            write.left, write.seated = True, False
    return out
