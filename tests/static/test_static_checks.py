"""The codebase stays lint-clean, formatted and mypy-strict: CI enforces it through pytest."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)


def test_ruff_lint() -> None:
    res = run(str(BIN / "ruff"), "check", "src", "tests")
    assert res.returncode == 0, res.stdout + res.stderr


def test_ruff_format() -> None:
    res = run(str(BIN / "ruff"), "format", "--check", "src", "tests")
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.slow
def test_mypy_strict() -> None:
    res = run(str(BIN / "mypy"))
    assert res.returncode == 0, res.stdout + res.stderr
