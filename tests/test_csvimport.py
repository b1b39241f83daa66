"""Reading sales CSV files as spreadsheets in many locales save them."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from policy.codes import CodePayload, mint
from policy.csvimport import (
    MAX_FILE_BYTES,
    MAX_LINE_CHARS,
    CsvRow,
    check_file_size,
    read_sales_csv,
    read_sales_rows,
    write_sales_csv,
)
from policy.errors import CsvImportError
from policy.licenses import Kind

KEY = Ed25519PrivateKey.generate()
ISSUED = datetime(2024, 2, 29, 10, tzinfo=UTC)
PAYLOADS = [
    CodePayload("lic-a", Kind.BASIC_1, 1, 12, ISSUED),
    CodePayload("lic-b", Kind.BASIC_25, 25, 24, ISSUED),
    CodePayload("lic-c", Kind.FREE, 1000, 12, ISSUED),
]
SOLD = [(payload, mint(KEY, payload)) for payload in PAYLOADS]
A, B, C = (code for _, code in SOLD)


def problems_of(data: bytes) -> list[tuple[int, str]]:
    with pytest.raises(CsvImportError) as caught:
        read_sales_csv(data)
    return caught.value.problems


def codes_of(data: bytes) -> list[tuple[int, str]]:
    return [(row.line, row.code) for row in read_sales_csv(data)]


# --- what the vendor writes ---------------------------------------------------


def test_plain_sales_csv_is_utf8_comma_lf() -> None:
    data = write_sales_csv(SOLD)

    assert data.decode("utf-8").splitlines()[0] == (
        "license_id,kind,capacity,term_months,issued,code"
    )
    assert b"\r" not in data
    assert data.count(b"\n") == 4
    assert not data.startswith(b"\xef\xbb\xbf")


def test_german_sales_csv_is_as_a_german_spreadsheet_saves_it() -> None:
    data = write_sales_csv(SOLD, german=True)

    assert data.startswith(b"\xef\xbb\xbf")
    assert data.count(b"\r\n") == 4
    assert data[3:].decode("utf-8").split("\r\n")[0] == (
        "Lizenz-ID;Lizenztyp;Kapazität;Laufzeit (Monate);Ausgestellt;Lizenzcode"
    )


def test_written_csv_reads_back_with_every_declared_column() -> None:
    rows = read_sales_csv(write_sales_csv(SOLD))

    assert rows[1] == CsvRow(
        line=3,
        code=B,
        declared={
            "license_id": "lic-b",
            "kind": "Cloud Basic 25",
            "capacity": "25",
            "term_months": "24",
            "issued": "2024-02-29",
        },
    )


def test_f09_german_spreadsheet_file_reads_as_the_plain_one() -> None:
    german = read_sales_csv(write_sales_csv(SOLD, german=True))
    plain = read_sales_csv(write_sales_csv(SOLD))

    assert german == plain
    assert [row.code for row in german] == [A, B, C]


# --- encodings ------------------------------------------------------------------


def test_utf16_unicode_text_with_tabs_as_excel_saves_it() -> None:
    text = f"Lizenzcode\tKapazität\r\n{A}\t1\r\n{B}\t25\r\n"

    for encoding in ("utf-16", "utf-16-be"):
        data = text.encode(encoding)
        if encoding == "utf-16-be":
            data = b"\xfe\xff" + data
        rows = read_sales_csv(data)
        assert [(r.line, r.code, r.declared) for r in rows] == [
            (2, A, {"capacity": "1"}),
            (3, B, {"capacity": "25"}),
        ]


def test_utf8_without_bom_and_with_bom_read_alike() -> None:
    text = f"Schlüssel,Anzahl Router\n{A},1\n"

    assert read_sales_csv(text.encode()) == read_sales_csv(text.encode("utf-8-sig"))


def test_cp1252_file_with_an_umlaut_in_the_header() -> None:
    data = f"Kapazität;Lizenzschlüssel\r\n1;{A}\r\n".encode("cp1252")

    rows = read_sales_csv(data)

    assert rows == [CsvRow(2, A, {"capacity": "1"})]


def test_cp1252_characters_latin1_lacks_are_read_right() -> None:
    data = "Preis €;Typ\r\n9 €;Cloud Free\r\n".encode("cp1252")

    [(_, reason)] = problems_of(data)

    assert "'Preis €', 'Typ'" in reason


def test_header_garbled_by_a_second_program_is_still_recognised() -> None:
    garbled = "Kapazität".encode().decode("cp1252")  # "KapazitÃ¤t"
    data = f"{garbled};Lizenzcode\n25;{B}\n".encode()

    assert read_sales_csv(data)[0].declared == {"capacity": "25"}


def test_broken_utf16_is_reported_not_guessed() -> None:
    data = "code\r\n".encode("utf-16") + b"\x00\xd8"  # a lone surrogate half

    [(line, reason)] = problems_of(data)

    assert line == 2
    assert "UTF-16 byte-order mark but is not UTF-16" in reason


def test_utf16_without_bom_is_refused_with_a_hint() -> None:
    [(_, reason)] = problems_of(f"code\n{A}\n".encode("utf-16-le"))

    assert "NUL" in reason


def test_an_excel_workbook_is_refused_with_a_hint() -> None:
    [(_, reason)] = problems_of(b"PK\x03\x04\x14\x00\x06\x00rest of a zip")

    assert "save it as CSV" in reason


# --- delimiters, quoting, line ends, blank lines ------------------------------


@pytest.mark.parametrize("delimiter", [",", ";", "\t"])
@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_every_delimiter_and_line_end(delimiter: str, newline: str) -> None:
    lines = [f"code{delimiter}kind", f"{A}{delimiter}Cloud Basic 1"]
    data = (newline.join(lines) + newline).encode()

    assert read_sales_csv(data) == [CsvRow(2, A, {"kind": "Cloud Basic 1"})]


def test_quoted_fields_with_delimiters_quotes_and_line_breaks() -> None:
    data = (
        "note;code;kind\r\n"
        f'"first; ""urgent""";"{A}";"Cloud Basic 1"\r\n'
        f'"two\r\nlines; here";{B};Cloud Basic 25\r\n'
        f'plain;"{C}";"Cloud Free"\r\n'
    ).encode()

    assert codes_of(data) == [(2, A), (3, B), (5, C)]


