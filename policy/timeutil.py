"""Calendar arithmetic and the product's time rules.

Every instant is an aware ``datetime`` in UTC. A date given without a time
means midnight at the start of that day in the tenant's time zone.
"""

from __future__ import annotations

import calendar
import functools
import re
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from policy.errors import BadInput


def utc(moment: datetime) -> datetime:
    """Return ``moment`` in UTC; naive datetimes are refused."""
    if moment.tzinfo is None:
        raise BadInput(f"instant {moment.isoformat()} has no time zone")
    return moment.astimezone(UTC)


def add_months(moment: datetime, months: int) -> datetime:
    """Add whole calendar months, clamping to the last day of the month.

    31 January plus one month is 28 (or 29) February; 29 February plus
    twelve months is 28 February.
    """
    index = moment.month - 1 + months
    year, month = moment.year + index // 12, index % 12 + 1
    last = _DAYS[month] + (month == 2 and calendar.isleap(year))
    return moment.replace(year=year, month=month, day=min(moment.day, last))


_DAYS = (0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def add_local_months(moment: datetime, months: int, tz_name: str) -> datetime:
    """Add calendar months on the wall clock of a time zone; return UTC.

    A license activated at midnight on 1 March in Berlin runs to midnight on
    1 April in Berlin, whatever UTC's calendar says. A wall time that does
    not exist (the hour skipped when clocks go forward) is read with the
    offset before the change, so it lands one hour later.
    """
    local = moment.astimezone(zone(tz_name))
    return add_months(local, months).astimezone(UTC)


def zone(name: str) -> ZoneInfo:
    """Look up an IANA time zone, naming it in the error if unknown."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise BadInput(f"time zone {name!r} is not an IANA zone name") from exc


def start_of_day(day: date, tz_name: str) -> datetime:
    """Midnight at the start of ``day`` in the zone, as a UTC instant."""
    return datetime.combine(day, time(0), tzinfo=zone(tz_name)).astimezone(UTC)


def parse_instant(text: str, tz_name: str) -> datetime:
    """Parse an ISO 8601 date or date-time given by an admin.

    A bare date is midnight in the tenant's zone; a date-time without an
    offset is read in the tenant's zone too; one with an offset is exact.
    A wall time without an offset that the zone skips (the hour lost when
    clocks go forward) or repeats (the hour clocks go back over) is
    refused: it names no instant, or two.
    """
    value = text.strip()
    _check_calendar(text, value)
    try:
        if len(value) == 10:
            return start_of_day(date.fromisoformat(value), tz_name)
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        if _ISO_DATE.match(value):
            raise BadInput(
                f"{text!r} is not a valid ISO 8601 date-time: {exc} "
                "(use YYYY-MM-DDTHH:MM, with an offset such as Z or +01:00 "
                "if wanted)"
            ) from exc
        raise BadInput(
            f"{text!r} is not an ISO 8601 date (YYYY-MM-DD) or date-time "
            "(YYYY-MM-DDTHH:MM, optionally with an offset such as Z or +01:00)"
        ) from exc
    if moment.tzinfo is None:
        return _wall_time(text, moment, tz_name)
    return moment.astimezone(UTC)


_ISO_DATE = re.compile(r"(\d{4})-(\d{2})-(\d{2})(?![\d])")


def _check_calendar(text: str, value: str) -> None:
    """Refuse a date shaped as ISO 8601 that is not in the calendar."""
    found = _ISO_DATE.match(value)
    if found is None:
        return
    year, month, day = (int(part) for part in found.groups())
    if not 1 <= month <= 12:
        raise BadInput(
            f"{text!r} is not a valid date: month {month} is out of range (1 to 12)"
        )
    if year < 1:
        raise BadInput(f"{text!r} is not a valid date: year 0 does not exist")
    last = calendar.monthrange(year, month)[1]
    if not 1 <= day <= last:
        raise BadInput(
            f"{text!r} is not a valid date: day {day} is out of range for "
            f"{calendar.month_name[month]} {year}, which has {last} days"
        )


def _wall_time(text: str, moment: datetime, tz_name: str) -> datetime:
    """The instant a wall time without offset names in the zone, if just one."""
    where = zone(tz_name)
    first = moment.replace(tzinfo=where, fold=0)
    second = moment.replace(tzinfo=where, fold=1)
    before, after = first.utcoffset(), second.utcoffset()
    assert before is not None
    assert after is not None
    if before == after:
        return first.astimezone(UTC)
    shown = moment.isoformat(timespec="seconds" if moment.second else "minutes")
    if first.astimezone(UTC).astimezone(where).replace(tzinfo=None) != moment:
        # zoneinfo reads a skipped wall time at the offset of before the
        # change: it would land later than asked, without a word.
        lands = first.astimezone(UTC).astimezone(where).strftime("%H:%M")
        raise BadInput(
            f"{text!r} does not exist in time zone {tz_name}: the clocks go "
            f"forward that day, from UTC{_offset(before)} to UTC"
            f"{_offset(after)}, and skip this wall time. A date-time without "
            "an offset is read in the tenant's time zone and must be a wall "
            "time that happens there: give one outside the skipped time, or "
            f"the instant with an offset, e.g. {shown}{_offset(before)} "
            f"(which is {lands} there)"
        )
    raise BadInput(
        f"{text!r} is ambiguous in time zone {tz_name}: the clocks go back "
        f"that day and this wall time happens twice, first at UTC"
        f"{_offset(before)} and again at UTC{_offset(after)}; a date-time "
        "without an offset is read in the tenant's time zone, so add the "
        f"offset you mean: {shown}{_offset(before)} (the first) or "
        f"{shown}{_offset(after)} (the second)"
    )


def _offset(delta: timedelta) -> str:
    minutes = int(delta.total_seconds()) // 60
    sign = "-" if minutes < 0 else "+"
    hours, minutes = divmod(abs(minutes), 60)
    return f"{sign}{hours:02d}:{minutes:02d}"


def to_text(moment: datetime | None) -> str | None:
    """The storage and wire form of an instant: ISO 8601 in UTC, with Z."""
    if moment is None:
        return None
    return _text(moment)


@functools.lru_cache(maxsize=64)
def _text(moment: datetime) -> str:
    # A batch of hellos is decided at one instant, which every reply,
    # presence and stored row spells out: uncached, formatting it was 4 %
    # of the gateway's profile under a closed loop of hellos.
    return utc(moment).isoformat().replace("+00:00", "Z")


def from_text(text: str | None) -> datetime | None:
    """Inverse of :func:`to_text`."""
    if text is None:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)
