"""Small filesystems for the disk-full fault: each server's data directory on its own ext4
image (a sparse file, loop-mounted), which the fault fills to the last block with one
preallocated file and frees again by deleting it. A real filesystem running out of space, as
when a node's disk fills: the server meets ENOSPC wherever it next needs a block. Root only.

The image is made with no blocks reserved for root (``mkfs.ext4 -m 0``): the servers run as
root, and reserved blocks would leave them space the fill did not take.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from pathlib import Path
from typing import Final

from blockyard.errors import BlockyardError

#: Room for two 64 MiB copies with their WALs and then some.
DEFAULT_DISK_BYTES: Final = 512 << 20
#: The fill stops trying once less than this is left (ext4 allocation granularity and metadata).
FILL_GRANULE_BYTES: Final = 64 << 10
FILLER: Final = "chaos-fill"
COMMAND_TIMEOUT_S: Final = 60.0


class DiskError(BlockyardError):
    """The small filesystem cannot be made or mounted here."""


def _run(*args: str) -> None:
    try:
        subprocess.run(args, check=True, capture_output=True, timeout=COMMAND_TIMEOUT_S)
    except (subprocess.CalledProcessError, FileNotFoundError, subprocess.TimeoutExpired) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        raise DiskError(
            f"{' '.join(args)} failed: {exc} {detail.decode(errors='replace')}"
        ) from exc


class SmallDisk:
    """One ext4 image mounted at ``mount``; the server's data directory is :attr:`data_dir`."""

    def __init__(self, image: Path, mount: Path, size_bytes: int = DEFAULT_DISK_BYTES) -> None:
        if os.geteuid() != 0:
            raise DiskError("loop-mounting a filesystem needs root")
        if shutil.which("mkfs.ext4") is None:
            raise DiskError("mkfs.ext4 is not installed (apt-get install e2fsprogs)")
        self.image = image
        self.mount = mount
        self.mounted = False
        with image.open("wb") as f:
            f.truncate(size_bytes)
        _run("mkfs.ext4", "-q", "-F", "-m", "0", str(image))
        mount.mkdir(parents=True, exist_ok=True)
        _run("mount", "-o", "loop", str(image), str(mount))
        self.mounted = True
        self.data_dir = mount / "data"  # not the mount's root, which holds lost+found
        self.data_dir.mkdir(exist_ok=True)

    def free_bytes(self) -> int:
        st = os.statvfs(self.mount)
        return st.f_bavail * st.f_frsize

    def fill(self) -> int:
        """Take every free block with one preallocated file; the bytes taken. (A fallocate
        that fails with ENOSPC may keep part of what it allocated: the count is the free
        space that went, not the sum of the calls that succeeded.)"""
        before = self.free_bytes()
        fd = os.open(self.mount / FILLER, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            offset, chunk = 0, before
            while chunk >= FILL_GRANULE_BYTES:
                try:
                    os.posix_fallocate(fd, offset, chunk)
                    offset += chunk
                    chunk = self.free_bytes()
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    offset += chunk  # past whatever the failed call kept
                    chunk //= 2
        finally:
            os.close(fd)
        return before - self.free_bytes()

    def unfill(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.mount / FILLER).unlink()

    def close(self) -> None:
        """Unmount (lazily if something still holds it) and delete the image."""
        if self.mounted:
            try:
                _run("umount", str(self.mount))
            except DiskError:
                _run("umount", "-l", str(self.mount))
            self.mounted = False
        with contextlib.suppress(FileNotFoundError):
            self.image.unlink()