def test_delimiter_is_found_when_values_hold_other_delimiters() -> None:
    data = (
        f"code;kind;note\n{A};Cloud Basic 1;a, b, c\n{B};Cloud Basic 25;d, e\n"
    ).encode()

    assert codes_of(data) == [(2, A), (3, B)]


def test_header_line_overrules_a_sniffed_delimiter_it_lacks() -> None:
    # csv.Sniffer picks ";" here, from the quoted "42" after a semicolon.
    data = f'code,note\n{A},see ticket;"42"\n{B},;\n{C},ok\n'.encode()

    assert codes_of(data) == [(2, A), (3, B), (4, C)]


def test_blank_lines_anywhere_are_skipped_and_lines_stay_physical() -> None:
    data = (
        f"\n\r\ncode,kind\n\n{A},Cloud Basic 1\n   \n,\n{B},Cloud Basic 25\n\n\n"
    ).encode()

    assert codes_of(data) == [(5, A), (8, B)]


def test_delimiter_only_rows_as_spreadsheets_write_them_are_blank() -> None:
    data = f"code;kind;;\r\n{A};x;;\r\n;;;\r\n;;;\r\n".encode()

    assert codes_of(data) == [(2, A)]


def test_code_wrapped_inside_its_cell_is_joined() -> None:
    data = f'code\n"{A[:50]}\n{A[50:]}"\n{B}\n'.encode()

    assert codes_of(data) == [(2, A), (4, B)]


def test_headerless_single_column_of_codes() -> None:
    data = f"{A}\r\n\r\n  {B}  \r\n{C}\r\n\r\n".encode()

    assert read_sales_csv(data) == [
        CsvRow(1, A, {}),
        CsvRow(3, B, {}),
        CsvRow(4, C, {}),
    ]


def test_a_byte_order_mark_saved_twice_is_dropped() -> None:
    data = ("\ufeff" + A + "\n").encode("utf-8-sig")

    assert codes_of(data) == [(1, A)]


def test_an_empty_cell_declares_nothing() -> None:
    data = f"code,kind,capacity\n{A}, ,1\n".encode()

    assert read_sales_csv(data) == [CsvRow(2, A, {"capacity": "1"})]


