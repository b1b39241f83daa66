"""License kinds, their life cycle and the capacity they give a tenant.

A license's state is never stored as the truth: it is derived from the
instants the admin chose (activation) and the ones the code carries
(issue date, term), at any instant asked about. The life of a license::

    available ──activate(at)──► scheduled ──at──► active ──term──► expired
        │                           │               │
        └──2 years in stock──►      └── a paid license becomes active in
          non-redeemable               the tenant (Cloud Free only) ──►
                                       invalidated, for good

A scheduled activation can be cancelled before its instant
(:func:`cancel_activation`): the license is available again.

Validity is the half-open interval [activation, expiry): at the expiry
instant a license is already expired, and at the stock limit a license is
already non-redeemable.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, time, timedelta
from enum import StrEnum

from policy.errors import RuleViolation
from policy.timeutil import add_local_months, add_months, to_text, utc

STOCK_MONTHS = 24
FREE_MAX_CAPACITY = 1000
CANCEL_LEAD = timedelta(seconds=3)
"""How long before its instant a scheduled activation can still be cancelled.

A running gateway sees the tool's change within a second (it polls the
store at most every second); closer to the instant it may already be
admitting routers on the license, so a cancellation is refused then.
"""


class Kind(StrEnum):
    BASIC_1 = "cloud-basic-1"
    BASIC_25 = "cloud-basic-25"
    FREE = "cloud-free"

    @property
    def paid(self) -> bool:
        return self is not Kind.FREE

    @property
    def label(self) -> str:
        return {
            Kind.BASIC_1: "Cloud Basic 1",
            Kind.BASIC_25: "Cloud Basic 25",
            Kind.FREE: "Cloud Free",
        }[self]


class State(StrEnum):
    AVAILABLE = "available"
    SCHEDULED = "scheduled"
    ACTIVE = "active"
    EXPIRED = "expired"
    NON_REDEEMABLE = "non-redeemable"
    INVALIDATED = "invalidated"


class Tier(StrEnum):
    FULL = "full"
    FREE = "free"


def check_capacity(kind: Kind, capacity: int) -> None:
    """Refuse a capacity that the kind does not give."""
    if kind is Kind.BASIC_1 and capacity == 1:
        return
    if kind is Kind.BASIC_25 and capacity == 25:
        return
    if kind is Kind.FREE and 1 <= capacity <= FREE_MAX_CAPACITY:
        return
    raise RuleViolation(
        f"capacity {capacity} does not match kind {kind.label} "
        f"(Basic 1 gives 1, Basic 25 gives 25, Free 1 to {FREE_MAX_CAPACITY})"
    )


@dataclass(frozen=True, slots=True)
class License:
    """One imported license of one tenant."""

    id: str
    tenant: str
    kind: Kind
    capacity: int
    term_months: int
    issued_at: datetime
    imported_at: datetime
    activation_at: datetime | None = None
    tz: str = "UTC"
    """The tenant's time zone: terms run in calendar months of its calendar."""
    expires_at: datetime | None = field(init=False, compare=False, repr=False)
    stock_limit: datetime = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        # Derived once: a tenant's licenses are re-examined at every license
        # instant and every change the tool makes, thousands at a time.
        expires = None
        if self.activation_at is not None:
            expires = add_local_months(self.activation_at, self.term_months, self.tz)
        object.__setattr__(self, "expires_at", expires)
        object.__setattr__(
            self, "stock_limit", add_months(self.issued_at, STOCK_MONTHS)
        )


def paid_since(licenses: Iterable[License]) -> datetime | None:
    """The first instant a paid license is (or will be) active, if any."""
    starts = [
        lic.activation_at
        for lic in licenses
        if lic.kind.paid and lic.activation_at is not None
    ]
    return min(starts, default=None)


def invalidated_at(lic: License, paid_from: datetime | None) -> datetime | None:
    """When a Cloud Free license loses its validity to a paid one.

    Every free license of the tenant does, whether active, scheduled or
    still in stock, unless it had expired or left stock before.
    """
    if lic.kind.paid or paid_from is None:
        return None
    end = lic.expires_at if lic.expires_at is not None else lic.stock_limit
    if paid_from >= end:
        return None
    # A free license still scheduled when the paid one starts is invalid
    # from that moment too, not from its own start (the diagram above).
    return paid_from


