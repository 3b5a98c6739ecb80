"""The disk-full fault's filesystem, for real: an ext4 image loop-mounted, filled to the last
block by one preallocated file (a write needing a new block then fails with ENOSPC, root
included), freed by deleting it, and unmounted and deleted at close."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from blockyard.chaos.disks import SmallDisk


def _mounted(path: Path) -> bool:
    return any(
        line.split()[1] == str(path) for line in Path("/proc/mounts").read_text().splitlines()
    )


def test_fill_takes_every_block_and_unfill_gives_them_back(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("loop mounts need root here (run the suite as root, as CI does)")
    disk = SmallDisk(tmp_path / "d.img", tmp_path / "mnt", size_bytes=64 << 20)
    try:
        assert _mounted(disk.mount)
        (disk.data_dir / "before").write_bytes(b"x" * 4096)
        free = disk.free_bytes()
        taken = disk.fill()
        assert free - (1 << 20) < taken <= free
        assert disk.free_bytes() < 1 << 20
        with pytest.raises(OSError) as exc, (disk.data_dir / "after").open("wb") as f:
            f.write(os.urandom(2 << 20))
            f.flush()
            os.fsync(f.fileno())
        assert exc.value.errno == errno.ENOSPC
        assert (disk.data_dir / "before").read_bytes() == b"x" * 4096
        disk.unfill()
        assert disk.free_bytes() >= taken
        (disk.data_dir / "after").write_bytes(os.urandom(2 << 20))
    finally:
        disk.close()
    assert not _mounted(disk.mount)
    assert not disk.image.exists()
