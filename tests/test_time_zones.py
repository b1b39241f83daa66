"""Terms run in calendar months of the tenant's own calendar."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

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
