"""Unit tests of the Node service's helpers: circuit breaker (fake clock), mount-table parsing
and storm detection, publish-context parsing, option checks and the block target rules."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from blockyard.csi.breaker import CircuitBreakers
from blockyard.csi.errors import StateFileError
from blockyard.csi.mounts import MountTable, duplicates
from blockyard.csi.node import parse_target
from blockyard.csi.node_config import AttachLauncher, AttachMode, parse_node_options
from blockyard.csi.node_errors import (
    BreakerOpenError,
    MountStormError,
    MountTableTimeoutError,
    TargetPathError,
)
from blockyard.csi.node_fs import mount_options, publish_block, remove_target
from blockyard.csi.node_state import NodeStateStore, StagedVolume
from blockyard.errors import InvalidArgumentError
from blockyard.mountinfo import parse_mountinfo


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_three_failures_and_half_opens(tmp_path: Path) -> None:
    clock = Clock()
    b = CircuitBreakers(tmp_path, clock=clock)
    for _ in range(2):
        b.check("v")
        b.record_failure("v", "boom")
    b.check("v")  # two failures: still closed
    b.record_failure("v", "boom")
    with pytest.raises(BreakerOpenError, match=r"circuit breaker open.*boom"):
        b.check("v")
    b.check("other")  # per volume
    clock.now += 299
    with pytest.raises(BreakerOpenError):
        b.check("v")
    clock.now += 2
    b.check("v")  # half-open: one attempt goes through
    b.record_failure("v", "again")
    with pytest.raises(BreakerOpenError, match="again"):
        b.check("v")
    b.record_success("v")
    b.check("v")
    assert b.state("v").failures == 0


def test_breaker_survives_restart_and_resets_by_file(tmp_path: Path) -> None:
    clock = Clock()
    for _ in range(3):
        CircuitBreakers(tmp_path, clock=clock).record_failure("v", "x")
    CircuitBreakers(tmp_path, clock=clock).record_failure("w", "x")
    fresh = CircuitBreakers(tmp_path, clock=clock)
    with pytest.raises(BreakerOpenError, match=r"v\.reset"):
        fresh.check("v")
    (tmp_path / "v.reset").touch()
    fresh.check("v")
    assert not (tmp_path / "v.reset").exists()
    assert fresh.state("w").failures == 1
    (tmp_path / "reset").touch()
    assert fresh.state("w").failures == 0
    (tmp_path / "v.json").write_text("{not json")
    assert fresh.state("v").failures == 0  # damaged state starts closed


MOUNTINFO = (
    "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
    "40 22 0:50 / /mnt/a\\040b rw shared:2 - tmpfs storm rw\n"
    "41 22 0:50 / /mnt/c rw - tmpfs storm rw\n"
    "42 22 0:50 /sub /mnt/d ro - tmpfs storm rw\n"
    "43 22 0:51 / /mnt/e rw - tmpfs storm rw\n"
    "garbage line\n"
    "x 22 0:52 / /mnt/f rw - tmpfs t rw\n"
)


def test_parse_mountinfo_and_duplicates() -> None:
    mounts = parse_mountinfo(MOUNTINFO)
    assert [m.mount_id for m in mounts] == [22, 40, 41, 42, 43]
    assert mounts[1].mountpoint == "/mnt/a b" and mounts[1].source == "storm"
    assert mounts[3].root == "/sub" and mounts[3].read_only
    # Same device and root twice; another root or another device is not a duplicate.
    found = duplicates(mounts, 2)
    assert [(m.dev, m.root, n) for m, n in found] == [("0:50", "/", 2)]
    assert duplicates(mounts, 3) == []


def test_mount_table_storm_and_timeout(tmp_path: Path) -> None:
    path = tmp_path / "mountinfo"
    path.write_text(MOUNTINFO)
    table = MountTable(path=str(path), storm_threshold=2)
    with pytest.raises(MountStormError, match=r"mounted 2 times.*threshold 2"):
        table.check_storm()
    assert [m.mount_id for m in table.at("/mnt/c")] == [41]
    MountTable(path=str(path), storm_threshold=3).check_storm()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening a FIFO with no writer blocks: a hanging mount table
    hang = MountTable(path=str(fifo), timeout_s=0.2)
    with pytest.raises(MountTableTimeoutError, match="longer than"):
        hang.read()
    with open(fifo, "wb"):  # release the blocked reader thread
        pass


def test_parse_target() -> None:
    t = parse_target("v", {"iqn": "iqn.2026-11.io.blockyard:v", "portals": "a:1, b:2",
                           "portal": "b:2", "lun": "3", "naaId": "6001"})  # fmt: skip
    assert t.portals == ("b:2", "a:1") and t.lun == 3 and t.naa_id == "6001"
    t = parse_target("v", {"iqn": "iqn.2026-11.io.blockyard:v", "portal": "a:1"})
    assert t.portals == ("a:1",) and t.lun == 0
    with pytest.raises(InvalidArgumentError, match="iqn"):
        parse_target("v", {"portal": "a:1"})
    with pytest.raises(InvalidArgumentError, match="portals"):
        parse_target("v", {"iqn": "iqn.2026-11.io.blockyard:v"})
    with pytest.raises(InvalidArgumentError, match="lun"):
        parse_target("v", {"iqn": "iqn.2026-11.io.blockyard:v", "portal": "a:1", "lun": "x"})


def test_node_options() -> None:
    opts = parse_node_options(attach_mode="userspace", attach_launcher=None,
                              attach_state_dir="/a", node_state_dir=None,
                              mount_storm_threshold=5)  # fmt: skip
    assert opts.attach_mode is AttachMode.USERSPACE and not opts.kernel_attach()
    assert opts.attach_launcher is AttachLauncher.DIRECT
    assert opts.attach_launcher.argv_prefix() == ()
    assert "systemd-run" in AttachLauncher.SYSTEMD_RUN.argv_prefix()
    assert opts.mount_storm_threshold == 5 and str(opts.attach_state_dir) == "/a"
    for bad in (
        {"attach_mode": "nope"},
        {"attach_launcher": "nope"},
        {"mount_storm_threshold": 1},
        {"node_state_dir": "relative"},
    ):
        args: dict[str, object] = {"attach_mode": None, "attach_launcher": None,
                                   "attach_state_dir": None, "node_state_dir": None,
                                   "mount_storm_threshold": None} | bad  # fmt: skip
        with pytest.raises(ValueError, match="--"):
            parse_node_options(**args)  # type: ignore[arg-type]


def test_mount_options() -> None:
    assert mount_options("ext4", ("noatime,discard",), read_only=True) == [
        "noatime", "discard", "ro"
    ]  # fmt: skip
    assert mount_options("xfs", (), read_only=False) == ["nouuid"]


def test_block_target_rules(tmp_path: Path) -> None:
    loop = os.stat("/dev/null")  # a character device: only its numbers are used
    numbers = (os.major(loop.st_rdev), os.minor(loop.st_rdev))
    target = tmp_path / "pod" / "dev" / "vol"
    assert "created" in publish_block(str(target), numbers)
    st = os.lstat(target)
    assert stat.S_ISBLK(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == numbers
    assert publish_block(str(target), numbers) == "already published"
    remove_target(str(target))
    assert not target.exists()
    remove_target(str(target))  # idempotent
    target.mkdir()
    with pytest.raises(TargetPathError, match="is a directory"):
        publish_block(str(target), numbers)
    assert target.is_dir()
    (target / "keep").write_text("x")
    with pytest.raises(TargetPathError, match="not empty"):
        remove_target(str(target))
    other = tmp_path / "data"
    other.write_text("precious")
    with pytest.raises(TargetPathError, match="neither"):
        publish_block(str(other), numbers)
    assert other.read_text() == "precious"


def test_state_store_round_trip(tmp_path: Path) -> None:
    store = NodeStateStore(tmp_path)
    rec = StagedVolume(volume_id="v", staging_path="/s", access_type="mount", fs_type="ext4",
                       attach_kind="userspace", device="/dev/loop3", attachment_id="v-1",
                       portals=["a:1"])  # fmt: skip
    store.put(rec)
    assert store.get("v") == rec
    assert store.all() == [rec]
    store.delete("v")
    store.delete("v")
    assert store.get("v") is None
    (tmp_path / "volumes" / "bad.json").write_text("[]")
    with pytest.raises(StateFileError, match="damaged"):
        store.get("bad")


class GrowingDevice:
    """Just what SectorFile reads at construction and on refresh."""

    logical_block_size = 512
    max_transfer_blocks = 128

    def __init__(self) -> None:
        self.block_count = 2048


def test_sector_file_takes_a_grown_size_and_never_shrinks() -> None:
    from blockyard.attach.fusefile import SectorFile  # noqa: PLC0415

    dev = GrowingDevice()
    f = SectorFile(dev, name="g")  # type: ignore[arg-type]
    assert f.size_bytes == 1 << 20
    dev.block_count = 4096
    assert f.refresh_size() == 2 << 20 and f.size_bytes == 2 << 20
    dev.block_count = 1024
    assert f.refresh_size() == 2 << 20
