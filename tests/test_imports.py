"""Planning an import: all or nothing, every bad row named by its line."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from policy.codes import CodePayload, mint
from policy.csvimport import CsvRow, read_sales_csv, write_sales_csv
from policy.errors import BadInput, CodeError, CsvImportError, RuleViolation
from policy.imports import (
    ImportPlan,
    decode_csv,
    decode_rows,
    license_from,
    plan_code,
    plan_import,
)
from policy.licenses import Kind, License

KEY = Ed25519PrivateKey.generate()
PUBLIC = KEY.public_key()
US = timedelta(microseconds=1)
ISSUED = datetime(2025, 1, 10, 8, tzinfo=UTC)  # stock limit 2027-01-10 08:00
NOW = datetime(2025, 6, 1, tzinfo=UTC)


def payload(
    lid: str,
    kind: Kind = Kind.BASIC_1,
    *,
    capacity: int | None = None,
    term_months: int = 12,
    issued_at: datetime = ISSUED,
) -> CodePayload:
    default = {Kind.BASIC_1: 1, Kind.BASIC_25: 25, Kind.FREE: 100}[kind]
    capacity = default if capacity is None else capacity
    return CodePayload(lid, kind, capacity, term_months, issued_at)


def code(
    lid: str,
    kind: Kind = Kind.BASIC_1,
    *,
    capacity: int | None = None,
    issued_at: datetime = ISSUED,
) -> str:
    return mint(KEY, payload(lid, kind, capacity=capacity, issued_at=issued_at))


def row(line: int, lid: str, kind: Kind = Kind.BASIC_1, /, **declared: str) -> CsvRow:
    return CsvRow(line, code(lid, kind), declared)


def plan(
    rows: list[CsvRow],
    now: datetime = NOW,
    present: frozenset[str] = frozenset(),
    owners: dict[str, str] | None = None,
) -> ImportPlan:
    return plan_import(decode_rows(rows, PUBLIC), "T8", now, present, owners or {})


def refused(
    rows: list[CsvRow],
    now: datetime = NOW,
    present: frozenset[str] = frozenset(),
    owners: dict[str, str] | None = None,
) -> list[tuple[int, str]]:
    with pytest.raises(CsvImportError) as caught:
        plan(rows, now, present, owners)
    return caught.value.problems


# --- decode_rows ------------------------------------------------------------


def test_good_rows_decode_to_their_payloads() -> None:
    rows = [row(2, "a"), CsvRow(3, f" {code('b')[:30]}\n{code('b')[30:]} ", {})]

    good, problems = decode_rows(rows, PUBLIC)

    assert problems == []
    assert [(line, p.id) for line, p, _ in good] == [(2, "a"), (3, "b")]
    assert good[1][2] == code("b")  # whitespace removed


def test_forged_code_is_a_bad_row_naming_why() -> None:
    forged = mint(Ed25519PrivateKey.generate(), payload("f"))

    good, problems = decode_rows([row(2, "a"), CsvRow(3, forged, {})], PUBLIC)

    assert [line for line, _, _ in good] == [2]
    assert problems == [(3, problems[0][1])]
    assert "forged or was altered" in problems[0][1]


@pytest.mark.parametrize(
    ("declared", "reason"),
    [
        (
            {"kind": "Cloud Basic 25"},
            "declared kind Cloud Basic 25 but the code is Cloud Basic 1",
        ),
        ({"kind": "Gold"}, "declared kind 'Gold' is not a license kind"),
        (
            {"capacity": "25"},
            "declared capacity 25 but the code is Cloud Basic 1 for 1 router(s)",
        ),
        ({"capacity": "viele"}, "declared capacity 'viele' is not a whole number"),
        ({"term_months": "24"}, "declared term 24 months but the code's term is 12"),
        ({"license_id": "b"}, "declared license id 'b' but the code is of license a"),
        (
            {"issued": "2025-01-11"},
            "declared issue date '2025-01-11' but the code was issued 2025-01-10",
        ),
        ({"issued": "soon"}, "declared issue date 'soon' is not a date"),
        ({"issued": "31.02.2025"}, "is not a date"),
    ],
)
def test_declared_column_disagreeing_with_the_code_is_a_bad_row(
    declared: dict[str, str], reason: str
) -> None:
    good, problems = decode_rows([row(4, "a", **declared)], PUBLIC)

    assert good == []
    assert problems == [(4, problems[0][1])]
    assert reason in problems[0][1]


def test_every_disagreeing_column_of_a_row_is_named() -> None:
    _, [(_, reason)] = decode_rows(
        [row(2, "a", kind="Cloud Basic 25", capacity="25")], PUBLIC
    )

    assert "declared kind" in reason
    assert "declared capacity" in reason


@pytest.mark.parametrize(
    ("kind", "declared"),
    [
        (Kind.BASIC_25, {"kind": "Cloud Basic 25", "capacity": "25"}),
        (Kind.BASIC_25, {"kind": "cloud-basic-25"}),
        (Kind.BASIC_25, {"kind": "BASIC 25"}),
        (Kind.FREE, {"kind": "Cloud Free", "capacity": "100,00"}),
        (Kind.BASIC_1, {"kind": "cloud_basic_1", "capacity": "1.0"}),
        (Kind.BASIC_1, {"term_months": "12", "license_id": "a"}),
        (Kind.BASIC_1, {"issued": "2025-01-10"}),
        (Kind.BASIC_1, {"issued": "2025-01-10T08:00:00Z"}),
        (Kind.BASIC_1, {"issued": "2025-01-10 09:00:00+01:00"}),
        (Kind.BASIC_1, {"issued": "10.01.2025"}),
        (Kind.BASIC_1, {"issued": "10.1.25"}),
        (Kind.BASIC_1, {"issued": "01/10/2025"}),
        (Kind.BASIC_1, {"issued": "10/01/2025 08:00"}),
    ],
)
def test_declared_columns_as_spreadsheets_rewrite_them_agree(
    kind: Kind, declared: dict[str, str]
) -> None:
    good, problems = decode_rows([row(2, "a", kind, **declared)], PUBLIC)

    assert problems == []
    assert len(good) == 1


def test_grouped_thousands_are_read_as_a_whole_number() -> None:
    free = CsvRow(2, code("f", Kind.FREE, capacity=1000), {"capacity": "1.000"})

    assert decode_rows([free], PUBLIC)[1] == []


# --- plan_import --------------------------------------------------------------


def test_new_codes_are_planned_in_line_order() -> None:
    result = plan([row(3, "b"), row(2, "a")])

    assert [(line, p.id) for line, p, _ in result.new] == [(2, "a"), (3, "b")]
    assert result.already_present == []


def test_f10_a_code_the_tenant_has_is_already_present_not_an_error() -> None:
    result = plan([row(2, "a"), row(3, "b")], present=frozenset({"b"}))

    assert [p.id for _, p, _ in result.new] == ["a"]
    assert result.already_present == [(3, "b")]


def test_f10_a_code_twice_in_the_file_names_both_lines_and_nothing_is_planned() -> None:
    rows = [row(2, "a"), row(3, "b"), row(4, "c"), row(7, "a")]

    problems = refused(rows, present=frozenset({"b"}))

    assert problems == [(7, "code of license a repeats line 2")]


def test_f10_from_a_german_file() -> None:
    sold = [(payload(lid), code(lid)) for lid in ("a", "b", "a")]
    rows = read_sales_csv(write_sales_csv(sold, german=True))

    problems = refused(rows, present=frozenset({"b"}))

    assert problems == [(4, "code of license a repeats line 2")]


def test_a_file_of_codes_all_present_is_a_no_op_not_an_error() -> None:
    result = plan([row(2, "a"), row(3, "b")], present=frozenset({"a", "b"}))

    assert result.new == []
    assert result.already_present == [(2, "a"), (3, "b")]


def test_code_redeemed_by_another_tenant_is_refused_without_naming_it() -> None:
    problems = refused([row(2, "a"), row(3, "b")], owners={"b": "ACME-secret"})

    assert problems == [(3, "license b is already redeemed in another tenant")]


def test_code_stored_for_this_tenant_counts_as_present() -> None:
    result = plan([row(2, "a")], owners={"a": "T8"})

    assert result.already_present == [(2, "a")]


def test_problems_of_both_steps_are_listed_together_by_line() -> None:
    rows = [
        row(2, "a"),
        row(3, "b", kind="Cloud Free"),
        CsvRow(4, "not a code at all, really", {}),
        row(5, "a"),
        row(6, "c"),
    ]

    problems = refused(rows, owners={"c": "other"})

    assert [line for line, _ in problems] == [3, 4, 5, 6]


def eight_bad_rows() -> bytes:
    """The tester's file: one good row, then eight bad ones, each its own way."""
    good, forged = code("a"), mint(Ed25519PrivateKey.generate(), payload("f"))
    head, body, signature = code("b").split(".")
    altered = f"{head}.{body[:-2]}{'A' if body[-2] != 'A' else 'B'}{body[-1]}"
    lines = [
        "code;kind;capacity",
        f"{good};Cloud Basic 1;1",  # 2: good
        f"{forged};Cloud Basic 1;1",  # 3: forged
        f"{good};Cloud Basic 1;1",  # 4: repeats line 2
        "hello;Cloud Basic 1;1",  # 5: garbage
        f"{altered}.{signature};Cloud Basic 1;1",  # 6: altered
        ";Cloud Basic 1;1",  # 7: empty code
        f"{code('c')[:40]};Cloud Basic 1;1",  # 8: damaged
        f"{code('d')};Cloud Basic 25;1",  # 9: declares another kind
        f"{code('e')};Cloud;Basic 1;1",  # 10: a delimiter in a value
    ]
    return "\r\n".join(lines).encode()


