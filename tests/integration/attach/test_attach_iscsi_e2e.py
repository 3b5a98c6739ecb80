"""The whole node path over the network: `blockyard serve` exports a volume over iSCSI, and
`blockyard attach --server` logs in with the userspace initiator, exposes it as /dev/loopN
through FUSE, makes a filesystem, mounts it; files written with fsync survive detach and a
fresh attach byte for byte, and fsck is clean. Also the raw block mode and two portals."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from attach_helpers import AttachEnv, cli

from blockyard.testing.serve import ServeProcess, serve_process

SIZE = "320MiB"  # mkfs.xfs wants at least 300 MiB


@pytest.fixture
def served(attach_env: AttachEnv) -> Iterator[ServeProcess]:
    with serve_process(
        Path(attach_env.data_dir),
        attach_env.tmp / "serve.log",
        ["127.0.0.1:0", "127.0.0.2:0"],
    ) as proc:
        yield proc


def _write(root: str) -> dict[str, str]:
    digests = {}
    for i, size in enumerate((1, 4095, 1 << 20, 3 << 20)):
        data = os.urandom(size)
        with open(os.path.join(root, f"f{i}"), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        digests[f"f{i}"] = hashlib.sha256(data).hexdigest()
    return digests


def _digests(root: str, names: list[str]) -> dict[str, str]:
    return {n: hashlib.sha256(Path(root, n).read_bytes()).hexdigest() for n in names}


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_filesystem_over_iscsi_survives_reattach(
    attach_env: AttachEnv, served: ServeProcess, fstype: str
) -> None:
    state = ("--state-dir", attach_env.root)
    created = json.loads(
        cli("volume", "create", "vol", "--size", SIZE, "--server", served.api, "--json").stdout
    )
    mnt = str(attach_env.tmp / "mnt")

    first = cli("attach", "vol", "--server", served.api, "--fs", fstype, mnt, *state).stdout
    assert f"created {fstype}" in first
    assert os.path.ismount(mnt)
    digests = _write(mnt)
    (listed,) = json.loads(cli("attachments", "--json", *state).stdout)
    assert listed["volume"] == "vol" and listed["iqn"] == created["iqn"], listed
    assert listed["health"] == "ready" and listed["daemon_alive"], listed
    cli("detach", mnt, *state)
    assert not os.path.ismount(mnt)

    again = cli("attach", "vol", "--server", served.api, "--fs", fstype, mnt, *state).stdout
    assert f"checked existing {fstype}" in again, "an existing filesystem must not be re-made"
    assert _digests(mnt, list(digests)) == digests
    device = again.splitlines()[0]
    subprocess.run(["umount", mnt], check=True, timeout=60)
    fsck = ["e2fsck", "-f", "-n", device] if fstype == "ext4" else ["xfs_repair", "-n", device]
    result = subprocess.run(fsck, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    cli("detach", device, *state)
    assert "not attached" in cli("detach", "vol", *state).stdout


def test_raw_block_over_two_portals(attach_env: AttachEnv, served: ServeProcess) -> None:
    state = ("--state-dir", attach_env.root)
    created = json.loads(
        cli("volume", "create", "blk", "--size", "64MiB", "--server", served.api, "--json").stdout
    )
    argv = ["attach", "--iqn", created["iqn"], "--block", *state]
    for portal in served.portals:
        argv += ["--portal", portal]
    device = cli(*argv).stdout.splitlines()[0]
    assert device.startswith("/dev/loop")
    pattern = os.urandom(1 << 20)
    fd = os.open(device, os.O_RDWR)
    try:
        os.pwrite(fd, pattern, 8 << 20)
        os.fsync(fd)
    finally:
        os.close(fd)
    cli("detach", device, *state)
    # Read it back through a fresh attachment: the bytes went over iSCSI to the server.
    device = cli(*argv).stdout.splitlines()[0]
    fd = os.open(device, os.O_RDONLY)
    try:
        assert os.pread(fd, len(pattern), 8 << 20) == pattern
    finally:
        os.close(fd)
    cli("detach", device, *state)
