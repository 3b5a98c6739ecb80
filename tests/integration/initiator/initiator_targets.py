"""Helpers for the initiator integration tests: real target processes
(``python -m blockyard.server.standalone``).

:class:`TargetProcess` starts one process with one or more listeners (one target port group
each), optionally driven through ``--control-stdin``; stdout is read by a thread so every wait
for a line has a timeout. Processes are stopped by PID (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from blockyard.attach.initiator import InitiatorSettings, IscsiBlockDevice, IscsiVolumeSpec
from blockyard.attach.initiator.multipath import MultipathSettings
from blockyard.iscsi.discovery import Portal

IQN_PREFIX = "iqn.2026-11.io.blockyard"
INITIATOR_IQN = "iqn.2026-11.io.blockyard.test:initiator"
START_TIMEOUT_S = 30.0
LINE_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 15.0


class TargetProcess:
    def __init__(
        self,
        data_dir: Path,
        *,
        listens: Sequence[str] = ("127.0.0.1:0",),
        create: Sequence[str] = (),
        volumes: Sequence[str] = (),
        control: bool = False,
    ) -> None:
        args = [sys.executable, "-m", "blockyard.server.standalone", "--data-dir", str(data_dir)]
        for listen in listens:
            args += ["--listen", listen]
        for spec in create:
            args += ["--create", spec]
        for name in volumes:
            args += ["--volume", name]
        if control:
            args.append("--control-stdin")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stdin=subprocess.PIPE if control else subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.portals: list[Portal] = []
        for _ in listens:
            line = self.expect("READY ", START_TIMEOUT_S)
            host, _, port = line.split()[1].rpartition(":")
            self.portals.append(Portal(host, int(port)))

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def expect(self, prefix: str, timeout_s: float = LINE_TIMEOUT_S) -> str:
        """The next stdout line starting with ``prefix``; other lines are skipped."""
        while True:
            try:
                line = self._lines.get(timeout=timeout_s)
            except queue.Empty:
                self.stop()
                raise AssertionError(
                    f"target printed no {prefix!r} line in {timeout_s} s"
                ) from None
            if line is None:
                raise AssertionError(f"target exited before printing {prefix!r}")
            if line.startswith(prefix):
                return line
            if line.startswith("ERR"):
                raise AssertionError(f"target refused a control command: {line}")

    def control(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        self.expect(f"OK {command}")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT_S)
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()
        self._reader.join(LINE_TIMEOUT_S)


def iqn(name: str) -> str:
    return f"{IQN_PREFIX}:{name}"


def fast_settings(**overrides: object) -> InitiatorSettings:
    """Short timeouts so failure tests finish quickly."""
    values: dict[str, object] = {
        "initiator_name": INITIATOR_IQN,
        "connect_timeout_s": 2.0,
        "login_timeout_s": 5.0,
        "command_timeout_s": 5.0,
        "tmf_timeout_s": 2.0,
        "logout_timeout_s": 2.0,
        "nop_interval_s": 1.0,
        "nop_timeout_s": 2.0,
    }
    values.update(overrides)
    return InitiatorSettings(**values)  # type: ignore[arg-type]


def open_device(
    portals: Sequence[Portal],
    name: str,
    *,
    replacement_timeout_s: float = 20.0,
    settings: InitiatorSettings | None = None,
) -> IscsiBlockDevice:
    spec = IscsiVolumeSpec(
        portals=tuple(portals),
        target_name=iqn(name),
        initiator_name=INITIATOR_IQN,
        initiator=settings or fast_settings(),
        multipath=MultipathSettings(
            replacement_timeout_s=replacement_timeout_s,
            reconnect_backoff_initial_s=0.1,
            reconnect_backoff_max_s=0.5,
        ),
    )
    return IscsiBlockDevice(spec)
