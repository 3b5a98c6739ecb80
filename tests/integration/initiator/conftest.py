"""Fixtures of the initiator integration tests (helpers live in initiator_targets.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from initiator_targets import TargetProcess


@pytest.fixture
def target(tmp_path: Path) -> Iterator[TargetProcess]:
    proc = TargetProcess(tmp_path / "data", create=["vol1:64M"])
    try:
        yield proc
    finally:
        proc.stop()
