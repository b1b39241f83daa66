"""The sales CSV: written by the vendor, read back from any spreadsheet.

A CSV that went through a spreadsheet comes back in that program's local
habits: a byte-order mark, UTF-16 ("Unicode text"), cp1252, ``;`` or tab
between fields, CRLF or CR line ends, quoted fields, blank and
delimiter-only lines, and headers in English or German. Reading turns any
of these into :class:`CsvRow` values with the physical line number an
editor shows, or raises :class:`CsvImportError` listing every bad line
(:func:`read_sales_rows` returns the bad lines' problems beside the good
rows instead, for the import to add its own). A file or a line far larger
than any sales CSV has is refused before it is parsed.

Nothing here verifies a code or compares the other columns with it; that
is :mod:`policy.imports`.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice

from policy.codes import PREFIX, CodePayload, normalize
from policy.errors import CsvImportError
from policy.timeutil import utc

COLUMNS = ("license_id", "kind", "capacity", "term_months", "issued", "code")
GERMAN_HEADERS = (
    "Lizenz-ID",
    "Lizenztyp",
    "Kapazität",
    "Laufzeit (Monate)",
    "Ausgestellt",
    "Lizenzcode",
)

# Header names as people write them; compared after _key() folds case,
# umlauts and punctuation, so "Lizenz-ID", "LIZENZ ID" and "lizenz_id" agree.
_HEADER_NAMES = {
    "code": (
        "code",
        "license code",
        "licence code",
        "license key",
        "licence key",
        "key",
        "Lizenzcode",
        "Lizenzschlüssel",
        "Lizenz-Code",
        "Schlüssel",
        "Code der Lizenz",
    ),
    "license_id": (
        "license_id",
        "license id",
        "licence id",
        "id",
        "Lizenz-ID",
        "Lizenz ID",
        "Lizenznummer",
        "Lizenz-Nr.",
    ),
    "kind": (
        "kind",
        "type",
        "license type",
        "licence type",
        "license kind",
        "product",
        "Typ",
        "Lizenztyp",
        "Lizenzart",
        "Art",
        "Produkt",
    ),
    "capacity": (
        "capacity",
        "routers",
        "number of routers",
        "Kapazität",
        "Anzahl Router",
        "Routeranzahl",
        "Anzahl",
    ),
    "term_months": (
        "term",
        "term_months",
        "term (months)",
        "term in months",
        "months",
        "Laufzeit",
        "Laufzeit (Monate)",
        "Laufzeit in Monaten",
        "Monate",
    ),
    "issued": (
        "issued",
        "issued at",
        "issued on",
        "issue date",
        "date issued",
        "Ausgestellt",
        "Ausgestellt am",
        "Ausstellungsdatum",
    ),
}

DELIMITERS = (",", ";", "\t")
_DELIMITER_NAMES = {",": "','", ";": "';'", "\t": "tab"}
# Other characters people separate fields with, to name in an error.
_OTHER_DELIMITERS = ("|", ":", "#", "/", "^", "~", "!")
MAX_FILE_BYTES = 64 * 1024 * 1024
"""The largest file read: 100,000 codes (a vendor's most at once) take
about 33 MB as UTF-8 and twice that as UTF-16 ("Unicode text"), so a
larger file is no sales CSV; it is refused before it is read."""
MAX_LINE_CHARS = 10_000
"""The longest line read: a row of the sales CSV is about 330 characters."""
LIMITS_TEXT = (
    f"at most {MAX_FILE_BYTES // (1024 * 1024)} MiB and {MAX_LINE_CHARS:,} "
    "characters a line"
)
"""The limits, said for help texts."""
_LONG_LINE = re.compile(f"[^\r\n]{{{MAX_LINE_CHARS + 1}}}")
# The sniffer's time grows with the lines it sees (it tallies every
# character per line) and, for its quote patterns, with the square of the
# characters: on 4,096 quote-and-newline characters it took over a second.
# Real headers and a few dozen rows fit well within these bounds.
_SNIFF_LINES = 40
_SNIFF_CHARS = 4096
# Byte-order marks, longest first: a UTF-32 LE mark begins like UTF-16 LE.
_BOMS = (
    (b"\xef\xbb\xbf", "utf-8-sig", "UTF-8"),
    (b"\xff\xfe\x00\x00", "utf-32", "UTF-32"),
    (b"\x00\x00\xfe\xff", "utf-32", "UTF-32"),
    (b"\xff\xfe", "utf-16", "UTF-16"),
    (b"\xfe\xff", "utf-16", "UTF-16"),
)


@dataclass(frozen=True, slots=True)
class CsvRow:
    """One data row: its physical line, its code and the other known columns.

    ``declared`` maps the names in :data:`COLUMNS` (not ``code``) to the
    non-empty values the row gives for them.
    """

    line: int
    code: str
    declared: dict[str, str]


@dataclass(frozen=True, slots=True)
class _Layout:
    """Where the columns are, from the header (or the first code line)."""

    line: int
    width: int
    code: int
    declared: dict[str, int]
    has_header: bool


def write_sales_csv(
    rows: Sequence[tuple[CodePayload, str]], german: bool = False
) -> bytes:
    """The CSV that sales sends out, one row per ``(payload, code)``.

    ``german`` writes it the way a spreadsheet in a German locale saves:
    UTF-8 with a byte-order mark, ``;``, CRLF and German headers. Values
    are the same either way (ISO dates), so both read back alike.
    """
    buffer = io.StringIO()
    writer = csv.writer(
        buffer,
        delimiter=";" if german else ",",
        lineterminator="\r\n" if german else "\n",
    )
    writer.writerow(GERMAN_HEADERS if german else COLUMNS)
    for payload, code in rows:
        issued = utc(payload.issued_at).date().isoformat()
        kind = payload.kind.label
        writer.writerow(
            [payload.id, kind, payload.capacity, payload.term_months, issued, code]
        )
    return buffer.getvalue().encode("utf-8-sig" if german else "utf-8")


def read_sales_csv(data: bytes) -> list[CsvRow]:
    """Read a sales CSV from a spreadsheet; every bad line is reported."""
    rows, problems = read_sales_rows(data)
    if problems:
        raise CsvImportError(problems)
    return rows


def read_sales_rows(data: bytes) -> tuple[list[CsvRow], list[tuple[int, str]]]:
    """The good rows of a sales CSV, and every problem of the bad ones, by line.

    A file that cannot be read as a whole (too large, not text, no header)
    raises :class:`CsvImportError`; a bad row is returned as a problem, so
    that the caller can add the problems it finds in the good rows and
    report them all at once.
    """
    if len(data) > MAX_FILE_BYTES:
        raise _refused(1, _too_large(len(data)))
    text = _decode(data)
    _check_line_lengths(text)
    delimiter = _delimiter(text)
    records, problems = _records(text, delimiter)
    if not records:
        raise CsvImportError(problems or [(1, "the file is empty")])

    try:
        layout = _layout(*records[0], delimiter)
    except CsvImportError as exc:
        raise CsvImportError(_by_line([*exc.problems, *problems])) from exc
    rows: list[CsvRow] = []
    for line, cells in records[1:] if layout.has_header else records:
        row, bad = _row(cells, layout, line)
        problems += [(line, why) for why in bad]
        if row is not None:
            rows.append(row)

    if not rows and not problems:
        problems.append((layout.line, "the header has no rows of codes below it"))
    return rows, _by_line(problems)


def _by_line(problems: list[tuple[int, str]]) -> list[tuple[int, str]]:
    # Stable: a line's problems stay in the order they were found.
    return sorted(problems, key=lambda problem: problem[0])


def _refused(line: int, reason: str) -> CsvImportError:
    """The error for a file that cannot be read past ``line`` at all."""
    return CsvImportError([(line, reason)])


def _too_large(size: int) -> str:
    return (
        f"the file is {size / (1024 * 1024):.1f} MiB, larger than the "
        f"{MAX_FILE_BYTES // (1024 * 1024)} MiB a sales CSV can be (100,000 "
        "codes take about 33 MiB): it is not a sales CSV, or split it"
    )


def check_file_size(size: int) -> None:
    """Refuse a file larger than any sales CSV before reading it."""
    if size > MAX_FILE_BYTES:
        raise _refused(1, _too_large(size))


def _check_line_lengths(text: str) -> None:
    """Refuse a line far longer than any row of a sales CSV, before parsing."""
    found = _LONG_LINE.search(text)
    if found is None:
        return
    raise _refused(
        _line_of(text, found.start()),
        f"the line is longer than {MAX_LINE_CHARS:,} characters, the most a "
        "line of a sales CSV may have (a row is about 330): this is not a "
        "sales CSV",
    )


def _decode(data: bytes) -> str:
    if data.startswith(b"PK\x03\x04"):
        raise _refused(
            1,
            "this is a spreadsheet workbook (.xlsx or .ods), not CSV: "
            "save it as CSV first",
        )
    text = _decode_text(data).lstrip("\ufeff")
    nul = text.find("\x00")
    if nul >= 0:
        raise _refused(
            _line_of(text, nul),
            "the file holds NUL characters: it is not a text CSV "
            "(UTF-16 saved without a byte-order mark?)",
        )
    return text


def _decode_text(data: bytes) -> str:
    for bom, codec, name in _BOMS:
        if data.startswith(bom):
            try:
                return data.decode(codec)
            except UnicodeDecodeError as exc:
                before = data[: exc.start].decode(codec, errors="replace")
                where = _line_of(before, len(before))
                raise _refused(
                    where,
                    f"the file starts with a {name} byte-order mark "
                    f"but is not {name} (byte {exc.start})",
                ) from exc
    # Without a mark: UTF-8 if it is valid (plain ASCII is too), otherwise
    # the Windows code page Western spreadsheets use, and latin-1 last,
    # which decodes any byte.
    for codec in ("utf-8", "cp1252"):
        try:
            return data.decode(codec)
        except UnicodeDecodeError:
            continue
    return data.decode("latin-1")


def _line_of(text: str, index: int) -> int:
    """The physical line holding ``text[index]``, counted as csv counts."""
    return (
        1
        + text.count("\n", 0, index)
        + text.count("\r", 0, index)
        - text.count("\r\n", 0, index)
    )


def _physical_lines(text: str) -> Iterator[str]:
    # newline="" splits at LF, CR and CRLF alike and keeps the ends, as the
    # csv module needs for quoted fields that span lines.
    return iter(io.StringIO(text, newline=""))


def _delimiter(text: str) -> str:
    """Pick the delimiter: the sniffer's, if the header line agrees.

    The sniffer judges many lines and copes with quoted delimiters; the
    count in the first line is the fallback when it gives up or picks a
    character the header does not contain.
    """
    header = next((ln for ln in _physical_lines(text) if ln.strip()), "")
    counts = {d: _count_unquoted(header, d) for d in DELIMITERS}
    sample = "".join(islice(_physical_lines(text), _SNIFF_LINES))
    if len(sample) > _SNIFF_CHARS:
        sample = sample[:_SNIFF_CHARS]
        sample = sample[: max(sample.rfind("\n"), sample.rfind("\r")) + 1]
    try:
        sniffed = csv.Sniffer().sniff(sample, delimiters="".join(DELIMITERS))
    except csv.Error:
        sniffed = None
    if sniffed is not None and counts.get(sniffed.delimiter, 0) > 0:
        return str(sniffed.delimiter)
    # Ties go to the earlier of DELIMITERS; no delimiter at all means a
    # single column, where the choice does not matter.
    return max(DELIMITERS, key=counts.__getitem__)


def _count_unquoted(line: str, delimiter: str) -> int:
    count, quoted = 0, False
    for char in line:
        if char == '"':
            quoted = not quoted
        elif char == delimiter and not quoted:
            count += 1
    return count


def _records(
    text: str, delimiter: str
) -> tuple[list[tuple[int, list[str]]], list[tuple[int, str]]]:
    """Non-blank records with their first physical line, and a parse error."""
    reader = csv.reader(
        _physical_lines(text),
        delimiter=delimiter,
        skipinitialspace=True,
        strict=True,
    )
    records: list[tuple[int, list[str]]] = []
    while True:
        start = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            return records, []
        except csv.Error as exc:
            # The reader cannot be trusted to find the next record after a
            # quoting error, so reading stops here and says where.
            return records, [(start, f"malformed CSV from this line on: {exc}")]
        # Spreadsheets save empty rows as blank lines or as ";;;;;".
        if any(cell.strip() for cell in cells):
            records.append((start, cells))


def _key(name: str) -> str:
    folded = name.casefold()
    for umlaut, spelled in (("ä", "ae"), ("ö", "oe"), ("ü", "ue")):
        folded = folded.replace(umlaut, spelled)
    return "".join(char for char in folded if char.isalnum())


_ALIASES = {
    _key(name): column for column, names in _HEADER_NAMES.items() for name in names
}


def _column_of(name: str) -> str | None:
    column = _ALIASES.get(_key(name))
    if column is not None:
        return column
    # "KapazitÃ¤t": UTF-8 read as cp1252 by one program and saved again.
    try:
        repaired = name.encode("cp1252").decode("utf-8")
    except UnicodeError:
        return None
    return _ALIASES.get(_key(repaired))


def _looks_like_code(cell: str) -> bool:
    return normalize(cell).upper().startswith(f"{PREFIX}.")


def _layout(line: int, cells: list[str], delimiter: str) -> _Layout:
    columns = [_column_of(cell) for cell in cells]
    if not any(columns):
        codes = [i for i, cell in enumerate(cells) if _looks_like_code(cell)]
        if codes:
            return _Layout(line, len(cells), codes[0], {}, has_header=False)
        raise _refused(
            line,
            "the first line is neither a header naming the code column "
            "(such as 'code' or 'Lizenzcode') nor a license code, "
            f"{_delimiters_said(cells, delimiter)}",
        )

    problems: list[tuple[int, str]] = []
    where: dict[str, int] = {}
    for index, column in enumerate(columns):
        if column is None:
            continue
        if column in where:
            first = where[column]
            why = (
                f"columns {first + 1} and {index + 1} are both the {column} "
                f"column ({cells[first].strip()!r}, {cells[index].strip()!r})"
            )
            problems.append((line, why))
        where.setdefault(column, index)
    if "code" not in where:
        found = ", ".join(repr(cell.strip()[:40]) for cell in cells[:12])
        if len(cells) > 12:
            found += f" and {len(cells) - 12} more"
        why = (
            "the header has no code column (such as 'code' or 'Lizenzcode'); "
            f"its columns are {found}, {_delimiters_said(cells, delimiter)}"
        )
        problems.append((line, why))
    if problems:
        raise CsvImportError(problems)

    code = where.pop("code")
    return _Layout(line, len(cells), code, where, has_header=True)


def _delimiters_said(cells: list[str], delimiter: str) -> str:
    """How the line was split, and which delimiters are recognised at all."""
    names = [_DELIMITER_NAMES[d] for d in DELIMITERS]
    known = f"{', '.join(names[:-1])} and {names[-1]}"
    if len(cells) > 1:
        shown = _DELIMITER_NAMES[delimiter]
        return f"read with {shown} as the delimiter (those recognised: {known})"
    said = f"read as one field: it holds none of the delimiters recognised, {known}"
    line = "".join(cells)
    others = [d for d in _OTHER_DELIMITERS if d in line]
    if others:
        shown = " and ".join(repr(d) for d in others[:2])
        said += (
            f"; it holds {shown}, which a sales CSV may not use between "
            "fields: save the file with ',' or ';' as the delimiter"
        )
    return said


def _row(
    cells: list[str], layout: _Layout, line: int
) -> tuple[CsvRow | None, list[str]]:
    """The row, if it is good, and every problem it has.

    A row with the wrong number of fields is not checked further: its
    values may sit in other columns than the header says.
    """
    of = "the header" if layout.has_header else f"line {layout.line}"
    problems: list[str] = []
    extra = cells[layout.width :]
    if any(cell.strip() for cell in extra):
        problems.append(
            f"has {len(cells)} fields where {of} has {layout.width} "
            "(a value holding the delimiter without quotes?)"
        )
    elif len(cells) < layout.width:
        problems.append(f"has {len(cells)} fields where {of} has {layout.width}")

    cell = cells[layout.code] if layout.code < len(cells) else ""
    code = normalize(cell)
    if not code:
        problems.append("the license code is empty")
    if problems:
        return None, problems
    declared = {
        column: cells[index].strip()
        for column, index in layout.declared.items()
        if cells[index].strip()
    }
    return CsvRow(line, code, declared), []
