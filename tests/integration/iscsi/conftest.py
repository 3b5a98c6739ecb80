"""Fixtures for the real-process iSCSI tests (helpers live in iscsi_proc.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from iscsi_proc import ServedVolume, start_server, stop_server


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ServedVolume]:
    volume = start_server(tmp_path / "data", "vol1:64M")
    try:
        yield volume
    finally:
        stop_server(volume)
