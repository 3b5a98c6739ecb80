"""Fixtures of the master store tests: one real etcd-server per test session (each test uses its
own key prefix), started on free loopback ports in a temporary directory and stopped at the end."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
from etcd_proc import EtcdServer, start_etcd

_prefixes = itertools.count()


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    server = start_etcd(tmp_path_factory.mktemp("etcd"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def etcd_prefix() -> str:
    """A key prefix no other test of the session uses."""
    return f"/blockyard-test-{next(_prefixes)}"
