"""Kill -9 the attach daemon and/or its caller at each step of attach and detach: a later run
adopts or cleans up, and nothing leaks (loop devices, FUSE mounts, daemon processes). Storage
the attach layer did not create is never touched."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest
from attach_helpers import AttachEnv, cli, daemon_pids, losetup_json, snapshot

from blockyard.attach import loop as loopmod
from blockyard.attach import manager, mounts
from blockyard.attach.state import CRASH_ENV
from blockyard.engine import VolumeStore

SIZE_BYTES = 8 << 20

ATTACH_POINTS = [
    "daemon_after_state",
    "daemon_after_open",
    "daemon_after_fuse",
    "daemon_after_loop",
    "daemon_after_ready",
    "caller_after_spawn",
    "caller_after_ready",
    # Both die: the daemon mid-attach and the caller before it could clean up.
    "daemon_after_loop,caller_after_spawn",
    "daemon_after_fuse,caller_after_spawn",
]
DETACH_POINTS = [
    "daemon_detach_after_flush",
    "daemon_detach_after_loop",
    "daemon_detach_after_unmount",
]


def _ours(env: AttachEnv) -> tuple[set[str], set[str], set[int]]:
    loops = {d["name"] for d in losetup_json() if str(d["back-file"]).startswith(env.root)}
    fuse = {m.mountpoint for m in mounts.mounts_under(env.root)}
    return {str(x) for x in loops}, fuse, daemon_pids(env.root)


def _assert_clean(env: AttachEnv) -> None:
    assert _ours(env) == (set(), set(), set())
    assert manager.list_attachments(env.root) == []


def _write_and_check(device: str, payload: bytes) -> None:
    fd = os.open(device, os.O_RDWR)
    try:
        os.pwrite(fd, payload, 4096)
        os.fsync(fd)
        assert os.pread(fd, len(payload), 4096) == payload
    finally:
        os.close(fd)


@pytest.mark.parametrize("point", ATTACH_POINTS)
def test_crash_during_attach(attach_env: AttachEnv, point: str) -> None:
    VolumeStore(attach_env.data_dir).create("v", SIZE_BYTES).close()
    args = ("attach", "--local", attach_env.local("v"), "--state-dir", attach_env.root)
    crashed = cli(*args, env={CRASH_ENV: point}, check=False)
    if point.startswith("caller"):
        assert crashed.returncode == -signal.SIGKILL
    elif point != "daemon_after_ready":
        assert crashed.returncode != 0

    # A later run adopts a healthy daemon or cleans up and attaches afresh.
    device = cli(*args).stdout.strip()
    assert device.startswith("/dev/loop")
    ids = [a.id for a in manager.list_attachments(attach_env.root)]
    assert len(ids) == 1 and len(daemon_pids(attach_env.root)) == 1
    _write_and_check(device, b"after crash " + point.encode())
    cli("detach", "v", "--state-dir", attach_env.root)
    _assert_clean(attach_env)


@pytest.mark.parametrize("point", DETACH_POINTS)
def test_daemon_crash_during_detach(attach_env: AttachEnv, point: str) -> None:
    VolumeStore(attach_env.data_dir).create("v", SIZE_BYTES).close()
    state = ("--state-dir", attach_env.root)
    # The daemon inherits the variable; its crash points are only reached while detaching.
    device = cli("attach", "--local", attach_env.local("v"), *state, env={CRASH_ENV: point})
    _write_and_check(device.stdout.strip(), b"before detach")
    cli("detach", "v", *state)
    _assert_clean(attach_env)


def test_caller_crash_during_detach_then_retry(attach_env: AttachEnv) -> None:
    VolumeStore(attach_env.data_dir).create("v", SIZE_BYTES).close()
    state = ("--state-dir", attach_env.root)
    cli("attach", "--local", attach_env.local("v"), *state)
    crashed = cli("detach", "v", *state, env={CRASH_ENV: "caller_detach_after_stop"}, check=False)
    assert crashed.returncode == -signal.SIGKILL
    assert "nothing to do" in cli("detach", "v", *state).stdout
    _assert_clean(attach_env)


def test_killed_daemon_with_mounted_fs_is_cleaned_only_after_unmount(
    attach_env: AttachEnv,
) -> None:
    VolumeStore(attach_env.data_dir).create("v", SIZE_BYTES).close()
    state = ("--state-dir", attach_env.root)
    device = cli("attach", "--local", attach_env.local("v"), *state).stdout.strip()
    subprocess.run(["mkfs.ext4", "-q", device], check=True, timeout=60)
    mnt = attach_env.tmp / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", device, str(mnt)], check=True, timeout=30)
    (pid,) = daemon_pids(attach_env.root)
    os.kill(pid, signal.SIGKILL)

    listed = json.loads(cli("attachments", "--json", *state).stdout)
    assert [a["health"] for a in listed] == ["broken"]
    report = manager.cleanup(attach_env.root)
    assert report.refused and not report.removed, "a mounted device must not be torn down"
    assert os.path.ismount(mnt)
    subprocess.run(["umount", "-l", str(mnt)], check=True, timeout=30)
    report = manager.cleanup(attach_env.root)
    assert len(report.removed) == 1
    _assert_clean(attach_env)


def test_foreign_loop_devices_and_mounts_survive_cleanup(attach_env: AttachEnv) -> None:
    # Foreign storage: a loop device on a file outside the state root (at a path shaped like
    # ours), and a tmpfs mount.
    foreign_dir = attach_env.tmp / "elsewhere" / "v-1" / "mnt"
    foreign_dir.mkdir(parents=True)
    img = foreign_dir / "disk"
    with open(img, "wb") as f:
        f.truncate(4 << 20)
    foreign_loop = loopmod.attach_loop(str(img), direct_io=False).device
    tmpfs = attach_env.tmp / "tmpfs"
    tmpfs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(tmpfs)], check=True, timeout=30)
    try:
        VolumeStore(attach_env.data_dir).create("v", SIZE_BYTES).close()
        state = ("--state-dir", attach_env.root)
        cli("attach", "--local", attach_env.local("v"), *state)
        (pid,) = daemon_pids(attach_env.root)
        os.kill(pid, signal.SIGKILL)
        before = snapshot(attach_env.root)
        manager.cleanup(attach_env.root, force=True)
        cli("attachments", "--cleanup", *state)
        after = snapshot(attach_env.root)
        assert (foreign_loop, str(img)) in after.loops
        assert str(tmpfs) in after.mounts
        gone = before.loops - after.loops
        assert gone and all(b.startswith(attach_env.root) for _, b in gone)
        _assert_clean(attach_env)
    finally:
        subprocess.run(["umount", str(tmpfs)], check=False, timeout=30)
        subprocess.run(["losetup", "-d", foreign_loop], check=False, timeout=30)
