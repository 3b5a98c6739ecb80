"""Helpers for CSI tests against real processes: a `blockyard serve` backend (started with
tests/integration/server/serve_helpers.py) and a `blockyard csi` plugin on a unix socket,
both started and stopped by PID, every wait bounded."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))

from serve_helpers import Serve, launch

from blockyard.csi.proto import csi_pb2 as pb
from blockyard.csi.proto import csi_pb2_grpc as pb_grpc

__all__ = ["Csi", "Serve", "Stack", "launch", "launch_csi", "rpc_code", "start_controller"]

T = TypeVar("T")
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0
RPC_TIMEOUT_S = 60.0
MIB = 1 << 20
Mode = pb.VolumeCapability.AccessMode


@dataclass
class Csi:
    """One `blockyard csi` subprocess and sync stubs on its socket."""

    process: subprocess.Popen[str]
    socket_path: Path
    stderr_path: Path
    ready: str

    def __post_init__(self) -> None:
        self.channel = grpc.insecure_channel(f"unix://{self.socket_path}")
        self.identity = pb_grpc.IdentityStub(self.channel)
        self.controller = pb_grpc.ControllerStub(self.channel)

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.channel.close()
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=STOP_TIMEOUT_S)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT_S)
            if self.process.stdout is not None:
                self.process.stdout.close()


def csi_args(socket_path: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "blockyard.cli.main", "--log-level", "INFO", "csi",
        "--endpoint", f"unix://{socket_path}", *extra,
    ]  # fmt: skip


def launch_csi(socket_path: Path, log_dir: Path, *extra: str) -> Csi:
    """Start a plugin; returns once it printed READY or exited (``ready`` then stays empty)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    stderr_path = log_dir / f"csi-{len(list(log_dir.iterdir()))}.log"
    with stderr_path.open("w") as err:
        proc = subprocess.Popen(
            csi_args(socket_path, *extra),
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    stdout = proc.stdout
    threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=START_TIMEOUT_S)
    except queue.Empty as exc:
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT_S)
        raise AssertionError(f"csi printed nothing in {START_TIMEOUT_S} s") from exc
    return Csi(proc, socket_path, stderr_path, line.strip() if line.startswith("READY") else "")


def run_csi(socket_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run a plugin expected to refuse to start."""
    return subprocess.run(
        csi_args(socket_path, *extra),
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
        check=False,
    )


def rpc_code(call: Callable[..., Any], request: object) -> tuple[grpc.StatusCode, str]:
    """Call and return (status code, details); every error must carry a message."""
    try:
        call(request, timeout=RPC_TIMEOUT_S)
    except grpc.RpcError as exc:
        details = exc.details() or ""  # type: ignore[attr-defined]
        assert details, "every CSI error carries a message"
        return exc.code(), details  # type: ignore[attr-defined]
    return grpc.StatusCode.OK, ""


def block_cap(mode: int = Mode.SINGLE_NODE_WRITER) -> pb.VolumeCapability:
    return pb.VolumeCapability(block=pb.VolumeCapability.BlockVolume(), access_mode=Mode(mode=mode))


def mount_cap(mode: int = Mode.SINGLE_NODE_WRITER, fs_type: str = "") -> pb.VolumeCapability:
    return pb.VolumeCapability(
        mount=pb.VolumeCapability.MountVolume(fs_type=fs_type), access_mode=Mode(mode=mode)
    )


@dataclass
class Stack:
    serve: Serve
    csi: Csi
    root: Path

    def restart_csi(self) -> Csi:
        assert self.csi.stop() == 0, self.csi.stderr()
        self.csi = start_controller(self.root, self.serve)
        return self.csi


def start_controller(root: Path, serve: Serve) -> Csi:
    csi = launch_csi(
        root / "csi.sock",
        root / "logs",
        "--mode", "controller", "--node-id", "controller-0",
        "--backend", serve.api, "--state-dir", str(root / "state"),
    )  # fmt: skip
    assert csi.ready, csi.stderr()
    return csi
