"""Fixtures for real `blockyard serve` processes (helpers live in serve_helpers.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from serve_helpers import Serve, launch


@pytest.fixture
def start_serve(tmp_path: Path) -> Iterator[Callable[..., Serve]]:
    """Start servers on demand; every one still running at teardown is stopped by PID."""
    started: list[Serve] = []

    def start(data_dir: Path | None = None, **kwargs: object) -> Serve:
        serve = launch(data_dir or tmp_path / "data", tmp_path / "logs", **kwargs)  # type: ignore[arg-type]
        started.append(serve)
        return serve

    yield start
    for serve in started:
        if serve.process.poll() is None:
            serve.stop()
        else:
            serve.release()


@pytest.fixture(scope="module")
def shared_serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    """One server with two portal groups shared by a module's tests (distinct volume names)."""
    root = tmp_path_factory.mktemp("serve")
    serve = launch(root / "data", root / "logs", portals=2)
    assert serve.api, serve.stderr()
    yield serve
    assert serve.stop() == 0, serve.stderr()