def state_at(lic: License, now: datetime, paid_from: datetime | None) -> State:
    """The state of ``lic`` at ``now``; ``paid_from`` is :func:`paid_since`."""
    invalid = invalidated_at(lic, paid_from)
    if invalid is not None and now >= invalid:
        return State.INVALIDATED
    if lic.activation_at is None:
        return State.NON_REDEEMABLE if now >= lic.stock_limit else State.AVAILABLE
    if now < lic.activation_at:
        return State.SCHEDULED
    assert lic.expires_at is not None
    return State.ACTIVE if now < lic.expires_at else State.EXPIRED


@dataclass(frozen=True, slots=True)
class Capacity:
    """What a tenant's licenses give at one instant."""

    seats: int
    tier: Tier | None


NO_CAPACITY = Capacity(0, None)


def capacity_at(licenses: Sequence[License], now: datetime) -> Capacity:
    """Paid licenses add up; otherwise one valid Cloud Free; otherwise none."""
    paid_from = paid_since(licenses)
    states = [(lic, state_at(lic, now, paid_from)) for lic in licenses]
    paid = sum(lic.capacity for lic, s in states if lic.kind.paid and s is State.ACTIVE)
    if paid:
        return Capacity(paid, Tier.FULL)
    free = [lic.capacity for lic, s in states if s is State.ACTIVE]
    if free:
        return Capacity(max(free), Tier.FREE)
    return NO_CAPACITY


def next_change_after(licenses: Iterable[License], now: datetime) -> datetime | None:
    """The first instant after ``now`` at which any license changes state."""
    licenses = list(licenses)
    paid_from = paid_since(licenses)
    candidates: list[datetime] = []
    for lic in licenses:
        invalid = invalidated_at(lic, paid_from)
        if invalid is not None:
            candidates.append(invalid)
        if lic.activation_at is None:
            candidates.append(lic.stock_limit)
            continue
        candidates.append(lic.activation_at)
        assert lic.expires_at is not None
        candidates.append(lic.expires_at)
    return min((c for c in candidates if c > now), default=None)


def passed_in(
    licenses: Iterable[License], states: Mapping[str, State]
) -> datetime | None:
    """The latest instant that the stored ``states`` show has passed.

    A license stored as expired has ended, one stored as non-redeemable has
    left stock: only the gateways store these, at those instants. (Active
    says less: the tool stores a license it activates now as active, from
    its own clock.)
    """
    passed: list[datetime] = []
    for lic in licenses:
        state = states.get(lic.id)
        at: datetime | None = None
        if state is State.EXPIRED:
            at = lic.expires_at
        elif state is State.NON_REDEEMABLE:
            at = lic.stock_limit
        if at is not None:
            passed.append(at)
    return max(passed, default=None)


def stock_rule(lic: License) -> str:
    """The stock limit rule, said of one license, for an error message."""
    return (
        f"a license must become active within {STOCK_MONTHS} months (2 years) of "
        f"its issue date, and license {lic.id} was issued {to_text(lic.issued_at)}"
    )


def check_redeemable(lic: License, now: datetime) -> None:
    """Refuse to import a code whose stock time has run out."""
    if now >= lic.stock_limit:
        raise RuleViolation(
            f"license {lic.id} is non-redeemable: {stock_rule(lic)}; that stock "
            f"limit passed at {to_text(lic.stock_limit)}"
        )


def activate(
    lic: License, at: datetime, now: datetime, tenant_licenses: Sequence[License]
) -> License:
    """Schedule ``lic`` to become active at ``at`` (``now`` or later).

    Refuses, naming the rule, anything the rule book forbids: a license that
    is not available, an instant in the past or past the stock limit, and
    for Cloud Free a tenant that already has a paid license or a second free
    license valid at the same time.
    """
    others = [o for o in tenant_licenses if o.id != lic.id]
    paid_from = paid_since(tenant_licenses)
    state = state_at(lic, now, paid_from)
    if state is State.INVALIDATED and lic.kind is Kind.FREE:
        raise RuleViolation(
            f"Cloud Free license {lic.id} is invalid for good: a paid license is "
            f"active in this tenant from {to_text(paid_from)}, and Cloud Free is "
            "never combined with paid licenses"
        )
    if state is State.NON_REDEEMABLE:
        raise RuleViolation(
            f"license {lic.id} is non-redeemable; only available licenses can be "
            f"activated: {stock_rule(lic)}; that stock limit passed at "
            f"{to_text(lic.stock_limit)}"
        )
    if state is not State.AVAILABLE:
        raise RuleViolation(
            f"license {lic.id} is {state}; only available licenses can be activated"
        )
    if at < now:
        raise RuleViolation(
            f"activation instant {to_text(at)} is in the past (now is {to_text(now)})"
        )
    issue_day = datetime.combine(utc(lic.issued_at).date(), time(0), tzinfo=UTC)
    if at < issue_day:
        raise RuleViolation(
            f"activation instant {to_text(at)} is before the issue date "
            f"{issue_day.date().isoformat()} of license {lic.id} (issued "
            f"{to_text(lic.issued_at)}): a license cannot become active before "
            "the day it was issued"
        )
    if at >= lic.stock_limit:
        raise RuleViolation(
            f"activation instant {to_text(at)} is past the stock limit "
            f"{to_text(lic.stock_limit)} of license {lic.id}: {stock_rule(lic)}"
        )
    scheduled = replace(lic, activation_at=at)
    if lic.kind is Kind.FREE:
        _check_free_alone(scheduled, others)
    return scheduled


