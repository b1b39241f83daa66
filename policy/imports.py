"""Deciding an import of license codes, all or nothing, before any write.

An import runs in two steps, both pure:

1. :func:`decode_csv` reads the file (:mod:`policy.csvimport`), and
   :func:`decode_rows` verifies each row's code and compares the columns
   the row declares (kind, capacity, ...) with what the code says.
2. :func:`plan_import` weighs the good rows against the store's facts
   (handed in, never read here) and ``now``: a code twice in the file, a
   code another tenant redeemed, a code past its stock limit.

If any row is bad, :class:`CsvImportError` lists every problem of every
bad row, by line, found by the reading, the decoding and the planning
alike (a row with an empty code hides no other row), and nothing is
imported. A code the tenant already holds is no error: the plan
reports it as already present, and importing it again changes nothing.
:func:`plan_code` is the same path for one pasted code.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from policy.codes import CodePayload, normalize, verify
from policy.csvimport import CsvRow, read_sales_rows
from policy.errors import CodeError, CsvImportError, RuleViolation
from policy.licenses import Kind, License, check_redeemable
from policy.timeutil import utc

Good = tuple[int, CodePayload, str]
"""A row that passed :func:`decode_rows`: line, payload, normalized code."""
Problem = tuple[int, str]
"""A bad row: its line and the reason."""


@dataclass(frozen=True, slots=True)
class ImportPlan:
    """What an import would do: codes to add, and codes already there."""

    new: list[Good]
    already_present: list[tuple[int, str]]
    """``(line, license id)`` of codes the tenant holds already."""


def license_from(payload: CodePayload, tenant: str, imported_at: datetime) -> License:
    """The available license a tenant gets from a verified code."""
    return License(
        id=payload.id,
        tenant=tenant,
        kind=payload.kind,
        capacity=payload.capacity,
        term_months=payload.term_months,
        issued_at=payload.issued_at,
        imported_at=imported_at,
    )


def decode_rows(
    rows: Sequence[CsvRow], public_key: Ed25519PublicKey
) -> tuple[list[Good], list[Problem]]:
    """Verify every row's code and check its declared columns against it."""
    good: list[Good] = []
    problems: list[Problem] = []
    for row in rows:
        try:
            payload = verify(row.code, public_key)
        except CodeError as exc:
            problems.append((row.line, str(exc)))
            continue
        mismatches = _mismatches(row.declared, payload)
        if mismatches:
            problems.append((row.line, "; ".join(mismatches)))
        else:
            good.append((row.line, payload, normalize(row.code)))
    return good, problems


def decode_csv(
    data: bytes, public_key: Ed25519PublicKey
) -> tuple[list[Good], list[Problem]]:
    """Read a sales CSV and decode its rows: the good ones, and every problem.

    A file that cannot be read at all raises :class:`CsvImportError`; the
    problems of its rows, whether the reading or the decoding found them,
    are returned together by line, for :func:`plan_import`.
    """
    rows, problems = read_sales_rows(data)
    good, bad = decode_rows(rows, public_key)
    return good, sorted([*problems, *bad], key=lambda problem: problem[0])


def plan_import(
    decoded: tuple[Sequence[Good], Sequence[Problem]],
    tenant: str,
    now: datetime,
    present_in_tenant: Collection[str],
    owners: Mapping[str, str],
) -> ImportPlan:
    """Plan importing ``decoded`` (what :func:`decode_rows` returned).

    ``present_in_tenant`` holds the ids of the tenant's licenses and
    ``owners`` maps each stored license id to its tenant. Raises
    :class:`CsvImportError` with the problems of both steps, by line.
    """
    good, decode_problems = decoded
    plan, problems = _plan(good, tenant, utc(now), present_in_tenant, owners)
    problems = sorted([*decode_problems, *problems], key=lambda problem: problem[0])
    if problems:
        raise CsvImportError(problems)
    return plan


def plan_code(
    code: str,
    public_key: Ed25519PublicKey,
    tenant: str,
    now: datetime,
    present_in_tenant: Collection[str],
    owners: Mapping[str, str],
) -> ImportPlan:
    """Plan importing one pasted code, by the same rules as a file.

    A single code has no lines to list, so the plain error is raised:
    :class:`CodeError` for a bad code, :class:`RuleViolation` for a code
    the rules refuse.
    """
    payload = verify(code, public_key)
    good = [(1, payload, normalize(code))]
    plan, problems = _plan(good, tenant, utc(now), present_in_tenant, owners)
    if problems:
        raise RuleViolation(problems[0][1])
    return plan


def _plan(
    good: Sequence[Good],
    tenant: str,
    now: datetime,
    present_in_tenant: Collection[str],
    owners: Mapping[str, str],
) -> tuple[ImportPlan, list[Problem]]:
    plan = ImportPlan(new=[], already_present=[])
    problems: list[Problem] = []
    first_line: dict[str, int] = {}
    for line, payload, code in sorted(good, key=lambda row: row[0]):
        first = first_line.setdefault(payload.id, line)
        owner = owners.get(payload.id)
        if first != line:
            problems.append(
                (line, f"code of license {payload.id} repeats line {first}")
            )
        elif payload.id in present_in_tenant or owner == tenant:
            plan.already_present.append((line, payload.id))
        elif owner is not None:
            # The other tenant's name is theirs to know, not this admin's.
            problems.append(
                (line, f"license {payload.id} is already redeemed in another tenant")
            )
        else:
            try:
                check_redeemable(license_from(payload, tenant, now), now)
            except RuleViolation as exc:
                problems.append((line, str(exc)))
            else:
                plan.new.append((line, payload, code))
    return plan, problems


