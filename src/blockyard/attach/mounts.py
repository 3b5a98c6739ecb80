"""The mount table, read with bounds, and unmount helpers.

Only mounts the attach layer made are ever unmounted without being named by the user: its FUSE
mounts, whose mountpoints are under the state root.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass

from blockyard.attach.errors import ToolError
from blockyard.attach.loop import TOOL_TIMEOUT_S, dev_numbers, run_tool

log = logging.getLogger(__name__)

MOUNTINFO = "/proc/self/mountinfo"
#: rds-csi: a mount table this large means a mount storm; refuse to act on it blindly.
MOUNT_TABLE_MAX_BYTES = 64 << 20


@dataclass(frozen=True, slots=True)
class MountEntry:
    mount_id: int
    dev: str
    mountpoint: str
    fstype: str
    source: str


def _unescape(field: str) -> str:
    # proc(5): space, tab, newline and backslash are octal-escaped in mountinfo.
    out: list[str] = []
    i = 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) + 0 and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[MountEntry]:
    """Parse proc(5) mountinfo; malformed lines are skipped."""
    entries: list[MountEntry] = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        a = left.split()
        b = right.split()
        if len(a) < 5 or len(b) < 2:
            continue
        try:
            mount_id = int(a[0])
        except ValueError:
            continue
        entries.append(
            MountEntry(
                mount_id=mount_id,
                dev=a[2],
                mountpoint=_unescape(a[4]),
                fstype=b[0],
                source=_unescape(b[1]),
            )
        )
    return entries


def read_mounts() -> list[MountEntry]:
    with open(MOUNTINFO, "rb") as f:
        data = f.read(MOUNT_TABLE_MAX_BYTES + 1)
    if len(data) > MOUNT_TABLE_MAX_BYTES:
        raise ToolError(
            f"{MOUNTINFO} is larger than {MOUNT_TABLE_MAX_BYTES} bytes: a mount storm? "
            "Inspect the mount table before attaching or detaching anything"
        )
    return parse_mountinfo(data.decode(errors="replace"))


def mounts_at(path: str) -> list[MountEntry]:
    return [m for m in read_mounts() if m.mountpoint == path]


def mounts_under(root: str) -> list[MountEntry]:
    """Mounts whose mountpoint is strictly below ``root``."""
    prefix = root.rstrip("/") + "/"
    return [m for m in read_mounts() if m.mountpoint.startswith(prefix)]


def mounts_of_device(device: str) -> list[MountEntry]:
    """Mounts of ``device`` or any of its partitions (matched by major:minor, not by name)."""
    numbers = dev_numbers(device)
    if not numbers:
        return []
    return [m for m in read_mounts() if m.dev in numbers]


def unmount(path: str, *, lazy: bool = False) -> None:
    argv = ["umount", "-l", path] if lazy else ["umount", path]
    run_tool(argv, timeout_s=TOOL_TIMEOUT_S)


def unmount_fuse_stale(path: str) -> None:
    """Detach a FUSE mount whose daemon may be dead (``fusermount3 -u -z``; lazy, never blocks)."""
    if shutil.which("fusermount3"):
        proc = run_tool(["fusermount3", "-u", "-z", path], check=False)
        if proc.returncode == 0 or not mounts_at(path):
            return
        log.info("fusermount3 -u -z %s failed (%s); trying umount -l", path, proc.stderr.strip())
    unmount(path, lazy=True)
