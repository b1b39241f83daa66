"""Terms run in calendar months of the tenant's own calendar."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from policy.errors import BadInput
from policy.licenses import Kind, License
from policy.sqlite_store import SqliteStore
from policy.timeutil import parse_instant


def licensed(tz: str, at: str, months: int) -> License:
    issued = datetime(2026, 6, 1, tzinfo=UTC)
    activation = parse_instant(at, tz)
    return License("L", "T", Kind.BASIC_1, 1, months, issued, issued, activation, tz)


@pytest.mark.parametrize(
    ("tz", "at", "months", "expires_local"),
    [
        ("Europe/Berlin", "2027-03-01", 1, "2027-04-01T00:00:00+02:00"),
        ("Europe/Berlin", "2027-03-01", 12, "2028-03-01T00:00:00+01:00"),
        ("Asia/Tokyo", "2027-03-01", 1, "2027-04-01T00:00:00+09:00"),
        ("America/New_York", "2027-01-31", 1, "2027-02-28T00:00:00-05:00"),
        ("Europe/Berlin", "2027-10-31T02:30:00+01:00", 12, "2028-10-31T02:30:00+01:00"),
        ("UTC", "2028-02-29", 12, "2029-02-28T00:00:00+00:00"),
    ],
    ids=[
        "berlin-1-month-keeps-midnight-across-dst",
        "berlin-12-months-from-1-march",
        "tokyo-east-of-utc-loses-no-day",
        "new-york-31-january-ends-on-last-of-february",
        "berlin-ambiguous-autumn-hour-keeps-its-offset",
        "utc-29-february-plus-a-year",
    ],
)
def test_expiry_is_the_same_wall_time_months_later_in_the_tenant_zone(
    tz: str, at: str, months: int, expires_local: str
) -> None:
    license_ = licensed(tz, at, months)
    assert license_.expires_at == datetime.fromisoformat(expires_local)


def test_a_skipped_wall_time_lands_an_hour_later_not_earlier() -> None:
    """28 March 2027 02:30 in Berlin does not exist (clocks go forward)."""
    license_ = licensed("Europe/Berlin", "2027-02-28T02:30:00+01:00", 1)
    assert license_.expires_at == datetime.fromisoformat("2027-03-28T03:30:00+02:00")


async def test_licenses_read_from_the_store_carry_their_tenant_zone(
    tmp_path: Path,
) -> None:
    now = datetime(2026, 12, 1, tzinfo=UTC)
    store = await SqliteStore.open(tmp_path / "irm.db")
    await store.add_tenant("acme", "Europe/Berlin", now)
    lic = License("L1", "acme", Kind.BASIC_1, 1, 1, now, now)
    await store.add_licenses("acme", [(lic, "code")], now, "test")
    (stored,) = await store.licenses("acme")
    await store.close()
    assert stored.tz == "Europe/Berlin"


@pytest.mark.parametrize(
    ("tz", "at", "said"),
    [
        ("Europe/Berlin", "2027-03-28T02:30", "does not exist in time zone"),
        ("Europe/Berlin", "2027-03-28T02:00:00", "does not exist in time zone"),
        ("America/New_York", "2027-03-14T02:15", "does not exist in time zone"),
        ("Europe/Berlin", "2027-10-31T02:30", "is ambiguous in time zone"),
        ("America/New_York", "2027-11-07T01:30", "is ambiguous in time zone"),
    ],
)
def test_a_wall_time_skipped_or_repeated_by_the_clock_change_is_refused(
    tz: str, at: str, said: str
) -> None:
    with pytest.raises(BadInput) as refused:
        parse_instant(at, tz)

    message = str(refused.value)
    assert f"{at!r} {said} {tz}" in message
    rule = "a date-time without an offset is read in the tenant's time zone"
    assert rule in message.lower()


def test_the_refusal_of_a_repeated_time_names_both_offsets_to_choose_from() -> None:
    with pytest.raises(BadInput) as refused:
        parse_instant("2027-10-31T02:30", "Europe/Berlin")

    message = str(refused.value)
    assert "2027-10-31T02:30+02:00 (the first)" in message
    assert "2027-10-31T02:30+01:00 (the second)" in message
    for offered in ("2027-10-31T02:30+02:00", "2027-10-31T02:30+01:00"):
        assert parse_instant(offered, "Europe/Berlin") == datetime.fromisoformat(
            offered
        )


def test_the_refusal_of_a_skipped_time_says_where_the_offset_lands() -> None:
    with pytest.raises(BadInput) as refused:
        parse_instant("2027-03-28T02:30", "Europe/Berlin")

    assert "e.g. 2027-03-28T02:30+01:00 (which is 03:30 there)" in str(refused.value)


@pytest.mark.parametrize(
    ("tz", "at", "instant"),
    [
        ("Europe/Berlin", "2027-03-28T01:59", "2027-03-28T00:59:00+00:00"),
        ("Europe/Berlin", "2027-03-28T03:00", "2027-03-28T01:00:00+00:00"),
        ("Europe/Berlin", "2027-10-31T01:59", "2027-10-30T23:59:00+00:00"),
        ("Europe/Berlin", "2027-10-31T03:00", "2027-10-31T02:00:00+00:00"),
        ("Europe/Berlin", "2027-03-28", "2027-03-27T23:00:00+00:00"),
        ("UTC", "2027-03-28T02:30", "2027-03-28T02:30:00+00:00"),
    ],
)
def test_wall_times_either_side_of_a_change_name_one_instant(
    tz: str, at: str, instant: str
) -> None:
    assert parse_instant(at, tz) == datetime.fromisoformat(instant)


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("2026-02-30", "day 30 is out of range for February 2026, which has 28 days"),
        ("2028-02-30T08:00", "day 30 is out of range for February 2028, which has 29"),
        ("2026-04-31", "day 31 is out of range for April 2026, which has 30 days"),
        ("2026-00-10", "month 0 is out of range (1 to 12)"),
        ("2026-02-01T25:00", "is not a valid ISO 8601 date-time: hour must be"),
    ],
)
def test_a_date_not_in_the_calendar_is_called_invalid_not_malformed(
    text: str, said: str
) -> None:
    with pytest.raises(BadInput) as refused:
        parse_instant(text, "Europe/Berlin")

    assert said in str(refused.value)
    assert "not an ISO 8601 date" not in str(refused.value)
