"""The whole node path over the network: `blockyard serve` exports a volume over iSCSI, and
`blockyard attach --server` logs in with the userspace initiator, exposes it as /dev/loopN
through FUSE, makes a filesystem, mounts it; files written with fsync survive detach and a
fresh attach byte for byte, and fsck is clean. Also the raw block mode and two portals."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from attach_helpers import AttachEnv, cli

START_TIMEOUT_S = 30.0
SIZE = "320MiB"  # mkfs.xfs wants at least 300 MiB


@dataclass
class Served:
    process: subprocess.Popen[str]
    api: str
    portals: list[str]


@pytest.fixture
def served(attach_env: AttachEnv) -> Iterator[Served]:
    data = Path(attach_env.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "blockyard.cli.main", "serve", "--data-dir", str(data)]
    argv += ["--api-listen", "127.0.0.1:0", "--shutdown-timeout", "10"]
    argv += ["--iscsi-listen", "127.0.0.1:0", "--iscsi-listen", "127.0.0.2:0"]
    log = (attach_env.tmp / "serve.log").open("w")
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    out = proc.stdout
    threading.Thread(target=lambda: lines.put(out.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=START_TIMEOUT_S)
        assert line.startswith("READY "), line
        fields = dict(part.split("=", 1) for part in line.split()[1:])
        yield Served(proc, fields["api"], fields["iscsi"].split(","))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        out.close()
        log.close()


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
    attach_env: AttachEnv, served: Served, fstype: str
) -> None:
    state = ("--state-dir", attach_env.root)
    cli("volume", "create", "vol", "--size", SIZE, "--server", served.api)
    mnt = str(attach_env.tmp / "mnt")

    first = cli("attach", "vol", "--server", served.api, "--fs", fstype, mnt, *state).stdout
    assert f"created {fstype}" in first
    assert os.path.ismount(mnt)
    digests = _write(mnt)
    (listed,) = json.loads(cli("attachments", "--json", *state).stdout)
    assert listed["volume"] == "vol" and listed["iqn"] == "iqn.2026-11.io.blockyard:vol", listed
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


def test_raw_block_over_two_portals(attach_env: AttachEnv, served: Served) -> None:
    state = ("--state-dir", attach_env.root)
    cli("volume", "create", "blk", "--size", "64MiB", "--server", served.api)
    argv = ["attach", "--iqn", "iqn.2026-11.io.blockyard:blk", "--block", *state]
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