def test_unknown_columns_are_ignored() -> None:
    data = f"Kunde,Bemerkung,code,Preis\nACME,bitte schnell,{A},9.99\n".encode()

    assert read_sales_csv(data) == [CsvRow(2, A, {})]


def test_empty_trailing_fields_are_tolerated() -> None:
    data = f"code,kind\n{A},Cloud Basic 1,,\n".encode()

    assert codes_of(data) == [(2, A)]


# --- header names -----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "column"),
    [
        ("code", "code"),
        ("CODE", "code"),
        ("License Code", "code"),
        ("license_code", "code"),
        ("Lizenzcode", "code"),
        ("Lizenzschlüssel", "code"),
        ("LIZENZSCHLUESSEL", "code"),
        ("Schlüssel", "code"),
        ("license_id", "license_id"),
        ("License ID", "license_id"),
        ("id", "license_id"),
        ("Lizenz-ID", "license_id"),
        ("Lizenz ID", "license_id"),
        ("kind", "kind"),
        ("Type", "kind"),
        ("License type", "kind"),
        ("Typ", "kind"),
        ("Lizenztyp", "kind"),
        ("Art", "kind"),
        ("capacity", "capacity"),
        ("Kapazität", "capacity"),
        ("KAPAZITAET", "capacity"),
        ("Anzahl Router", "capacity"),
        ("term", "term_months"),
        ("term_months", "term_months"),
        ("Laufzeit", "term_months"),
        ("Laufzeit (Monate)", "term_months"),
        ("issued", "issued"),
        ("Issue date", "issued"),
        ("Ausgestellt", "issued"),
        ("Ausstellungsdatum", "issued"),
    ],
)
def test_header_names_in_english_and_german(name: str, column: str) -> None:
    other = "Lizenzcode" if column != "code" else "Bemerkung"
    data = f'"{name}";{other}\n{A};{A}\n'.encode()

    [row] = read_sales_csv(data)

    assert row.code == A
    if column != "code":
        assert row.declared == {column: A}


# --- bad files and bad rows ---------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"\xef\xbb\xbf", b"\n\r\n  \n", b"\xff\xfe"])
def test_empty_file_is_refused(data: bytes) -> None:
    assert problems_of(data) == [(1, "the file is empty")]


def test_header_without_rows_is_refused() -> None:
    [(line, reason)] = problems_of(b"\ncode;kind\r\n\r\n")

    assert line == 2
    assert "no rows" in reason


def test_header_without_a_code_column_is_refused() -> None:
    [(line, reason)] = problems_of(f"id,kind\nx,{A}\n".encode())

    assert line == 1
    assert "no code column" in reason
    assert "'id', 'kind'" in reason


def test_first_line_that_is_neither_header_nor_code_is_refused() -> None:
    [(line, reason)] = problems_of(b"hello;world\n1;2\n")

    assert line == 1
    assert "neither a header" in reason


def test_code_column_named_twice_is_refused() -> None:
    [(_, reason)] = problems_of(f"code;Lizenzcode\n{A};{A}\n".encode())

    assert "columns 1 and 2 are both the code column" in reason


def test_every_bad_row_is_listed_with_its_line() -> None:
    data = (
        "code;kind;capacity\r\n"
        f"{A};Cloud Basic 1;1\r\n"
        ";Cloud Basic 1;1\r\n"
        "\r\n"
        f"{B};Cloud Basic 25\r\n"
        f"{C};Cloud;Free;1000\r\n"
        f'"  ";Cloud Free;10\r\n'
    ).encode()

    problems = problems_of(data)

    assert [line for line, _ in problems] == [3, 5, 6, 7]
    assert "license code is empty" in problems[0][1]
    assert "has 2 fields where the header has 3" in problems[1][1]
    assert "has 4 fields where the header has 3" in problems[2][1]
    assert "license code is empty" in problems[3][1]


def test_unclosed_quote_is_reported_where_it_starts() -> None:
    data = f'code,kind\n{A},x\n"{B},x\n{C},x\n'.encode()

    [(line, reason)] = problems_of(data)

    assert line == 3
    assert "malformed CSV" in reason


def test_text_after_a_closing_quote_is_reported() -> None:
    data = f'code,kind\n"{A}"junk,x\n{B},x\n'.encode()

    [(line, reason)] = problems_of(data)

    assert line == 2
    assert "malformed CSV" in reason


