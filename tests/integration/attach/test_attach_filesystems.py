"""ext4 and xfs on an attached volume survive detach and re-attach, byte for byte, fsck clean."""

from __future__ import annotations

import hashlib
import os
import subprocess

import pytest
from attach_helpers import AttachEnv, cli

from blockyard.engine import VolumeStore

#: mkfs.xfs refuses filesystems smaller than 300 MiB.
SIZE_BYTES = 320 << 20


def _write_files(root: str) -> dict[str, str]:
    digests: dict[str, str] = {}
    for i, size in enumerate((1, 4095, 1 << 20, 5 << 20)):
        data = os.urandom(size)
        path = os.path.join(root, f"f{i}")
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        digests[f"f{i}"] = hashlib.sha256(data).hexdigest()
    return digests


def _read_digests(root: str, names: list[str]) -> dict[str, str]:
    out = {}
    for name in names:
        with open(os.path.join(root, name), "rb") as f:
            out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_filesystem_round_trip(attach_env: AttachEnv, fstype: str) -> None:
    VolumeStore(attach_env.data_dir).create("fs", SIZE_BYTES).close()
    mnt = str(attach_env.tmp / "mnt")
    src = attach_env.local("fs")
    state = ("--state-dir", attach_env.root)

    first = cli("attach", "--local", src, "--fs", fstype, mnt, *state).stdout
    assert f"created {fstype}" in first
    digests = _write_files(mnt)
    cli("detach", mnt, *state)
    assert not os.path.ismount(mnt)
    assert "not attached" in cli("detach", mnt, *state).stdout  # idempotent

    again = cli("attach", "--local", src, "--fs", fstype, mnt, *state).stdout
    assert f"checked existing {fstype}" in again, "an existing filesystem must never be re-made"
    assert _read_digests(mnt, list(digests)) == digests
    device = again.splitlines()[0]

    # Detach by device refuses while mounted, then works after unmount; fsck is clean.
    refused = cli("detach", device, *state, check=False)
    assert refused.returncode == 1 and "mounted at" in refused.stderr
    subprocess.run(["umount", mnt], check=True, timeout=30)
    fsck = ["e2fsck", "-f", "-n", device] if fstype == "ext4" else ["xfs_repair", "-n", device]
    result = subprocess.run(fsck, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    cli("detach", device, *state)

    # A different filesystem type is refused, never reformatted.
    other = "xfs" if fstype == "ext4" else "ext4"
    wrong = cli("attach", "--local", src, "--fs", other, mnt, *state, check=False)
    assert wrong.returncode == 1 and "never reformatted" in wrong.stderr
    cli("detach", "fs", *state)
