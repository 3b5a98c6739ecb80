"""The mount table, read with bounds, and unmount helpers.

Only mounts the attach layer made are ever unmounted without being named by the user: its FUSE
mounts, whose mountpoints are under the state root.
"""

from __future__ import annotations

import logging
import shutil

from blockyard.attach.errors import ToolError
from blockyard.attach.loop import TOOL_TIMEOUT_S, dev_numbers, run_tool
from blockyard.mountinfo import MOUNT_TABLE_MAX_BYTES, MOUNTINFO, Mount, parse_mountinfo

log = logging.getLogger(__name__)


def read_mounts() -> list[Mount]:
    with open(MOUNTINFO, "rb") as f:
        data = f.read(MOUNT_TABLE_MAX_BYTES + 1)
    if len(data) > MOUNT_TABLE_MAX_BYTES:
        raise ToolError(
            f"{MOUNTINFO} is larger than {MOUNT_TABLE_MAX_BYTES} bytes: a mount storm? "
            "Inspect the mount table before attaching or detaching anything"
        )
    return parse_mountinfo(data.decode(errors="replace"))


def mounts_at(path: str) -> list[Mount]:
    return [m for m in read_mounts() if m.mountpoint == path]


def mounts_under(root: str) -> list[Mount]:
    """Mounts whose mountpoint is strictly below ``root``."""
    prefix = root.rstrip("/") + "/"
    return [m for m in read_mounts() if m.mountpoint.startswith(prefix)]


def mounts_of_device(device: str) -> list[Mount]:
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
