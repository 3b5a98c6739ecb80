"""Regression: `blockyard volume` over the management API.

- ``volume create big --size 18446744073709551616 --server ...`` (and ``grow``) printed a
  traceback ending in ``ValueError: Value out of range``: the size went into a uint64 protobuf
  field unchecked. With ``--data-dir`` it was already a clean one-line error.
- ``volume delete nosuch`` printed ``deleted volume nosuch``: it stays idempotent (exit 0) but
  must say there was nothing to delete, on both paths.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from serve_helpers import TOOL_TIMEOUT_S, Serve

TOO_BIG = str(1 << 64)  # one past the largest uint64
UINT64_MAX = str((1 << 64) - 1)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blockyard.cli.main", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_S,
    )


def clean_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("blockyard: error: ")
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture
def serve(start_serve: Callable[..., Serve]) -> Serve:
    s = start_serve()
    assert s.api, s.stderr()
    return s


def test_sizes_beyond_uint64_are_clean_errors_over_the_api(serve: Serve) -> None:
    at = ("--server", serve.api)
    line = clean_error(cli("volume", "create", "big", "--size", TOO_BIG, *at))
    assert f"size_bytes {TOO_BIG} is larger than any volume can be" in line
    assert cli("volume", "create", "v", "--size", "4MiB", *at).returncode == 0
    line = clean_error(cli("volume", "grow", "v", "--size", TOO_BIG, *at))
    assert f"size_bytes {TOO_BIG} is larger than any volume can be" in line
    # The largest uint64 reaches the server, which refuses it with its own limit.
    line = clean_error(cli("volume", "create", "big", "--size", UINT64_MAX, *at))
    assert "larger than the maximum volume size" in line
    line = clean_error(cli("volume", "grow", "v", "--size", UINT64_MAX, *at))
    assert "larger than the maximum volume size" in line
    # Units multiply past the bound too.
    clean_error(cli("volume", "create", "big", "--size", "99999999TiB", *at))


def test_sizes_beyond_uint64_are_clean_errors_on_a_data_dir(tmp_path: Path) -> None:
    at = ("--data-dir", str(tmp_path))
    clean_error(cli("volume", "create", "big", "--size", TOO_BIG, *at))
    assert cli("volume", "create", "v", "--size", "4MiB", *at).returncode == 0
    clean_error(cli("volume", "grow", "v", "--size", TOO_BIG, *at))


def test_delete_says_when_there_was_nothing_to_delete(serve: Serve) -> None:
    for at in (("--server", serve.api), ("--data-dir", str(serve.data_dir.parent / "local"))):
        assert cli("volume", "create", "gone", "--size", "4MiB", *at).returncode == 0
        first = cli("volume", "delete", "gone", *at)
        assert (first.returncode, first.stdout) == (0, "deleted volume gone\n"), first.stderr
        again = cli("volume", "delete", "gone", *at)
        assert (again.returncode, again.stdout) == (0, "no volume gone: nothing to delete\n")
        never = cli("volume", "delete", "nosuch", *at)
        assert (never.returncode, never.stdout) == (0, "no volume nosuch: nothing to delete\n")
