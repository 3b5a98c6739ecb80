"""`blockyard csi` startup: usage errors exit 2 with a message saying how to fix them, stale
sockets are replaced, files that are not sockets are never touched, Probe reports "not ready"
while the backend does not answer."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from csi_helpers import launch_csi, run_csi

from blockyard.csi.proto import csi_pb2 as pb

CONTROLLER = ("--node-id", "n0", "--backend", "127.0.0.1:1")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--mode", "sideways", *CONTROLLER), "--mode 'sideways'"),
        (("--mode", "all", *CONTROLLER), "--managed-prefix is required"),
        (("--mode", "node", "--node-id", "n0", "--managed-prefix", "bad prefix"), "IQN prefix"),
        (
            (
                "--mode",
                "node",
                "--node-id",
                "n0",
                "--managed-prefix",
                "iqn.2026-11.io.blockyard",
                "--attach-mode",
                "sideways",
            ),
            "--attach-mode",
        ),
        (("--mode", "controller", "--node-id", "n0"), "--backend is required"),
        (("--mode", "controller", "--node-id", "n0", "--backend", "nohost"), "HOST:PORT"),
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    result = run_csi(tmp_path / "csi.sock", *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert not (tmp_path / "csi.sock").exists()


def test_unreachable_endpoint_directory_exits_2(tmp_path: Path) -> None:
    result = run_csi(tmp_path / "missing" / "csi.sock", "--mode", "controller", *CONTROLLER)
    assert result.returncode == 2 and "endpoint directory" in result.stderr


def test_a_file_that_is_not_a_socket_is_refused_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "csi.sock"
    path.write_text("precious")
    result = run_csi(path, "--mode", "controller", *CONTROLLER, "--state-dir", str(tmp_path))
    assert result.returncode == 2 and "not a socket" in result.stderr
    assert path.read_text() == "precious"


def test_stale_socket_is_replaced_and_probe_waits_for_the_backend(tmp_path: Path) -> None:
    path = tmp_path / "csi.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(path))  # bound, never listening: what a crashed plugin leaves
    csi = launch_csi(
        path, tmp_path / "logs", "--mode", "controller", *CONTROLLER, "--state-dir", str(tmp_path)
    )
    try:
        assert csi.ready == f"READY endpoint=unix://{path} mode=controller", csi.stderr()
        probe = csi.identity.Probe(pb.ProbeRequest(), timeout=30)
        assert probe.HasField("ready") and not probe.ready.value
        second = run_csi(path, "--mode", "controller", *CONTROLLER, "--state-dir", str(tmp_path))
        assert second.returncode == 1 and "another process is serving" in second.stderr
    finally:
        assert csi.stop() == 0, csi.stderr()
    assert not path.exists(), "a clean stop removes the socket"
    assert "csi Probe - OK" in csi.stderr(), "one log line per RPC"
