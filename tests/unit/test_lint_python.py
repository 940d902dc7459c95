"""The Python of the kit passes ruff with the rule selection in pyproject.toml (the service, the tests, the
benchmarks, the harness and the sandbox), and the service's own code, app/, passes mypy with the settings there."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PATHS = ["app", "tests", "bench", "scripts/harness", "scripts/sandbox", "scripts/sandbox/sandbox"]


def test_ruff_finds_nothing():
    result = subprocess.run([str(BIN / "ruff"), "check", "--no-cache", "--output-format", "concise", *PATHS],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (
        "ruff found problems; fix each one it names (`ruff check --fix` fixes the safe ones):\n"
        + result.stdout + result.stderr
    )


def test_mypy_finds_nothing_in_the_service():
    # The files and settings come from [tool.mypy]; no cache, so the result never depends on an earlier run.
    result = subprocess.run([str(BIN / "mypy"), "--no-incremental", "--cache-dir", "/dev/null"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (
        "mypy found problems in app/; annotate or fix each one it names:\n" + result.stdout + result.stderr
    )
