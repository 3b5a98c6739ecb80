"""Fixtures for CSI tests: one `blockyard serve` and one `blockyard csi --mode controller`
per module (helpers live in csi_helpers.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from csi_helpers import Stack, launch, start_controller


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("csi")
    serve = launch(root / "data", root / "logs", portals=2)
    assert serve.api, serve.stderr()
    stack = Stack(serve, start_controller(root, serve), root)
    yield stack
    assert stack.csi.stop() == 0, stack.csi.stderr()
    assert serve.stop() == 0, serve.stderr()
