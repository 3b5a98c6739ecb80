"""A real etcd-server (Debian 12's ``etcd-server``) for the store tests: started on free
loopback ports in a temporary directory, never the system service, and stopped by the test."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from blockyard.netports import free_port

#: Waits of the fixture (generous: a shared 2-core machine).
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
HEALTH_POLL_S = 0.1


def _free_port() -> int:
    return free_port("127.0.0.1")


@dataclass
class EtcdServer:
    process: subprocess.Popen[bytes]
    client_port: int
    data_dir: Path
    log_path: Path

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def url(self, prefix: str = "") -> str:
        return f"etcd://{self.endpoint}{prefix}"

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT_S)


def start_etcd(base_dir: Path) -> EtcdServer:
    binary = shutil.which("etcd")
    if binary is None:
        pytest.fail(
            "etcd is not installed: run `bash scripts/setup.sh` (apt-get install etcd-server)"
        )
    last_error = ""
    for _attempt in range(3):  # a free port may be taken between probing and etcd's bind
        client_port, peer_port = _free_port(), _free_port()
        data_dir = base_dir / f"etcd-{client_port}"
        log_path = base_dir / f"etcd-{client_port}.log"
        client_url = f"http://127.0.0.1:{client_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [
                    binary,
                    "--name", "test",
                    "--data-dir", str(data_dir),
                    "--listen-client-urls", client_url,
                    "--advertise-client-urls", client_url,
                    "--listen-peer-urls", peer_url,
                    "--initial-advertise-peer-urls", peer_url,
                    "--initial-cluster", f"test={peer_url}",
                    "--initial-cluster-state", "new",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
        server = EtcdServer(process, client_port, data_dir, log_path)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with urllib.request.urlopen(f"{client_url}/health", timeout=2) as resp:
                    if b'"true"' in resp.read():
                        return server
            except OSError as exc:
                last_error = str(exc)
            time.sleep(HEALTH_POLL_S)
        last_error = f"{last_error}\n{server.log_tail()}"
        server.stop()
    pytest.fail(f"etcd did not become healthy within {START_TIMEOUT_S} s: {last_error}")


def start_etcd_cluster(base_dir: Path, members: int = 3) -> list[EtcdServer]:
    """``members`` etcd processes forming one cluster on free loopback ports."""
    binary = shutil.which("etcd")
    if binary is None:
        pytest.fail(
            "etcd is not installed: run `bash scripts/setup.sh` (apt-get install etcd-server)"
        )
    ports = [(_free_port(), _free_port()) for _ in range(members)]
    initial = ",".join(f"m{i}=http://127.0.0.1:{peer}" for i, (_c, peer) in enumerate(ports))
    servers: list[EtcdServer] = []
    for i, (client_port, peer_port) in enumerate(ports):
        data_dir = base_dir / f"member-{i}"
        log_path = base_dir / f"member-{i}.log"
        client_url = f"http://127.0.0.1:{client_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [
                    binary,
                    "--name", f"m{i}",
                    "--data-dir", str(data_dir),
                    "--listen-client-urls", client_url,
                    "--advertise-client-urls", client_url,
                    "--listen-peer-urls", peer_url,
                    "--initial-advertise-peer-urls", peer_url,
                    "--initial-cluster", initial,
                    "--initial-cluster-state", "new",
                    "--initial-cluster-token", f"blockyard-test-{ports[0][0]}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
        servers.append(EtcdServer(process, client_port, data_dir, log_path))
    deadline = time.monotonic() + START_TIMEOUT_S
    for server in servers:
        while True:
            if server.process.poll() is not None or time.monotonic() > deadline:
                tails = "\n".join(s.log_tail(10) for s in servers)
                for s in servers:
                    s.stop()
                pytest.fail(f"etcd cluster did not become healthy in {START_TIMEOUT_S} s:\n{tails}")
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{server.client_port}/health", timeout=2
                ) as resp:
                    if b'"true"' in resp.read():
                        break
            except OSError:
                pass
            time.sleep(HEALTH_POLL_S)
    return servers
