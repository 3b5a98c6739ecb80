"""A real etcd-server (Debian 12's ``etcd-server``) for the store tests: started on free
loopback ports in a temporary directory, never the system service, and stopped by the test
(:mod:`blockyard.testing.etcd`)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from blockyard.netports import free_port
from blockyard.testing import etcd
from blockyard.testing.etcd import START_TIMEOUT_S, EtcdServer

__all__ = ["EtcdServer", "start_etcd", "start_etcd_cluster"]

HEALTH_POLL_S = 0.1


def start_etcd(base_dir: Path) -> EtcdServer:
    try:
        return etcd.start_etcd(base_dir)
    except etcd.EtcdUnavailableError as exc:
        pytest.fail(str(exc))


def start_etcd_cluster(base_dir: Path, members: int = 3) -> list[EtcdServer]:
    """``members`` etcd processes forming one cluster on free loopback ports."""
    try:
        binary = etcd.etcd_binary()
    except etcd.EtcdUnavailableError as exc:
        pytest.fail(str(exc))
    ports = [(free_port("127.0.0.1"), free_port("127.0.0.1")) for _ in range(members)]
    initial = ",".join(f"m{i}=http://127.0.0.1:{peer}" for i, (_c, peer) in enumerate(ports))
    servers: list[EtcdServer] = []
    for i, (client_port, peer_port) in enumerate(ports):
        data_dir = base_dir / f"member-{i}"
        log_path = base_dir / f"member-{i}.log"
        process = etcd.launch_member(
            binary, f"m{i}", data_dir, log_path, client_port, peer_port,
            initial_cluster=initial, token=f"blockyard-test-{ports[0][0]}",
        )  # fmt: skip
        servers.append(EtcdServer(process, client_port, data_dir, log_path))
    deadline = time.monotonic() + START_TIMEOUT_S
    for server in servers:
        while not server.healthy():
            if server.process.poll() is not None or time.monotonic() > deadline:
                tails = "\n".join(s.log_tail(10) for s in servers)
                for s in servers:
                    s.stop()
                pytest.fail(f"etcd cluster did not become healthy in {START_TIMEOUT_S} s:\n{tails}")
            time.sleep(HEALTH_POLL_S)
    return servers
