"""Fixtures of the real-process replication tests: a seed (from ``BLOCKYARD_REPL_SEED`` or
random, reported with every failure), and local clusters of ``blockyard serve`` processes whose
logs are named in the failure report."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest
from repl_helpers import SEED_ENV

from blockyard.testing.cluster import LocalCluster

#: Lines of each server log shown with a failure.
LOG_TAIL_LINES = 40
#: The most recently written server logs shown with a failure (one per start of a server).
LOG_FILES_SHOWN = 4


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """The seed of this test's schedule (kill points, write patterns); set it with
    BLOCKYARD_REPL_SEED to replay a failure's schedule (process timing still varies)."""
    env = os.environ.get(SEED_ENV)
    value = int(env) if env else random.SystemRandom().randrange(1 << 32)
    request.node.user_properties.append(("replication_seed", value))
    return value


@pytest.fixture
def make_cluster(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[[int], LocalCluster]]:
    """Start a LocalCluster of ``count`` servers (stopped at the end, killed if need be)."""
    made: list[LocalCluster] = []

    def make(count: int) -> LocalCluster:
        cluster = LocalCluster.create(tmp_path / f"cluster{len(made)}", count)
        made.append(cluster)
        request.node.user_properties.append(("replication_logs", str(cluster.root / "logs")))
        cluster.start()
        return cluster

    try:
        yield make
    finally:
        for cluster in made:
            for server in cluster.servers:
                if server.running:
                    server.kill()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        for key, value in item.user_properties:
            if key == "replication_seed":
                report.sections.append(
                    ("replication seed", f"replay the schedule with {SEED_ENV}={value}")
                )
            elif key == "replication_logs" and report.when == "call":
                report.sections.append(("server logs", _log_tails(Path(str(value)))))
    return report


def _log_tails(log_dir: Path) -> str:
    if not log_dir.is_dir():
        return f"{log_dir}: no logs"
    parts = [f"all logs: {log_dir}"]
    newest = sorted(log_dir.glob("*.log"), key=lambda p: p.stat().st_mtime)[-LOG_FILES_SHOWN:]
    for path in newest:
        lines = path.read_text(errors="replace").splitlines()
        parts.append(f"--- {path.name} (last {LOG_TAIL_LINES} of {len(lines)} lines)")
        parts.extend(lines[-LOG_TAIL_LINES:])
    return "\n".join(parts)