def _mismatches(declared: Mapping[str, str], payload: CodePayload) -> list[str]:
    """Why the row's own columns disagree with its code (empty if they agree)."""
    checks: dict[str, Callable[[str, CodePayload], str | None]] = {
        "license_id": _check_id,
        "kind": _check_kind,
        "capacity": _check_capacity,
        "term_months": _check_term,
        "issued": _check_issued,
    }
    found = (
        checks[column](value, payload)
        for column, value in declared.items()
        if column in checks
    )
    return [message for message in found if message is not None]


def _check_id(value: str, payload: CodePayload) -> str | None:
    if value == payload.id:
        return None
    return f"declared license id {value!r} but the code is of license {payload.id}"


_KINDS = {"basic1": Kind.BASIC_1, "basic25": Kind.BASIC_25, "free": Kind.FREE}


def _check_kind(value: str, payload: CodePayload) -> str | None:
    # "Cloud Basic 25", "cloud-basic-25" and "Basic 25" all name one kind.
    key = "".join(char for char in value.casefold() if char.isalnum())
    kind = _KINDS.get(key.removeprefix("cloud"))
    if kind is None:
        return (
            f"declared kind {value!r} is not a license kind "
            "(Cloud Basic 1, Cloud Basic 25 or Cloud Free)"
        )
    if kind is payload.kind:
        return None
    return f"declared kind {kind.label} but the code is {payload.kind.label}"


def _check_capacity(value: str, payload: CodePayload) -> str | None:
    count = _whole_number(value)
    if count is None:
        return f"declared capacity {value!r} is not a whole number"
    if count == payload.capacity:
        return None
    return (
        f"declared capacity {count} but the code is {payload.kind.label} "
        f"for {payload.capacity} router(s)"
    )


def _check_term(value: str, payload: CodePayload) -> str | None:
    months = _whole_number(value)
    if months is None:
        return f"declared term {value!r} is not a whole number of months"
    if months == payload.term_months:
        return None
    return (
        f"declared term {months} months but the code's term is "
        f"{payload.term_months} months"
    )


def _check_issued(value: str, payload: CodePayload) -> str | None:
    issued = payload.issued_at.astimezone(UTC).date()
    readings = _dates(value)
    if not readings:
        return f"declared issue date {value!r} is not a date (use YYYY-MM-DD)"
    if issued in readings:
        return None
    return f"declared issue date {value!r} but the code was issued {issued.isoformat()}"


# Digits, digits in groups of three (1.000, 1,000, 1 000 or 1'000, as
# spreadsheets format them) or a whole number with zero decimals (25,00).
# Nine digits at most: Python refuses to convert very long digit strings.
_PLAIN = re.compile(r"\d{1,9}")
_GROUPED = re.compile(r"\d{1,3}([.,' ])\d{3}(?:\1\d{3}){0,2}")
_ZERO_DECIMALS = re.compile(r"(\d{1,9})[.,]0+")


def _whole_number(value: str) -> int | None:
    text = value.strip().replace("\u00a0", " ")
    if _PLAIN.fullmatch(text) or _GROUPED.fullmatch(text):
        return int("".join(char for char in text if char.isdigit()))
    zero = _ZERO_DECIMALS.fullmatch(text)
    return int(zero.group(1)) if zero else None


_DOTTED = re.compile(r"(\d{1,2})\.(\d{1,2})\.(\d{4}|\d{2})(?:[ T].*)?")
_SLASHED = re.compile(r"(\d{1,2})/(\d{1,2})/(\d{4}|\d{2})(?:[ T].*)?")


def _dates(value: str) -> set[date]:
    """Every day ``value`` can mean, in the forms spreadsheets save dates.

    ISO (the form sales writes), German ``29.02.2024``, and ``02/29/2024``
    or ``29/02/2024``: slashes are read both ways, since the locale that
    wrote them is unknown; the row is wrong only if neither reading fits.
    """
    text = value.strip()
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        only = moment.astimezone(UTC).date() if moment.tzinfo else moment.date()
    except (ValueError, OverflowError):
        pass
    else:
        return {only}

    dotted = _DOTTED.fullmatch(text)
    if dotted:
        day, month, year = dotted.groups()
        return _valid_dates([(year, month, day)])
    slashed = _SLASHED.fullmatch(text)
    if slashed:
        first, second, year = slashed.groups()
        return _valid_dates([(year, first, second), (year, second, first)])
    return set()


def _valid_dates(readings: Sequence[tuple[str, str, str]]) -> set[date]:
    days: set[date] = set()
    for year, month, day in readings:
        full_year = int(year) + (2000 if len(year) == 2 else 0)
        try:
            days.add(date(full_year, int(month), int(day)))
        except ValueError:
            continue
    return days
