"""Loop devices and external tools, each call bounded by a timeout.

The attach layer only ever detaches a loop device whose backing file is under its own state
root (see :mod:`blockyard.attach.state`); :func:`loops_backed_under` is how it finds them.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

from blockyard.attach.errors import ToolError
from blockyard.errors import BlockyardTimeoutError

log = logging.getLogger(__name__)

#: Bound on one losetup/mount/umount call.
TOOL_TIMEOUT_S = 30.0
#: mkfs and fsck on large devices take longer.
MKFS_TIMEOUT_S = 600.0
#: After LOOP_CLR_FD the kernel releases the backing file once the last opener closes.
LOOP_RELEASE_TIMEOUT_S = 20.0
_SYS_BLOCK = "/sys/block"
#: Tool output kept in error messages.
_STDERR_MAX_CHARS = 2000


def run_tool(
    argv: Sequence[str], *, timeout_s: float = TOOL_TIMEOUT_S, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run an external tool with a timeout; raise ToolError (with its stderr) on failure."""
    try:
        proc = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise ToolError(
            f"{argv[0]} did not finish within {timeout_s:.0f} s: {' '.join(argv)}"
        ) from exc
    except FileNotFoundError as exc:
        raise ToolError(
            f"{argv[0]} is not installed; install util-linux, e2fsprogs, xfsprogs and fuse3"
        ) from exc
    if check and proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip()[:_STDERR_MAX_CHARS]
        raise ToolError(f"{' '.join(argv)} failed (exit {proc.returncode}): {err}")
    return proc


@dataclass(frozen=True, slots=True)
class LoopInfo:
    device: str
    backing_file: str
    direct_io: bool


def list_loops() -> list[LoopInfo]:
    """Every configured loop device, from sysfs (no subprocess, nothing to time out)."""
    out: list[LoopInfo] = []
    try:
        names = os.listdir(_SYS_BLOCK)
    except FileNotFoundError:
        return out
    for name in sorted(names):
        if not name.startswith("loop"):
            continue
        backing = _read_sys(f"{_SYS_BLOCK}/{name}/loop/backing_file")
        if backing is None:
            continue
        dio = _read_sys(f"{_SYS_BLOCK}/{name}/loop/dio") == "1"
        out.append(LoopInfo(device=f"/dev/{name}", backing_file=backing, direct_io=dio))
    return out


def _read_sys(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except (FileNotFoundError, OSError):
        return None


def _strip_deleted(path: str) -> str:
    # The kernel appends " (deleted)" when the backing file's dentry is gone.
    suffix = " (deleted)"
    return path[: -len(suffix)] if path.endswith(suffix) else path


def loops_backed_by(path: str) -> list[LoopInfo]:
    path = os.path.abspath(path)
    return [li for li in list_loops() if _strip_deleted(li.backing_file) == path]


def loops_backed_under(root: str) -> list[LoopInfo]:
    prefix = os.path.abspath(root) + os.sep
    return [li for li in list_loops() if _strip_deleted(li.backing_file).startswith(prefix)]


def backing_file_of(device: str) -> str | None:
    name = os.path.basename(os.path.realpath(device))
    backing = _read_sys(f"{_SYS_BLOCK}/{name}/loop/backing_file")
    return None if backing is None else _strip_deleted(backing)


def attach_loop(path: str, *, direct_io: bool = True) -> LoopInfo:
    """Attach ``path`` to a free loop device; direct I/O on so only one page cache holds data."""
    argv = ["losetup", "--find", "--show"]
    if direct_io:
        argv.append("--direct-io=on")
    proc = run_tool([*argv, path])
    device = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    if not device.startswith("/dev/loop"):
        raise ToolError(f"losetup printed no loop device for {path}: {proc.stdout!r}")
    info = LoopInfo(device=device, backing_file=path, direct_io=direct_io)
    if direct_io and _read_sys(f"{_SYS_BLOCK}/{os.path.basename(device)}/loop/dio") != "1":
        log.warning("%s: the kernel refused direct I/O on %s; data is cached twice", device, path)
        info = LoopInfo(device=device, backing_file=path, direct_io=False)
    return info


def detach_loop(device: str, expected_backing: str) -> None:
    """Detach ``device`` if (and only if) it is still backed by ``expected_backing``.

    Returns once the kernel has released the backing file (bounded). A device that is already
    gone, or now backed by something else, is left alone: it is no longer ours.
    """
    backing = backing_file_of(device)
    if backing is None or backing != os.path.abspath(expected_backing):
        log.info(
            "%s is not backed by %s (now %s); leaving it alone", device, expected_backing, backing
        )
        return
    proc = run_tool(["losetup", "--detach", device], check=False)
    if proc.returncode != 0 and backing_file_of(device) is not None:
        raise ToolError(f"losetup --detach {device} failed: {proc.stderr.strip()}")
    wait_released(device, expected_backing)


def wait_released(device: str, backing: str, timeout_s: float = LOOP_RELEASE_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while backing_file_of(device) == os.path.abspath(backing):
        if time.monotonic() >= deadline:
            raise BlockyardTimeoutError(
                f"{device} still holds {backing} {timeout_s:.0f} s after detach; something "
                "still has the device open (check `lsof {device}` / `fuser -m {device}`)"
            )
        time.sleep(0.02)


def open_exclusive_busy(device: str) -> bool:
    """True if the block device is claimed: mounted, held by dm/md, or opened O_EXCL.

    Works across mount namespaces, unlike reading the mount table.
    """
    try:
        fd = os.open(device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return True
        raise
    os.close(fd)
    return False


def dev_numbers(device: str) -> set[str]:
    """``major:minor`` of the device and each of its partitions, as in /proc/self/mountinfo."""
    name = os.path.basename(os.path.realpath(device))
    out: set[str] = set()
    base = f"{_SYS_BLOCK}/{name}"
    dev = _read_sys(f"{base}/dev")
    if dev:
        out.add(dev)
    try:
        entries = os.listdir(base)
    except FileNotFoundError:
        return out
    for entry in entries:
        if entry.startswith(name):
            part = _read_sys(f"{base}/{entry}/dev")
            if part:
                out.add(part)
    return out


def holders(device: str) -> list[str]:
    """Devices stacked on top of ``device`` or its partitions (dm, md)."""
    name = os.path.basename(os.path.realpath(device))
    base = f"{_SYS_BLOCK}/{name}"
    found: list[str] = []
    dirs = [base]
    try:
        dirs += [f"{base}/{e}" for e in os.listdir(base) if e.startswith(name)]
    except FileNotFoundError:
        return found
    for d in dirs:
        try:
            found += os.listdir(f"{d}/holders")
        except FileNotFoundError:
            continue
    return found
