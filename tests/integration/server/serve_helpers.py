"""Helpers for tests against real `blockyard serve` processes: start/stop by PID, call the
API, run libiscsi tools and qemu-io with timeouts."""

from __future__ import annotations

import asyncio
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest

from blockyard.server.client import VolumeServerClient

T = TypeVar("T")
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0
SHUTDOWN_BOUND_S = 10.0
TOOL_TIMEOUT_S = 30.0
IQN_PREFIX = "iqn.2026-11.io.blockyard"


def need_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(
            f"{', '.join(missing)} not installed: apt-get install libiscsi-bin qemu-utils "
            "qemu-block-extra"
        )


@dataclass
class Serve:
    """One `blockyard serve` subprocess; ``iscsi`` holds its portals in portal-group order."""

    process: subprocess.Popen[str]
    data_dir: Path
    stderr_path: Path
    iscsi: list[str] = field(default_factory=list)
    api: str = ""

    def url(self, volume: str, portal: int = 0) -> str:
        """The volume's iscsi:// URL, with the IQN the server reports (it names the volume
        instance, not only the name)."""
        iqn = self.call(lambda c: c.get_volume(volume)).export.iqn
        return f"iscsi://{self.iscsi[portal]}/{iqn}/0"

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def call(self, fn: Callable[[VolumeServerClient], Awaitable[T]]) -> T:
        return api_call(self.api, fn)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = STOP_TIMEOUT_S) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout_s)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT_S)
            self.release()

    def release(self) -> None:
        """Close our end of its stdout (after it exited or was stopped)."""
        if self.process.stdout is not None:
            self.process.stdout.close()


def api_call(api: str, fn: Callable[[VolumeServerClient], Awaitable[T]]) -> T:
    async def main() -> T:
        async with VolumeServerClient(api, timeout_s=20, slow_timeout_s=60) as client:
            return await fn(client)

    return asyncio.run(main())


def launch(
    data_dir: Path,
    log_dir: Path,
    *,
    portals: int = 1,
    iscsi_listen: list[str] | None = None,
    api_listen: str = "127.0.0.1:0",
    shutdown_timeout_s: float = SHUTDOWN_BOUND_S,
    extra_args: tuple[str, ...] = (),
) -> Serve:
    """Start a server; returns once it printed READY or exited (``iscsi`` then stays empty).
    ``extra_args`` go after the other ``serve`` flags (e.g. the --tls-* flags)."""
    listen = iscsi_listen or ["127.0.0.1:0"] * portals
    args = [sys.executable, "-m", "blockyard.cli.main", "--log-level", "INFO", "serve"]
    args += ["--data-dir", str(data_dir), "--api-listen", api_listen]
    args += ["--shutdown-timeout", str(shutdown_timeout_s)]
    for addr in listen:
        args += ["--iscsi-listen", addr]
    args += extra_args
    log_dir.mkdir(parents=True, exist_ok=True)
    stderr_path = log_dir / f"serve-{len(list(log_dir.iterdir()))}.log"
    with stderr_path.open("w") as err:
        proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
    serve = Serve(proc, data_dir, stderr_path)
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    stdout = proc.stdout
    threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=START_TIMEOUT_S)
    except queue.Empty as exc:
        serve.stop(signal.SIGKILL)
        message = f"serve printed nothing in {START_TIMEOUT_S} s:\n{serve.stderr()}"
        raise AssertionError(message) from exc
    if line.startswith("READY "):
        fields = dict(part.split("=", 1) for part in line.split()[1:])
        serve.iscsi = fields["iscsi"].split(",")
        serve.api = fields["api"]
    return serve


def run_tool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), check=False, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, input=stdin
    )


def qemu_io(url: str, *commands: str) -> subprocess.CompletedProcess[str]:
    args = ["qemu-io", "-f", "raw"]
    for command in commands:
        args += ["-c", command]
    return run_tool(*args, url)


def stop_tool(proc: subprocess.Popen[str]) -> None:
    """Kill an interactive tool we started (by its PID): after its server went away, libiscsi
    would keep trying to reconnect."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=TOOL_TIMEOUT_S)
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            stream.close()
