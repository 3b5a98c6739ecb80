"""The clock fault's time namespace, with real processes: a command run through its wrapper
reads a CLOCK_MONOTONIC offset by the namespace's offset (within the time the commands take),
keeps the pid it was started with (nsenter execs: the harness signals the real process), and
the holder is gone after close."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from blockyard.chaos.timens import TimeNamespace

PRINT_CLOCK = "import os, time; print(os.getpid(), time.monotonic())"


@pytest.mark.parametrize("offset_s", [86_400, -30])
def test_a_command_in_the_namespace_sees_the_offset_clock(offset_s: int) -> None:
    if os.geteuid() != 0:
        pytest.fail("time namespaces need root here (run the suite as root, as CI does)")
    clock = TimeNamespace(offset_s)
    try:
        before = time.monotonic()
        proc = subprocess.Popen([*clock.wrapper, sys.executable, "-c", PRINT_CLOCK],
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
        out, _ = proc.communicate(timeout=30)
        after = time.monotonic()
        pid, inside = out.split()
        assert int(pid) == proc.pid, "nsenter forked: signals would miss the command"
        assert before + offset_s <= float(inside) <= after + offset_s
    finally:
        clock.close()
    assert _gone(clock.pid, timeout_s=10.0), "the namespace's holder outlived close()"


def _gone(pid: int, timeout_s: float) -> bool:
    """The process ended (a zombie waiting for init to reap it counts as ended)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False
