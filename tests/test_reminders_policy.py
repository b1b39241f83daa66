"""Which expiry reminder is due: the pure rule (policy/reminders.py)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from policy.licenses import Kind, License
from policy.reminders import STEPS, due, due_step, mail_key, step_at, unrecorded
from tests.seeding import mint

ISSUED = datetime(2026, 1, 1, tzinfo=UTC)
START = datetime(2026, 1, 10, 9, 0, tzinfo=UTC)
US = timedelta(microseconds=1)


def active(
    start: datetime = START, term: int = 12, kind: Kind = Kind.BASIC_1, tz: str = "UTC"
) -> License:
    lic, _ = mint(kind, ISSUED, term)
    return replace(lic, tenant="acme", activation_at=start, tz=tz)


def test_the_five_steps_fall_30_23_16_9_and_2_days_before_expiry() -> None:
    lic = active()
    assert lic.expires_at == datetime(2027, 1, 10, 9, 0, tzinfo=UTC)
    assert [step_at(lic, d) for d in STEPS] == [
        datetime(2026, 12, 11, 9, 0, tzinfo=UTC),
        datetime(2026, 12, 18, 9, 0, tzinfo=UTC),
        datetime(2026, 12, 25, 9, 0, tzinfo=UTC),
        datetime(2027, 1, 1, 9, 0, tzinfo=UTC),
        datetime(2027, 1, 8, 9, 0, tzinfo=UTC),
    ]


@pytest.mark.parametrize("days", STEPS)
def test_a_step_is_due_at_its_instant_not_a_microsecond_before(days: int) -> None:
    lic = active()
    at = step_at(lic, days)
    before = due_step(lic, at - US, None)
    assert before is None or before.days > days
    for moment in (at, at + US):
        found = due_step(lic, moment, None)
        assert found is not None
        assert (found.days, found.at) == (days, at)


def test_days_before_are_counted_on_the_tenants_wall_clock_across_dst() -> None:
    # Activated at midnight in Berlin in winter; expires at midnight in
    # Berlin on 10 April (summer time). 30 days before is midnight on
    # 11 March (winter time): 30 days and one hour earlier in UTC.
    start = datetime(2026, 1, 9, 23, 0, tzinfo=UTC)  # 10 Jan 00:00 CET
    lic = active(start, term=3, tz="Europe/Berlin")
    assert lic.expires_at == datetime(2026, 4, 9, 22, 0, tzinfo=UTC)
    assert step_at(lic, 30) == datetime(2026, 3, 10, 23, 0, tzinfo=UTC)
    assert step_at(lic, 23) == datetime(2026, 3, 17, 23, 0, tzinfo=UTC)
    assert step_at(lic, 9) == datetime(2026, 3, 31, 22, 0, tzinfo=UTC)


def test_after_downtime_only_the_latest_due_step_counts() -> None:
    lic = active()
    found = due_step(lic, step_at(lic, 9) + timedelta(days=2), None)
    assert found is not None
    assert found.days == 9


def test_no_reminder_before_30_days_at_or_after_expiry_or_when_not_active() -> None:
    lic = active()
    assert lic.expires_at is not None
    assert due_step(lic, step_at(lic, 30) - US, None) is None
    assert due_step(lic, lic.expires_at, None) is None
    assert due_step(lic, lic.expires_at + timedelta(days=1), None) is None
    unactivated = replace(lic, activation_at=None)
    assert due_step(unactivated, step_at(lic, 2), None) is None


def test_a_free_license_invalidated_by_a_paid_one_gets_no_reminder() -> None:
    free = active(kind=Kind.FREE)
    paid = active(start=START + timedelta(days=100))
    moment = step_at(free, 16)
    assert [d.license.id for d in due([free], moment)] == [free.id]
    assert due([free, paid], moment) == []


def test_steps_before_activation_are_skipped() -> None:
    # One month from 1 February is 1 March: 28 days, so no 30-day reminder.
    lic = active(datetime(2026, 2, 1, tzinfo=UTC), term=1)
    assert due_step(lic, lic.activation_at or START, None) is None
    found = due_step(lic, step_at(lic, 23), None)
    assert found is not None
    assert found.days == 23


def test_a_step_once_recorded_and_every_earlier_one_are_never_due_again() -> None:
    lic = active()
    d16 = due_step(lic, step_at(lic, 16), None)
    assert d16 is not None
    assert unrecorded([d16], {lic.id: 16}) == []
    assert unrecorded([d16], {lic.id: 9}) == []
    assert unrecorded([d16], {lic.id: 23}) == [d16]
    assert unrecorded([d16], {}) == [d16]


def test_the_mail_key_names_the_tenant_and_its_steps_whatever_their_order() -> None:
    a, b = active(), active()
    moment = step_at(a, 30)
    dues = due([a, b], moment)
    assert len(dues) == 2
    assert mail_key("acme", dues) == mail_key("acme", list(reversed(dues)))
    assert mail_key("acme", dues) != mail_key("other", dues)
    assert mail_key("acme", dues) != mail_key("acme", dues[:1])
