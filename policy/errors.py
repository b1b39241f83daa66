"""The project's error tree.

::

    IrmError                 anything irm-gateway refuses or fails at
    ├── RuleViolation        a licensing rule forbids what was asked (the
    │                        caller's fault; nothing was changed)
    ├── BadInput             a value is malformed (the caller's fault)
    │   └── CsvImportError   a CSV file had bad rows (all are listed)
    ├── CodeError            a license code is forged, altered or unreadable
    └── StoreError           the store could not do its work (our fault)

Every message names the offending value and the rule it broke.
"""

from __future__ import annotations


class IrmError(Exception):
    """Base of every error irm-gateway raises on purpose."""


class RuleViolation(IrmError):
    """A licensing or admission rule forbids the requested change."""


class BadInput(IrmError):
    """A value given to the product is malformed."""


class CodeError(IrmError):
    """A license code failed verification or could not be decoded."""


class StoreError(IrmError):
    """The store failed; the operation was rolled back."""


class CsvImportError(BadInput):
    """A CSV import was refused; ``problems`` lists every bad row."""

    def __init__(self, problems: list[tuple[int, str]]) -> None:
        self.problems = problems
        lines = "\n".join(f"  line {n}: {why}" for n, why in problems)
        super().__init__(f"{len(problems)} bad row(s), nothing imported:\n{lines}")
