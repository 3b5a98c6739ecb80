"""Fixtures for engine tests: a store in a fresh directory, every volume closed afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from blockyard.engine import VolumeStore


@pytest.fixture
def store(tmp_path: Path) -> Iterator[VolumeStore]:
    s = VolumeStore(str(tmp_path / "data"))
    yield s
    s.close_all()