def test_an_empty_code_hides_no_other_bad_row_every_one_is_listed_in_order() -> None:
    decoded = decode_csv(eight_bad_rows(), PUBLIC)

    with pytest.raises(CsvImportError) as caught:
        plan_import(decoded, "T8", NOW, frozenset(), {})

    problems = caught.value.problems
    assert [line for line, _ in problems] == [3, 4, 5, 6, 7, 8, 9, 10]
    said = dict(problems)
    assert "forged or was altered" in said[3]
    assert "repeats line 2" in said[4]
    assert "the license code is empty" in said[7]
    assert "declared kind Cloud Basic 25" in said[9]
    assert "has 4 fields where the header has 3" in said[10]


def test_a_file_that_cannot_be_read_at_all_is_still_refused_at_once() -> None:
    with pytest.raises(CsvImportError) as caught:
        decode_csv(b"code|kind\nx|y\n", PUBLIC)

    [(line, reason)] = caught.value.problems
    assert line == 1
    assert "'|'" in reason


def test_planning_refuses_a_naive_now() -> None:
    with pytest.raises(BadInput):
        plan([row(2, "a")], now=datetime(2025, 6, 1))


# --- the stock limit (F07, F08) ---------------------------------------------


LIMIT = datetime(2027, 1, 10, 8, tzinfo=UTC)


