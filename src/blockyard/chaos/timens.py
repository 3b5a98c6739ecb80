"""A time namespace (Linux 5.6+, ``CONFIG_TIME_NS``) whose CLOCK_MONOTONIC and CLOCK_BOOTTIME
run ``offset_s`` seconds ahead of (or behind) the host's, for the ``clock`` fault: a server
restarted in it reads a monotonic clock far from the master's and its peers'.

unshare(2) puts only the *children* of the caller into a new time namespace, so a holder
process (``unshare --fork --time ... sleep``) owns it, and the server joins it with setns(2)
through ``nsenter --time --target HOLDER``, which then execs: the server keeps the pid the
harness signals (kill, SIGSTOP). The wall clock (CLOCK_REALTIME) cannot be offset per
namespace, so wall-clock jumps are not covered (leases and timeouts use the monotonic clock).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Final

from blockyard.errors import BlockyardError

#: How long the holder may take to fork its child.
START_TIMEOUT_S: Final = 5.0
STOP_TIMEOUT_S: Final = 5.0


class TimeNamespaceError(BlockyardError):
    """A time namespace cannot be made here (no CONFIG_TIME_NS, no unshare/nsenter, not root)."""


class TimeNamespace:
    """One time namespace, held until :meth:`close`."""

    def __init__(self, offset_s: int) -> None:
        if shutil.which("unshare") is None or shutil.which("nsenter") is None:
            raise TimeNamespaceError("unshare and nsenter (util-linux) are needed")
        self.offset_s = offset_s
        self._holder = subprocess.Popen(
            ["unshare", "--fork", "--kill-child", "--time", "--monotonic", str(offset_s),
             "--boottime", str(offset_s), "sleep", "infinity"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            self.pid = self._child()
        except BaseException:
            self.close()
            raise

    def _child(self) -> int:
        """The pid of the holder's child, the first process inside the namespace."""
        children = Path(f"/proc/{self._holder.pid}/task/{self._holder.pid}/children")
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._holder.poll() is not None:
                err = (
                    self._holder.stderr.read().decode(errors="replace")
                    if self._holder.stderr
                    else ""
                )
                raise TimeNamespaceError(f"unshare --time failed: {err.strip()}")
            try:
                pids = children.read_text().split()
            except OSError:
                pids = []
            if pids:
                return int(pids[0])
            time.sleep(0.01)
        raise TimeNamespaceError(f"unshare --time did not fork within {START_TIMEOUT_S:.0f} s")

    @property
    def wrapper(self) -> tuple[str, ...]:
        """Run a command in the namespace (setns, then exec: the command keeps the pid)."""
        return ("nsenter", "--time", f"--target={self.pid}")

    def close(self) -> None:
        # The sleeper first: unshare's --kill-child covers a harness that dies, not this.
        with contextlib.suppress(ProcessLookupError, AttributeError):
            os.kill(self.pid, signal.SIGKILL)
        if self._holder.poll() is None:
            self._holder.kill()
        try:
            self._holder.wait(timeout=STOP_TIMEOUT_S)
        finally:
            if self._holder.stderr is not None:
                self._holder.stderr.close()
