"""Helpers for the real-process iSCSI tests: a standalone blockyard target in a subprocess
and the external tools (libiscsi-bin, qemu-utils) they drive. A uniquely named module, so
test files import it without clashing with other folders' conftest modules."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

IQN_PREFIX = "iqn.2026-11.io.blockyard"
START_TIMEOUT_S = 30


def need_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(
            f"{', '.join(missing)} not installed: apt-get install libiscsi-bin qemu-utils "
            "qemu-block-extra"
        )


@dataclass
class ServedVolume:
    host: str
    port: int
    iqn: str
    data_dir: Path
    name: str
    process: subprocess.Popen[str]

    @property
    def portal(self) -> str:
        return f"iscsi://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.portal}/{self.iqn}/0"

    def alive(self) -> bool:
        return self.process.poll() is None


def start_server(data_dir: Path, *create: str) -> ServedVolume:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    args = [sys.executable, "-m", "blockyard.server.standalone", "--data-dir", str(data_dir)]
    args += ["--listen", "127.0.0.1:0"]
    for spec in create:
        args += ["--create", spec]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("READY "):
        proc.kill()
        proc.wait()
        proc.stdout.close()
        raise AssertionError(f"standalone server did not start: {line!r}")
    host, _, port = line.split()[1].rpartition(":")
    name = create[0].split(":")[0]
    return ServedVolume(host, int(port), f"{IQN_PREFIX}:{name}", data_dir, name, proc)


def stop_server(served: ServedVolume) -> int:
    if served.alive():
        served.process.send_signal(signal.SIGTERM)
    try:
        return served.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        served.process.kill()
        served.process.wait()
        raise
    finally:
        if served.process.stdout is not None:
            served.process.stdout.close()


def run(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, check=False)
