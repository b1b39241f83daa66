"""The license rule book: states, edges of time, capacity and activation.

Every instant is a plain UTC datetime; nothing reads a clock.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from policy.errors import RuleViolation
from policy.licenses import (
    CANCEL_LEAD,
    NO_CAPACITY,
    Capacity,
    Kind,
    License,
    State,
    Tier,
    activate,
    cancel_activation,
    capacity_at,
    check_capacity,
    check_redeemable,
    next_change_after,
    paid_since,
    passed_in,
    state_at,
    transitions,
)

US = timedelta(microseconds=1)
ISSUED = datetime(2025, 1, 1, tzinfo=UTC)  # stock limit 2027-01-01
NOW = datetime(2025, 6, 1, 12, tzinfo=UTC)
OLD = datetime(2023, 6, 1, tzinfo=UTC)  # issue date of licenses used before 2025


def at(year: int, month: int, day: int, hour: int = 0) -> datetime:
    return datetime(year, month, day, hour, tzinfo=UTC)


def lic(
    lid: str,
    kind: Kind = Kind.BASIC_1,
    *,
    activation: datetime | None = None,
    term: int = 12,
    capacity: int | None = None,
    issued: datetime = ISSUED,
) -> License:
    default = {Kind.BASIC_1: 1, Kind.BASIC_25: 25, Kind.FREE: 100}[kind]
    return License(
        id=lid,
        tenant="T8",
        kind=kind,
        capacity=default if capacity is None else capacity,
        term_months=term,
        issued_at=issued,
        imported_at=issued,
        activation_at=activation,
    )


def state_in(licenses: list[License], lid: str, now: datetime) -> State:
    (subject,) = [x for x in licenses if x.id == lid]
    return state_at(subject, now, paid_since(licenses))


# -- states ------------------------------------------------------------------

# A free license activated in March, overtaken by a paid one from May.
FREE_THEN_PAID = [
    lic("free", Kind.FREE, activation=at(2025, 3, 1)),
    lic("paid", activation=at(2025, 5, 1)),
]


@pytest.mark.parametrize(
    ("licenses", "lid", "now", "expected"),
    [
        pytest.param([lic("a")], "a", NOW, State.AVAILABLE, id="available-in-stock"),
        pytest.param(
            [lic("a")], "a", at(2027, 1, 2), State.NON_REDEEMABLE, id="non-redeemable"
        ),
        pytest.param(
            [lic("a", activation=at(2025, 7, 1))],
            "a",
            NOW,
            State.SCHEDULED,
            id="scheduled-before-its-instant",
        ),
        pytest.param(
            [lic("a", activation=at(2025, 5, 1))],
            "a",
            NOW,
            State.ACTIVE,
            id="active-inside-term",
        ),
        pytest.param(
            [lic("a", activation=at(2024, 5, 1), issued=OLD)],
            "a",
            NOW,
            State.EXPIRED,
            id="expired-after-term",
        ),
        pytest.param(
            FREE_THEN_PAID, "free", at(2025, 4, 30), State.ACTIVE, id="free-before-paid"
        ),
        pytest.param(
            FREE_THEN_PAID,
            "free",
            at(2025, 5, 1),
            State.INVALIDATED,
            id="free-invalidated-when-paid-starts",
        ),
        pytest.param(
            FREE_THEN_PAID,
            "free",
            at(2026, 6, 1),
            State.INVALIDATED,
            id="free-stays-invalidated-after-paid-expired",
        ),
        pytest.param(
            FREE_THEN_PAID, "paid", at(2025, 5, 1), State.ACTIVE, id="paid-unaffected"
        ),
    ],
)
def test_state_at_derives_each_state_from_instants(
    licenses: list[License], lid: str, now: datetime, expected: State
) -> None:
    assert state_in(licenses, lid, now) is expected


def test_stored_states_say_the_latest_instant_that_has_passed() -> None:
    old = lic("old", activation=at(2024, 5, 1), issued=OLD)  # ends 2025-05-01
    stock = lic("stock", issued=at(2023, 2, 1))  # stock limit 2025-02-01

    assert passed_in(FREE_THEN_PAID, {"paid": State.ACTIVE}) is None  # the tool's
    assert passed_in(FREE_THEN_PAID, {"free": State.INVALIDATED}) is None
    assert passed_in(FREE_THEN_PAID, {"paid": State.SCHEDULED}) is None
    assert passed_in([old, stock], {"old": State.EXPIRED}) == at(2025, 5, 1)
    assert passed_in([old, stock], {"stock": State.NON_REDEEMABLE}) == at(2025, 2, 1)
    both = {"old": State.EXPIRED, "stock": State.NON_REDEEMABLE}
    assert passed_in([old, stock], both) == at(2025, 5, 1)  # the latest


def test_scheduled_free_is_invalidated_when_a_paid_license_starts_first() -> None:
    # The free was scheduled for July; a paid one was then activated for
    # May. From May on, the free can never become valid.
    licenses = [
        lic("free", Kind.FREE, activation=at(2025, 7, 1)),
        lic("paid", activation=at(2025, 5, 1)),
    ]

    assert state_in(licenses, "free", at(2025, 5, 1) - US) is State.SCHEDULED
    assert state_in(licenses, "free", at(2025, 5, 1)) is State.INVALIDATED
    assert state_in(licenses, "free", at(2025, 7, 1)) is State.INVALIDATED


# -- F07: half-open validity -------------------------------------------------

EXPIRY = at(2026, 5, 1)
ONE_YEAR = lic("a", activation=at(2025, 5, 1))
STOCK_LIMIT = at(2027, 1, 1)


@pytest.mark.parametrize(
    ("now", "state", "seats"),
    [
        pytest.param(EXPIRY - US, State.ACTIVE, 1, id="expiry-minus-1us-active"),
        pytest.param(EXPIRY, State.EXPIRED, 0, id="at-expiry-expired"),
        pytest.param(EXPIRY + US, State.EXPIRED, 0, id="expiry-plus-1us-expired"),
    ],
)
def test_license_is_valid_on_half_open_interval_f07(
    now: datetime, state: State, seats: int
) -> None:
    assert ONE_YEAR.expires_at == EXPIRY
    assert state_at(ONE_YEAR, now, None) is state
    assert capacity_at([ONE_YEAR], now).seats == seats


@pytest.mark.parametrize(
    ("now", "state"),
    [
        pytest.param(STOCK_LIMIT - US, State.AVAILABLE, id="limit-minus-1us-available"),
        pytest.param(STOCK_LIMIT, State.NON_REDEEMABLE, id="at-limit-non-redeemable"),
        pytest.param(
            STOCK_LIMIT + US, State.NON_REDEEMABLE, id="limit-plus-1us-non-redeemable"
        ),
    ],
)
def test_stock_limit_is_half_open_f07(now: datetime, state: State) -> None:
    assert lic("a").stock_limit == STOCK_LIMIT
    assert state_at(lic("a"), now, None) is state


def test_code_is_redeemable_until_one_microsecond_before_stock_limit() -> None:
    check_redeemable(lic("a"), STOCK_LIMIT - US)


@pytest.mark.parametrize(
    "now",
    [
        pytest.param(STOCK_LIMIT, id="at-limit"),
        pytest.param(STOCK_LIMIT + US, id="+1us"),
    ],
)
def test_code_is_refused_from_its_stock_limit_on(now: datetime) -> None:
    with pytest.raises(RuleViolation, match="non-redeemable"):
        check_redeemable(lic("a"), now)


# -- F08: calendar months ------------------------------------------------------


@pytest.mark.parametrize(
    ("license_", "attribute", "expected"),
    [
        pytest.param(
            lic("a", activation=at(2028, 2, 29), issued=at(2027, 6, 1)),
            "expires_at",
            at(2029, 2, 28),
            id="12-months-from-29-feb-ends-28-feb",
        ),
        pytest.param(
            lic("a", activation=at(2028, 2, 29, 13), issued=at(2027, 6, 1)),
            "expires_at",
            at(2029, 2, 28, 13),
            id="time-of-day-is-kept",
        ),
        pytest.param(
            lic("a", issued=at(2024, 2, 29)),
            "stock_limit",
            at(2026, 2, 28),
            id="stock-limit-from-29-feb-is-28-feb",
        ),
        pytest.param(
            lic("a", activation=at(2027, 1, 31), term=1, issued=at(2026, 1, 1)),
            "expires_at",
            at(2027, 2, 28),
            id="1-month-from-31-jan-ends-28-feb",
        ),
        pytest.param(
            lic("a", activation=at(2028, 1, 31), term=1, issued=at(2027, 1, 1)),
            "expires_at",
            at(2028, 2, 29),
            id="1-month-from-31-jan-leap-year-ends-29-feb",
        ),
        pytest.param(
            lic("a", activation=at(2025, 11, 30), term=3),
            "expires_at",
            at(2026, 2, 28),
            id="months-cross-a-year-end",
        ),
    ],
)
def test_terms_clamp_to_the_last_day_of_the_month_f08(
    license_: License, attribute: str, expected: datetime
) -> None:
    assert getattr(license_, attribute) == expected


def test_license_activated_on_29_feb_is_active_until_28_feb_next_year_f08() -> None:
    leap = lic("a", activation=at(2028, 2, 29), issued=at(2027, 1, 1))

    assert state_at(leap, at(2029, 2, 28) - US, None) is State.ACTIVE
    assert state_at(leap, at(2029, 2, 28), None) is State.EXPIRED


# -- capacity ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("licenses", "now", "expected"),
    [
        pytest.param([], NOW, NO_CAPACITY, id="no-license-no-seats"),
        pytest.param(
            [lic("a"), lic("b", activation=at(2025, 7, 1))],
            NOW,
            NO_CAPACITY,
            id="available-and-scheduled-give-nothing",
        ),
        pytest.param(
            [
                lic("a", activation=at(2025, 5, 1)),
                lic("b", activation=at(2025, 5, 2)),
                lic("c", Kind.BASIC_25, activation=at(2025, 1, 1)),
            ],
            NOW,
            Capacity(27, Tier.FULL),
            id="paid-licenses-add-up",
        ),
        pytest.param(
            [
                lic("a", activation=at(2025, 5, 1)),
                lic("old", activation=at(2024, 1, 1), issued=OLD),
            ],
            NOW,
            Capacity(1, Tier.FULL),
            id="expired-paid-counts-nothing",
        ),
        pytest.param(
            [lic("free", Kind.FREE, activation=at(2025, 5, 1), capacity=500)],
            NOW,
            Capacity(500, Tier.FREE),
            id="free-alone-gives-its-capacity-at-tier-free",
        ),
        pytest.param(
            [
                lic("free", Kind.FREE, activation=at(2025, 5, 1), capacity=500),
                lic("paid"),
            ],
            NOW,
            Capacity(500, Tier.FREE),
            id="free-beside-unactivated-paid",
        ),
        pytest.param(
            [
                lic("free", Kind.FREE, activation=at(2025, 5, 1), capacity=500),
                lic("paid", activation=at(2025, 6, 1, 13)),
            ],
            NOW,
            Capacity(500, Tier.FREE),
            id="free-until-scheduled-paid-starts",
        ),
        pytest.param(
            [
                lic("free", Kind.FREE, activation=at(2025, 5, 1), capacity=500),
                lic("paid", activation=at(2025, 6, 1, 13)),
            ],
            at(2025, 6, 1, 13),
            Capacity(1, Tier.FULL),
            id="scheduled-paid-activation-invalidates-free",
        ),
        pytest.param(
            [
                lic("free", Kind.FREE, activation=at(2025, 5, 1), capacity=500),
                lic("paid", activation=at(2025, 6, 1, 13), term=1),
            ],
            at(2025, 7, 1, 13),
            NO_CAPACITY,
            id="free-stays-invalid-after-paid-expired",
        ),
        pytest.param(
            [
                lic(
                    "free",
                    Kind.FREE,
                    activation=at(2024, 5, 1),
                    capacity=500,
                    issued=OLD,
                ),
                lic("paid", activation=at(2025, 5, 1)),
            ],
            NOW,
            Capacity(1, Tier.FULL),
            id="paid-after-free-expired-gives-full",
        ),
    ],
)
def test_capacity_at_combines_paid_and_never_free(
    licenses: list[License], now: datetime, expected: Capacity
) -> None:
    assert capacity_at(licenses, now) == expected


@pytest.mark.parametrize(
    ("kind", "capacity"),
    [
        pytest.param(Kind.BASIC_1, 2, id="basic-1-gives-1"),
        pytest.param(Kind.BASIC_25, 1, id="basic-25-gives-25"),
        pytest.param(Kind.FREE, 0, id="free-at-least-1"),
        pytest.param(Kind.FREE, 1001, id="free-at-most-1000"),
    ],
)
def test_capacity_that_the_kind_does_not_give_is_refused(
    kind: Kind, capacity: int
) -> None:
    with pytest.raises(RuleViolation, match=f"capacity {capacity} does not match"):
        check_capacity(kind, capacity)


@pytest.mark.parametrize(
    ("kind", "capacity"),
    [(Kind.BASIC_1, 1), (Kind.BASIC_25, 25), (Kind.FREE, 1), (Kind.FREE, 1000)],
    ids=["basic-1", "basic-25", "free-1", "free-1000"],
)
def test_capacity_that_the_kind_gives_is_accepted(kind: Kind, capacity: int) -> None:
    check_capacity(kind, capacity)


# -- activation ----------------------------------------------------------------

FREE_ACTIVE = lic("f1", Kind.FREE, activation=at(2025, 5, 1))  # valid to 2026-05-01


@pytest.mark.parametrize(
    ("subject", "when", "others", "rule"),
    [
        pytest.param(
            lic("a", activation=at(2025, 7, 1)),
            at(2025, 8, 1),
            [],
            "is scheduled; only available licenses can be activated",
            id="already-scheduled",
        ),
        pytest.param(
            lic("a", activation=at(2025, 5, 1)),
            NOW,
            [],
            "is active; only available",
            id="already-active",
        ),
        pytest.param(
            lic("a", activation=at(2024, 1, 1), issued=OLD),
            NOW,
            [],
            "is expired; only available",
            id="expired",
        ),
        pytest.param(
            lic("a", issued=at(2023, 1, 1)),
            NOW,
            [],
            "is non-redeemable; only available",
            id="non-redeemable",
        ),
        pytest.param(lic("a"), NOW - US, [], "is in the past", id="past-instant"),
        pytest.param(
            lic("a"), STOCK_LIMIT, [], "past the stock limit", id="at-stock-limit"
        ),
        pytest.param(
            lic("a"),
            STOCK_LIMIT + timedelta(days=1),
            [],
            "past the stock limit",
            id="after-stock-limit",
        ),
        pytest.param(
            lic("f", Kind.FREE),
            NOW,
            [lic("p", activation=at(2025, 5, 1))],
            "never combined with paid licenses",
            id="free-while-paid-active",
        ),
        pytest.param(
            lic("f", Kind.FREE),
            NOW,
            [lic("p", activation=at(2023, 5, 1), issued=at(2023, 1, 1))],
            "never combined with paid licenses",
            id="free-after-paid-expired-for-good",
        ),
        pytest.param(
            lic("f", Kind.FREE),
            at(2025, 8, 1),
            [lic("p", activation=at(2025, 7, 1))],
            "never combined with paid licenses",
            id="free-after-scheduled-paid",
        ),
        pytest.param(
            lic("f", Kind.FREE),
            at(2025, 7, 1),
            [lic("p", activation=at(2025, 7, 1))],
            "never combined with paid licenses",
            id="free-at-scheduled-paid-start",
        ),
        pytest.param(
            lic("f2", Kind.FREE),
            NOW,
            [FREE_ACTIVE],
            "one valid Cloud Free license at a time",
            id="second-free-overlapping-active-free",
        ),
        pytest.param(
            lic("f2", Kind.FREE),
            EXPIRY - US,
            [FREE_ACTIVE],
            "activate f2 at 2026-05-01T00:00:00Z or later",
            id="second-free-1us-before-renewal",
        ),
        pytest.param(
            lic("f2", Kind.FREE, term=24),
            NOW,
            [lic("f1", Kind.FREE, activation=at(2026, 1, 1))],
            "one valid Cloud Free license at a time",
            id="second-free-covering-scheduled-free",
        ),
    ],
)
def test_activate_refuses_naming_the_rule(
    subject: License, when: datetime, others: list[License], rule: str
) -> None:
    with pytest.raises(RuleViolation, match=rule):
        activate(subject, when, NOW, [*others, subject])


@pytest.mark.parametrize(
    ("subject", "when", "others"),
    [
        pytest.param(lic("a"), NOW, [], id="paid-now"),
        pytest.param(lic("a"), STOCK_LIMIT - US, [], id="paid-1us-before-stock-limit"),
        pytest.param(lic("a"), NOW, [FREE_ACTIVE], id="paid-beside-active-free"),
        pytest.param(
            lic("f", Kind.FREE), NOW, [lic("p")], id="free-beside-unused-paid"
        ),
        pytest.param(
            lic("f2", Kind.FREE), EXPIRY, [FREE_ACTIVE], id="free-renewal-at-expiry"
        ),
        pytest.param(
            lic("f", Kind.FREE),
            NOW,
            [lic("p", activation=at(2025, 7, 1))],
            id="free-before-scheduled-paid",
        ),
        pytest.param(
            lic("f2", Kind.FREE),
            NOW,
            [lic("f1", Kind.FREE, activation=at(2024, 6, 1, 12), issued=OLD)],
            id="free-at-old-free-expiry",
        ),
    ],
)
def test_activate_schedules_what_the_rules_allow(
    subject: License, when: datetime, others: list[License]
) -> None:
    scheduled = activate(subject, when, NOW, [*others, subject])

    assert scheduled == replace(subject, activation_at=when)
    expected = State.ACTIVE if when == NOW else State.SCHEDULED
    assert state_in([*others, scheduled], scheduled.id, NOW) is expected


def test_activate_leaves_the_given_license_unchanged() -> None:
    subject = lic("a")

    activate(subject, NOW, NOW, [subject])

    assert subject.activation_at is None


# -- the timetable ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("licenses", "now", "expected"),
    [
        pytest.param([], NOW, None, id="no-license-no-change"),
        pytest.param([lic("a")], NOW, STOCK_LIMIT, id="available-until-stock-limit"),
        pytest.param(
            [lic("a", activation=at(2025, 7, 1))],
            NOW,
            at(2025, 7, 1),
            id="scheduled-until-activation",
        ),
        pytest.param(
            [lic("a", activation=at(2025, 7, 1))],
            at(2025, 7, 1),
            at(2026, 7, 1),
            id="strictly-after-now",
        ),
        pytest.param(
            [lic("a", activation=at(2024, 1, 1), issued=OLD)],
            NOW,
            None,
            id="expired-is-final",
        ),
        pytest.param(
            [
                lic("free", Kind.FREE, activation=at(2025, 5, 1)),
                lic("paid", activation=at(2025, 9, 1)),
            ],
            NOW,
            at(2025, 9, 1),
            id="free-invalidation-at-paid-start",
        ),
        pytest.param(
            [
                lic("a", activation=at(2025, 5, 1)),
                lic("b", activation=at(2025, 6, 1, 12), term=1),
                lic("c"),
            ],
            NOW,
            at(2025, 7, 1, 12),
            id="earliest-of-many",
        ),
    ],
)
def test_next_change_after_is_the_first_later_instant(
    licenses: list[License], now: datetime, expected: datetime | None
) -> None:
    assert next_change_after(licenses, now) == expected


@pytest.mark.parametrize(
    ("licenses", "lid", "known", "now", "expected"),
    [
        pytest.param(
            [lic("a", activation=at(2025, 7, 1))],
            "a",
            State.SCHEDULED,
            at(2027, 1, 1),
            [
                (State.SCHEDULED, State.ACTIVE, at(2025, 7, 1)),
                (State.ACTIVE, State.EXPIRED, at(2026, 7, 1)),
            ],
            id="scheduled-active-expired-while-nobody-looked",
        ),
        pytest.param(
            [lic("a", activation=at(2025, 7, 1))],
            "a",
            State.SCHEDULED,
            at(2026, 7, 1) - US,
            [(State.SCHEDULED, State.ACTIVE, at(2025, 7, 1))],
            id="stops-1us-before-expiry",
        ),
        pytest.param(
            [lic("a", activation=at(2025, 7, 1))],
            "a",
            State.ACTIVE,
            at(2026, 7, 1),
            [(State.ACTIVE, State.EXPIRED, at(2026, 7, 1))],
            id="expiry-counts-at-its-instant",
        ),
        pytest.param(
            [lic("a")],
            "a",
            State.AVAILABLE,
            STOCK_LIMIT,
            [(State.AVAILABLE, State.NON_REDEEMABLE, STOCK_LIMIT)],
            id="available-to-non-redeemable",
        ),
        pytest.param(
            [
                lic("free", Kind.FREE, activation=at(2025, 3, 1)),
                lic("paid", activation=at(2025, 5, 1), term=1),
            ],
            "free",
            State.SCHEDULED,
            at(2027, 1, 1),
            [
                (State.SCHEDULED, State.ACTIVE, at(2025, 3, 1)),
                (State.ACTIVE, State.INVALIDATED, at(2025, 5, 1)),
            ],
            id="free-invalidated-and-never-expired",
        ),
        pytest.param(
            [
                lic("free", Kind.FREE, activation=at(2025, 7, 1)),
                lic("paid", activation=at(2025, 5, 1)),
            ],
            "free",
            State.SCHEDULED,
            at(2025, 8, 1),
            [(State.SCHEDULED, State.INVALIDATED, at(2025, 5, 1))],
            id="scheduled-free-invalidated-at-paid-start-never-active",
        ),
        pytest.param(
            [lic("a", activation=at(2025, 5, 1))],
            "a",
            State.ACTIVE,
            NOW,
            [],
            id="no-change-no-step",
        ),
        pytest.param(
            [lic("a", activation=at(2024, 1, 1), issued=OLD)],
            "a",
            State.EXPIRED,
            NOW,
            [],
            id="known-final-state-no-step",
        ),
    ],
)
def test_transitions_list_every_step_in_order(
    licenses: list[License],
    lid: str,
    known: State,
    now: datetime,
    expected: list[tuple[State, State, datetime]],
) -> None:
    (subject,) = [x for x in licenses if x.id == lid]

    assert transitions(subject, known, now, paid_since(licenses)) == expected


def test_an_unused_cloud_free_license_is_invalidated_when_a_paid_one_starts() -> None:
    """Every free license of the tenant ends, not only the active one."""
    issued = datetime(2026, 1, 1, tzinfo=UTC)
    start = datetime(2026, 3, 1, tzinfo=UTC)
    free = License("F", "T", Kind.FREE, 1000, 12, issued, issued)
    paid = License("P", "T", Kind.BASIC_1, 1, 12, issued, issued, start)
    paid_from = paid_since([free, paid])
    before = start - timedelta(microseconds=1)
    assert state_at(free, before, paid_from) is State.AVAILABLE
    assert state_at(free, start, paid_from) is State.INVALIDATED
    assert next_change_after([free, paid], before) == start
    assert transitions(free, State.AVAILABLE, start, paid_from) == [
        (State.AVAILABLE, State.INVALIDATED, start)
    ]
    with pytest.raises(RuleViolation, match="invalid for good"):
        activate(free, start, start, [free, paid])


# -- cancelling a scheduled activation ------------------------------------------

LATER = at(2025, 7, 1)


def test_cancelling_a_scheduled_activation_makes_the_license_available_again() -> None:
    scheduled = activate(lic("a"), LATER, NOW, [lic("a")])

    cancelled = cancel_activation(scheduled, NOW, [scheduled])

    assert cancelled == lic("a")
    assert cancelled.stock_limit == scheduled.stock_limit
    assert state_in([cancelled], "a", NOW) is State.AVAILABLE
    assert next_change_after([cancelled], NOW) == cancelled.stock_limit
    again = activate(cancelled, at(2025, 8, 1), NOW, [cancelled])
    assert state_in([again], "a", NOW) is State.SCHEDULED


def test_cancelling_is_allowed_until_the_lead_before_the_instant() -> None:
    scheduled = lic("a", activation=NOW + CANCEL_LEAD)

    assert cancel_activation(scheduled, NOW, [scheduled]).activation_at is None
    with pytest.raises(RuleViolation, match="may already be activating it"):
        cancel_activation(scheduled, NOW + US, [scheduled])


def test_cancelling_a_paid_license_revives_a_scheduled_free_one() -> None:
    free = lic("f", Kind.FREE, activation=at(2025, 6, 15))
    paid = lic("p", activation=at(2025, 6, 10))
    assert state_in([free, paid], "f", at(2025, 6, 20)) is State.INVALIDATED

    left = [free, cancel_activation(paid, NOW, [free, paid])]

    assert state_in(left, "f", at(2025, 6, 20)) is State.ACTIVE


@pytest.mark.parametrize(
    ("subject", "others", "rule"),
    [
        pytest.param(lic("a"), [], "is available, not scheduled", id="available"),
        pytest.param(
            lic("a", activation=NOW),
            [],
            "already active: it became active at 2025-06-01T12:00:00Z",
            id="active-at-its-instant",
        ),
        pytest.param(
            lic("a", activation=NOW - US), [], "already active", id="instant-passed"
        ),
        pytest.param(
            lic("a", activation=OLD, issued=OLD), [], "already expired", id="expired"
        ),
        pytest.param(
            lic("a", issued=OLD), [], "is non-redeemable, not", id="non-redeemable"
        ),
        pytest.param(
            lic("f", Kind.FREE, activation=LATER),
            [lic("p", activation=NOW)],
            "is invalidated, not scheduled",
            id="invalidated-free",
        ),
        pytest.param(
            lic("a", activation=NOW + CANCEL_LEAD - US),
            [],
            "less than 3 seconds from now",
            id="within-the-lead",
        ),
    ],
)
def test_cancelling_refuses_what_is_not_scheduled_naming_the_rule(
    subject: License, others: list[License], rule: str
) -> None:
    with pytest.raises(RuleViolation, match=rule) as refused:
        cancel_activation(subject, NOW, [*others, subject])

    assert f"license {subject.id} " in str(refused.value)
    assert "only a scheduled activation can be cancelled" in str(refused.value)