def test_f07_stock_limit_minus_one_microsecond_is_redeemable() -> None:
    assert [p.id for _, p, _ in plan([row(2, "a")], now=LIMIT - US).new] == ["a"]


@pytest.mark.parametrize("now", [LIMIT, LIMIT + US, LIMIT + timedelta(days=400)])
def test_f07_at_and_after_the_stock_limit_a_code_is_refused(now: datetime) -> None:
    [(line, reason)] = refused([row(2, "a")], now=now)

    assert line == 2
    assert "non-redeemable" in reason
    assert "2027-01-10T08:00:00Z" in reason


def test_f08_issued_on_29_february_is_in_stock_until_28_february() -> None:
    leap = datetime(2024, 2, 29, tzinfo=UTC)
    limit = datetime(2026, 2, 28, tzinfo=UTC)
    rows = [CsvRow(2, code("a", issued_at=leap), {"issued": "29.02.2024"})]

    assert plan(rows, now=limit - US).new
    [(_, reason)] = refused(rows, now=limit)
    assert "2026-02-28T00:00:00Z" in reason


def test_a_code_already_present_is_no_error_even_past_its_stock_limit() -> None:
    result = plan([row(2, "a")], now=LIMIT, present=frozenset({"a"}))

    assert result.already_present == [(2, "a")]


# --- one pasted code ----------------------------------------------------------


def test_single_code_is_planned_by_the_same_rules() -> None:
    result = plan_code(f" {code('a')}\n", PUBLIC, "T8", NOW, frozenset(), {})

    assert [(line, p.id, c) for line, p, c in result.new] == [(1, "a", code("a"))]


def test_single_code_already_present_says_so() -> None:
    result = plan_code(code("a"), PUBLIC, "T8", NOW, frozenset({"a"}), {})

    assert result == ImportPlan(new=[], already_present=[(1, "a")])


def test_single_code_errors_read_without_line_numbers() -> None:
    forged = mint(Ed25519PrivateKey.generate(), payload("a"))

    with pytest.raises(CodeError, match="forged") as bad:
        plan_code(forged, PUBLIC, "T8", NOW, frozenset(), {})
    with pytest.raises(RuleViolation) as taken:
        plan_code(code("a"), PUBLIC, "T8", NOW, frozenset(), {"a": "other"})
    with pytest.raises(RuleViolation, match="non-redeemable"):
        plan_code(code("a"), PUBLIC, "T8", LIMIT, frozenset(), {})

    assert "line" not in str(bad.value)
    assert str(taken.value) == "license a is already redeemed in another tenant"


# --- license_from -------------------------------------------------------------


def test_license_from_a_payload_is_available_in_the_tenant() -> None:
    lic = license_from(payload("a", Kind.BASIC_25, term_months=6), "T8", NOW)

    assert lic == License(
        id="a",
        tenant="T8",
        kind=Kind.BASIC_25,
        capacity=25,
        term_months=6,
        issued_at=ISSUED,
        imported_at=NOW,
        activation_at=None,
    )
