"""Coverage-guided fuzzing (atheris) of what arrives from outside.

``python tests/fuzz/atheris_inputs.py -runs=N`` feeds libFuzzer's inputs
to the license code verifier, the CSV reader and the gateway's reading of
a hello; any exception other than the project's own errors is a crash.
tests/test_fuzz_atheris.py runs it for a bounded number of inputs in CI;
run it without ``-runs`` to fuzz for as long as you like.
"""

from __future__ import annotations

import sys

import aiosqlite  # noqa: F401 - imported first, so that only ours is instrumented
import atheris
import cryptography.hazmat.primitives.asymmetric.ed25519  # noqa: F401
import gmqtt  # noqa: F401
import pydantic  # noqa: F401
import structlog  # noqa: F401

with atheris.instrument_imports():
    from gateway.service import Gateway, _ref_of
    from policy import codes, csvimport
    from policy.errors import IrmError
    from tools.keys import DEMO_PUBLIC_KEY_PATH, load_public_key

KEY = load_public_key(DEMO_PUBLIC_KEY_PATH)


def one_input(data: bytes) -> None:
    """One input, to one of three readers chosen by its first byte."""
    provider = atheris.FuzzedDataProvider(data)
    reader = provider.ConsumeIntInRange(0, 2)
    rest = provider.ConsumeBytes(provider.remaining_bytes())
    if reader == 0:
        try:
            codes.verify(rest.decode("utf-8", "replace"), KEY)
        except IrmError:
            return
    elif reader == 1:
        try:
            csvimport.read_sales_csv(rest)
        except IrmError:
            return
    else:
        # The gateway's own reading never raises: a problem comes back.
        Gateway._validate("hello", rest)
        _ref_of(rest)


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
