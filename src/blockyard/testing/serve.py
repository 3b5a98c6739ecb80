"""Start a real `blockyard serve` process for a test and stop it again, bounded in time."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class ServeProcess:
    process: subprocess.Popen[str]
    #: The management API's HOST:PORT.
    api: str
    #: iSCSI portals in portal-group order (``--iscsi-listen`` order).
    portals: list[str]


@contextmanager
def serve_process(
    data_dir: Path, log_path: Path, iscsi_listen: Sequence[str] = ("127.0.0.1:0",)
) -> Iterator[ServeProcess]:
    """Run `blockyard serve` on ``data_dir`` until the block exits (SIGTERM, then SIGKILL)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "blockyard.cli.main", "serve", "--data-dir", str(data_dir)]
    argv += ["--api-listen", "127.0.0.1:0", "--shutdown-timeout", "10"]
    for addr in iscsi_listen:
        argv += ["--iscsi-listen", addr]
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
    assert proc.stdout is not None
    out = proc.stdout
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(out.readline()), daemon=True).start()
    try:
        try:
            line = lines.get(timeout=START_TIMEOUT_S)
        except queue.Empty:
            raise AssertionError(f"serve printed nothing in {START_TIMEOUT_S} s") from None
        if not line.startswith("READY "):
            raise AssertionError(f"serve did not start: {line!r}; log: {log_path.read_text()}")
        fields = dict(part.split("=", 1) for part in line.split()[1:])
        yield ServeProcess(proc, fields["api"], fields["iscsi"].split(","))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        out.close()
