"""An interactive qemu-io whose iSCSI session stays open between commands, for tests of what
a long-lived client can and cannot do. Started and stopped by PID; every wait is bounded."""

from __future__ import annotations

import queue
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

JOIN_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 30.0


class InteractiveQemuIo:
    def __init__(self, args: Sequence[str]) -> None:
        self.proc = subprocess.Popen(
            ["qemu-io", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        stdout = self.proc.stdout
        assert stdout is not None
        self._reader = threading.Thread(target=self._read, args=(stdout,), daemon=True)
        self._reader.start()

    def _read(self, stdout: object) -> None:
        for line in stdout:  # type: ignore[attr-defined]
            self.lines.put(line)

    def send(self, *commands: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("".join(c + "\n" for c in commands))
        self.proc.stdin.flush()

    def count(self, text: str, timeout_s: float, *, until: int | None = None) -> int:
        """Output lines containing ``text`` seen within ``timeout_s`` (returns early once
        ``until`` of them were seen)."""
        seen, deadline = 0, time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                seen += text in self.lines.get(timeout=left)
            except queue.Empty:
                break
            if until is not None and seen >= until:
                break
        return seen

    def stop(self) -> None:
        """Kill it (libiscsi would retry its login forever) and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=STOP_TIMEOUT_S)
        self._reader.join(JOIN_TIMEOUT_S)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


@contextmanager
def qemu_io_session(*args: str) -> Iterator[InteractiveQemuIo]:
    tool = InteractiveQemuIo(args)
    try:
        yield tool
    finally:
        tool.stop()
