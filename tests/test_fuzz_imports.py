"""Fuzzing the tool's imports: rejected input leaves the database as it was.

Codes and CSV files are mutated from good ones by hypothesis and fed to
``irm-tool import`` in process, against a real SQLite file. Whatever comes
in, the tool either imports or refuses with its own message (exit status
1, ``irm-tool: ...``), never with a traceback; a refusal changes nothing
stored; and no message repeats a whole code.
"""

from __future__ import annotations

import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy.csvimport import write_sales_csv
from policy.licenses import Kind
from tests.test_cli import Tool, code, payload

FUZZ = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
REDEEMED = code("R1", Kind.BASIC_25)
"""Imported into acme before every example."""
GOOD = code("G1", Kind.BASIC_1)
STRANGER = Ed25519PrivateKey.generate()


@contextmanager
def seeded_tool() -> Iterator[Tool]:
    """acme holding REDEEMED, and other with nothing."""
    with tempfile.TemporaryDirectory() as folder:
        tool = Tool(Path(folder) / "irm.db")
        tool.ok("tenant", "add", "acme")
        tool.ok("tenant", "add", "other")
        tool.add("acme", REDEEMED)
        yield tool


def stored(tool: Tool) -> list[str]:
    with sqlite3.connect(tool.db) as db:
        return list(db.iterdump())


def assert_refused_without_change(tool: Tool, *args: str, shown: str = "") -> None:
    before = stored(tool)
    result = tool.run(*args)
    said = [line for line in result.stderr.splitlines() if "DEMO" not in line]
    if result.exit_code == 0:
        return
    assert result.exit_code == 1, result.output
    assert said, result.stderr
    assert said[0].startswith("irm-tool: "), result.stderr
    assert "Traceback" not in result.output
    assert stored(tool) == before
    if len(shown) > 40:
        assert shown not in result.output


@st.composite
def mutated(draw: st.DrawFn, text: str) -> str:
    """``text`` with characters replaced, dropped or added somewhere."""
    chars = list(text)
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.integers(0, len(chars)))
        how = draw(st.sampled_from(["replace", "drop", "insert"]))
        char = draw(st.characters(codec="utf-8", exclude_characters="\x00"))
        if how == "insert" or where == len(chars):
            chars.insert(where, char)
        elif how == "drop":
            del chars[where]
        else:
            chars[where] = char
    return "".join(chars)


BAD_CODES = (
    mutated(GOOD)
    | mutated(REDEEMED)
    | st.just(code("G2", key=STRANGER))
    | st.text(max_size=300).filter(lambda t: t.strip() and not t.startswith("-"))
)


@FUZZ
@given(BAD_CODES, st.sampled_from(["acme", "other"]))
def test_a_forged_altered_or_redeemed_code_changes_nothing(
    bad: str, tenant: str
) -> None:
    with seeded_tool() as tool:
        assert_refused_without_change(
            tool, "import", "--tenant", tenant, bad, shown=bad
        )


def test_a_code_redeemed_elsewhere_is_refused_and_changes_nothing() -> None:
    with seeded_tool() as tool:
        before = stored(tool)
        result = tool.run("import", "--tenant", "other", REDEEMED)

        assert result.exit_code == 1
        assert "already redeemed in another tenant" in result.stderr
        assert stored(tool) == before


SALES = write_sales_csv(
    [(payload("C1", Kind.BASIC_1), code("C1")), (payload("C2"), code("C2"))]
)
WRONG_KIND = SALES.replace(b",Cloud Basic 1,1,", b",Cloud Basic 25,25,", 1)
"""A row whose declared kind is not the one its code was signed for."""


@st.composite
def mutated_bytes(draw: st.DrawFn, data: bytes) -> bytes:
    chars = bytearray(data)
    for _ in range(draw(st.integers(1, 6))):
        where = draw(st.integers(0, len(chars) - 1))
        how = draw(st.sampled_from(["replace", "drop", "insert"]))
        byte = draw(st.sampled_from(b';,"\r\n\t\xef\xbb\xbf\x00xA=-'))
        if how == "drop":
            del chars[where]
        elif how == "insert":
            chars.insert(where, byte)
        else:
            chars[where] = byte
    return bytes(chars)


@FUZZ
@given(mutated_bytes(SALES) | mutated_bytes(WRONG_KIND) | st.just(WRONG_KIND))
def test_a_broken_csv_is_refused_whole_and_changes_nothing(data: bytes) -> None:
    with seeded_tool() as tool, tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "sales.csv"
        path.write_bytes(data)
        assert_refused_without_change(
            tool, "import", "--tenant", "other", "--csv", str(path)
        )


def test_a_row_declaring_another_kind_than_its_code_is_refused() -> None:
    with seeded_tool() as tool, tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "sales.csv"
        path.write_bytes(WRONG_KIND)
        before = stored(tool)

        result = tool.run("import", "--tenant", "other", "--csv", str(path))

        assert result.exit_code == 1
        assert "line 2" in result.stderr
        assert stored(tool) == before
