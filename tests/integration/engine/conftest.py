"""Fixtures for engine tests on real, small filesystems (tmpfs and a loop-mounted ext4 image)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

#: Small enough to fill in seconds, large enough for a 4 MiB WAL and a few dozen MiB of data.
SMALL_FS_BYTES = 64 << 20


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=60)


@pytest.fixture(params=["tmpfs", "ext4"])
def small_fs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A freshly made 64 MiB filesystem mounted under ``tmp_path``; unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.fail("these tests mount filesystems and must run as root (CI does)")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    loop = ""
    if request.param == "tmpfs":
        _run("mount", "-t", "tmpfs", "-o", f"size={SMALL_FS_BYTES}", "tmpfs", str(mnt))
    else:
        image = tmp_path / "fs.img"
        with open(image, "wb") as f:
            f.truncate(SMALL_FS_BYTES)
        _run("mkfs.ext4", "-q", "-F", "-m", "0", str(image))
        loop = subprocess.run(
            ["losetup", "--find", "--show", str(image)],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.strip()
        _run("mount", loop, str(mnt))
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True, timeout=60)
        if loop:
            subprocess.run(["losetup", "-d", loop], check=False, capture_output=True, timeout=60)
