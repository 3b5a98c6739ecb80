"""Fixtures for the SCSI unit tests."""

from __future__ import annotations

import pytest
from scsi_support import Harness


@pytest.fixture
def h() -> Harness:
    return Harness().ready()