def test_an_oversized_line_is_refused_before_it_is_parsed_naming_the_limit() -> None:
    data = b"code\n" + b"IRM1." + b"A" * 200_000 + b"\n"

    [(line, reason)] = problems_of(data)

    assert line == 2
    assert f"longer than {MAX_LINE_CHARS:,} characters" in reason


def test_a_single_line_of_60_mb_is_refused_quickly() -> None:
    """A 200 MB line took 1.5 GB before the csv module refused it."""
    data = b"code," + b"A" * 60_000_000

    started = time.perf_counter()
    [(line, reason)] = problems_of(data)

    assert time.perf_counter() - started < 3
    assert line == 1
    assert "longer than 10,000 characters" in reason


def test_an_oversized_field_over_many_lines_is_reported_not_raised() -> None:
    data = b'code\n"IRM1.' + (b"A" * 9000 + b"\n") * 20 + b'"\n'

    [(line, reason)] = problems_of(data)

    assert line == 2
    assert "field larger than field limit" in reason


def test_a_file_larger_than_any_sales_csv_is_refused_unread() -> None:
    data = b"code\n" + b"\n" * MAX_FILE_BYTES

    [(line, reason)] = problems_of(data)

    assert line == 1
    assert "larger than the 64 MiB a sales CSV can be" in reason
    with pytest.raises(CsvImportError, match="64 MiB"):
        check_file_size(MAX_FILE_BYTES + 1)
    check_file_size(MAX_FILE_BYTES)


def test_a_pipe_delimited_file_names_the_delimiters_recognised() -> None:
    data = f"code|kind|capacity\n{A}|Cloud Basic 1|1\n".encode()

    [(line, reason)] = problems_of(data)

    assert line == 1
    assert "neither a header" in reason
    assert "none of the delimiters recognised, ',', ';' and tab" in reason
    assert "it holds '|'" in reason


def test_a_first_line_split_at_a_delimiter_says_which() -> None:
    [(_, reason)] = problems_of(b"hello;world\n1;2\n")

    assert "read with ';' as the delimiter" in reason
    assert "',', ';' and tab" in reason


def test_every_problem_of_one_row_is_listed() -> None:
    data = f"code;kind\n;Cloud;Basic 1\n{A};Cloud Basic 1\n".encode()

    problems = problems_of(data)

    assert [line for line, _ in problems] == [2, 2]
    assert "has 3 fields where the header has 2" in problems[0][1]
    assert "license code is empty" in problems[1][1]


def test_bad_rows_come_with_the_good_rows_for_the_caller_to_check() -> None:
    data = f"code;kind\n{A};x\n\n;y\n{B};x\n".encode()

    rows, problems = read_sales_rows(data)

    assert [(row.line, row.code) for row in rows] == [(2, A), (5, B)]
    assert problems == [(4, "the license code is empty")]


# --- fuzz -------------------------------------------------------------------


def read_or_refuse(data: bytes) -> None:
    """Rows that make sense, or a CsvImportError naming lines; nothing else."""
    try:
        rows = read_sales_csv(data)
    except CsvImportError as exc:
        problems = exc.problems
    else:
        assert rows
        assert all(row.code and not any(c.isspace() for c in row.code) for row in rows)
        lines = [row.line for row in rows]
        assert lines == sorted(set(lines))
        return
    assert problems
    assert all(line >= 1 for line, _ in problems)


@given(st.binary(max_size=2000))
def test_any_bytes_give_rows_or_a_csv_import_error(data: bytes) -> None:
    read_or_refuse(data)


CSV_PIECES = [",", ";", "\t", '"', "\r", "\n", "\r\n", " ", "\ufeff", "\x00", "ä"]
CSV_WORDS = ["code", "Lizenzcode", "kind", "Kapazität", "IRM1.", "IRM1.abc.def", "1"]
CSV_ALPHABET = st.sampled_from([*CSV_PIECES, *CSV_WORDS])


@given(
    st.lists(CSV_ALPHABET, max_size=80).map("".join),
    st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "cp1252", "latin-1"]),
)
def test_csv_shaped_text_gives_rows_or_a_csv_import_error(
    text: str, encoding: str
) -> None:
    read_or_refuse(text.encode(encoding, errors="replace"))
