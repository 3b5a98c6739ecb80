"""Fixtures of the replication network-fault tests (helpers live in fault_helpers.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fault_helpers import Rig, make_rig


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    """Primary and replica servers, a fault proxy between them, ``vol`` in sync (sync_all)."""
    yield from make_rig(tmp_path / "cluster")