def cancel_activation(
    lic: License, now: datetime, tenant_licenses: Sequence[License]
) -> License:
    """Cancel the scheduled activation of ``lic``: it is available again.

    Only a scheduled license can be cancelled, and only up to
    :data:`CANCEL_LEAD` before its instant; it keeps its issue date, and
    so its stock limit. Refuses, naming the rule, anything else.
    """
    state = state_at(lic, now, paid_since(tenant_licenses))
    rule = "only a scheduled activation can be cancelled, before its instant"
    if state is State.ACTIVE or state is State.EXPIRED:
        assert lic.activation_at is not None
        raise RuleViolation(
            f"license {lic.id} is already {state}: it became active at "
            f"{to_text(lic.activation_at)} (now is {to_text(now)}); {rule}"
        )
    if state is not State.SCHEDULED:
        raise RuleViolation(f"license {lic.id} is {state}, not scheduled; {rule}")
    assert lic.activation_at is not None
    if lic.activation_at - now < CANCEL_LEAD:
        raise RuleViolation(
            f"license {lic.id} becomes active at {to_text(lic.activation_at)}, "
            f"less than {CANCEL_LEAD.total_seconds():g} seconds from now "
            f"({to_text(now)}): a running gateway may already be activating it; "
            f"{rule}, at least {CANCEL_LEAD.total_seconds():g} seconds before it"
        )
    return replace(lic, activation_at=None)


def _check_free_alone(free: License, others: Sequence[License]) -> None:
    assert free.activation_at is not None
    assert free.expires_at is not None
    paid_from = paid_since(others)
    if paid_from is not None and free.activation_at >= paid_from:
        raise RuleViolation(
            f"Cloud Free license {free.id} cannot be activated: a paid license is "
            f"active in this tenant from {to_text(paid_from)}, and Cloud Free is "
            "never combined with paid licenses"
        )
    for other in others:
        if other.kind is not Kind.FREE or other.activation_at is None:
            continue
        assert other.expires_at is not None
        end = invalidated_at(other, paid_from) or other.expires_at
        if free.activation_at < end and other.activation_at < free.expires_at:
            raise RuleViolation(
                f"Cloud Free license {other.id} is valid until {to_text(end)}; "
                "a tenant has one valid Cloud Free license at a time: activate "
                f"{free.id} at {to_text(end)} or later to renew"
            )


_RANK = {
    State.AVAILABLE: 0,
    State.SCHEDULED: 1,
    State.ACTIVE: 2,
    State.EXPIRED: 3,
    State.INVALIDATED: 3,
    State.NON_REDEEMABLE: 3,
}


def transitions(
    lic: License, known: State, now: datetime, paid_from: datetime | None
) -> list[tuple[State, State, datetime]]:
    """Every state change of ``lic`` after ``known`` up to ``now``, in order.

    Each is ``(before, after, instant)``; a license passed over while no one
    looked (scheduled, then active, then expired) yields each step.
    """
    instants = [lic.stock_limit]
    invalid = invalidated_at(lic, paid_from)
    if invalid is not None:
        instants.append(invalid)
    if lic.activation_at is not None:
        assert lic.expires_at is not None
        instants += [lic.activation_at, lic.expires_at]
    steps: list[tuple[State, State, datetime]] = []
    current = known
    for instant in sorted(i for i in instants if i <= now):
        after = state_at(lic, instant, paid_from)
        if _RANK[after] > _RANK[current]:
            steps.append((current, after, instant))
            current = after
    return steps
