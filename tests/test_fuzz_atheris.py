"""atheris fuzzes codes, CSV files and hellos for a bounded run: no crash."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HARNESS = Path(__file__).parent / "fuzz" / "atheris_inputs.py"
RUNS = 10_000
"""About 10 s on this project's machines: a smoke run for CI, not a campaign."""


def test_coverage_guided_inputs_raise_nothing_but_our_own_errors(
    tmp_path: Path,
) -> None:
    result = subprocess.run(
        [sys.executable, str(HARNESS), f"-runs={RUNS}", "-max_len=4096",
         f"-artifact_prefix={tmp_path}/"],
        capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Done {RUNS} runs" in result.stderr
    assert not list(tmp_path.glob("crash-*"))
