"""A real etcd-server (Debian 12's ``etcd-server``) started on free loopback ports in a
directory of the caller's, never the system service: for the store tests and for the master
group of ``blockyard chaos``. Stopped by the caller."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from blockyard.errors import BlockyardError
from blockyard.netports import free_port

#: Waits (generous: a shared 2-core machine).
START_TIMEOUT_S: Final = 30.0
STOP_TIMEOUT_S: Final = 10.0
HEALTH_POLL_S: Final = 0.1
#: A free port may be taken between probing it and etcd's bind: tries before giving up.
START_ATTEMPTS: Final = 3


class EtcdUnavailableError(BlockyardError):
    """etcd is not installed, or did not become healthy."""


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

    def healthy(self) -> bool:
        url = f"http://{self.endpoint}/health"
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as resp:
            return b'"true"' in resp.read()
        return False

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT_S)


def etcd_binary() -> str:
    binary = shutil.which("etcd")
    if binary is None:
        raise EtcdUnavailableError(
            "etcd is not installed: run `bash scripts/setup.sh` (apt-get install etcd-server)"
        )
    return binary


def launch_member(
    binary: str, name: str, data_dir: Path, log_path: Path, client_port: int, peer_port: int,
    *, initial_cluster: str, token: str = "",
) -> subprocess.Popen[bytes]:  # fmt: skip
    """One etcd member on loopback, output to ``log_path``."""
    client_url = f"http://127.0.0.1:{client_port}"
    peer_url = f"http://127.0.0.1:{peer_port}"
    args = [
        binary,
        "--name", name,
        "--data-dir", str(data_dir),
        "--listen-client-urls", client_url,
        "--advertise-client-urls", client_url,
        "--listen-peer-urls", peer_url,
        "--initial-advertise-peer-urls", peer_url,
        "--initial-cluster", initial_cluster,
        "--initial-cluster-state", "new",
    ]  # fmt: skip
    if token:
        args += ["--initial-cluster-token", token]
    with log_path.open("wb") as log:
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)  # fmt: skip


def start_etcd(base_dir: Path, name: str = "test") -> EtcdServer:
    """A one-member etcd under ``base_dir``, healthy when this returns."""
    binary = etcd_binary()
    last_error = ""
    for _attempt in range(START_ATTEMPTS):
        client_port, peer_port = free_port("127.0.0.1"), free_port("127.0.0.1")
        data_dir = base_dir / f"etcd-{client_port}"
        log_path = base_dir / f"etcd-{client_port}.log"
        process = launch_member(
            binary, name, data_dir, log_path, client_port, peer_port,
            initial_cluster=f"{name}=http://127.0.0.1:{peer_port}",
        )  # fmt: skip
        server = EtcdServer(process, client_port, data_dir, log_path)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and process.poll() is None:
            if server.healthy():
                return server
            time.sleep(HEALTH_POLL_S)
        last_error = server.log_tail()
        server.stop()
    raise EtcdUnavailableError(
        f"etcd did not become healthy within {START_TIMEOUT_S:.0f} s: {last_error}"
    )
