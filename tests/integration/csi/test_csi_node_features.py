"""Node features against real processes: RWX block shared by two nodes (live migration),
snapshot restore, online expansion, the per-volume circuit breaker and mount-storm refusal."""

from __future__ import annotations

import mmap
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from csi_helpers import MIB, Stack, rpc_code
from csi_node_support import (
    PREFIX,
    Mode,
    NodePlugin,
    controller_publish,
    controller_unpublish,
    create_volume,
    fs_cap,
    leftovers,
    publish,
    scrub,
    stage,
    unpublish,
    unstage,
)

from blockyard.csi.proto import csi_pb2 as pb

Code = grpc.StatusCode
STORM_THRESHOLD = 5


@pytest.fixture(scope="module")
def nodes(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[NodePlugin]]:
    root = tmp_path_factory.mktemp("fnodes")
    plugins = [
        NodePlugin(root / "a", "node-a").start(),
        NodePlugin(root / "b", "node-b").start(),
        NodePlugin(root / "s", "node-s",
                   ("--mount-storm-threshold", str(STORM_THRESHOLD))).start(),
    ]  # fmt: skip
    try:
        yield plugins
    finally:
        for p in plugins:
            if p.csi is not None:
                p.stop()
        scrub(root)
    assert not leftovers(root)


def direct_write(path: str, offset: int, data: bytes) -> None:
    buf = mmap.mmap(-1, len(data))
    buf.write(data)
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        assert os.pwrite(fd, buf, offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def direct_read(path: str, offset: int, length: int) -> bytes:
    buf = mmap.mmap(-1, length)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        assert os.preadv(fd, [buf], offset) == length
    finally:
        os.close(fd)
    return bytes(buf)


def test_rwx_block_live_migration(stack: Stack, nodes: list[NodePlugin]) -> None:
    a, b, _ = nodes
    cap = fs_cap("", Mode.MULTI_NODE_MULTI_WRITER)
    volume = create_volume(stack, "rwx-mig", cap)
    vid = volume.volume_id
    targets = {}
    for n in (a, b):
        stage(n, volume, cap, controller_publish(stack, vid, n, cap))
        targets[n.node_id] = publish(n, vid, cap)
    try:
        first = os.urandom(256 << 10)
        direct_write(targets["node-a"], 4 * MIB, first)
        assert direct_read(targets["node-b"], 4 * MIB, len(first)) == first
        second = os.urandom(256 << 10)
        direct_write(targets["node-b"], 4 * MIB, second)
        assert direct_read(targets["node-a"], 4 * MIB, len(second)) == second
    finally:
        for n in (a, b):
            unpublish(n, vid, targets[n.node_id])
            unstage(n, vid)
            controller_unpublish(stack, vid, n)
    assert not leftovers(a.root) and not leftovers(b.root)
    stack.csi.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid), timeout=60)


def mount_source(path: str) -> str:
    with open("/proc/self/mountinfo") as f:
        return next(m.split(" - ")[1].split()[1] for m in f if m.split()[4] == path)


def has_cap_sys_resource() -> bool:
    with open("/proc/self/status") as f:
        eff = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff"))
    return bool(eff & (1 << 24))


def df_total(path: str) -> int:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


@pytest.mark.parametrize("fs_type", ["ext4", "xfs"])
def test_snapshot_restore_and_online_expand(
    stack: Stack, nodes: list[NodePlugin], fs_type: str
) -> None:
    a = nodes[0]
    cap = fs_cap(fs_type)
    size = 320 * MIB if fs_type == "xfs" else 32 * MIB
    volume = create_volume(stack, f"snapsrc-{fs_type}", cap, size)
    vid = volume.volume_id
    stage(a, volume, cap, controller_publish(stack, vid, a, cap))
    target = publish(a, vid, cap)
    payload = os.urandom(200_000)
    with open(os.path.join(target, "before.bin"), "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    # A consistent on-disk image for the snapshot, as a pre-snapshot hook would do.
    subprocess.run(["fsfreeze", "-f", target], check=True, timeout=30)
    try:
        snap = stack.csi.controller.CreateSnapshot(
            pb.CreateSnapshotRequest(source_volume_id=vid, name=f"snap-{fs_type}"), timeout=60
        ).snapshot
    finally:
        subprocess.run(["fsfreeze", "-u", target], check=True, timeout=30)
    restored = create_volume(
        stack, f"restored-{fs_type}", cap, size,
        pb.VolumeContentSource(snapshot=pb.VolumeContentSource.SnapshotSource(
            snapshot_id=snap.snapshot_id)),
    )  # fmt: skip
    rid = restored.volume_id
    try:
        stage(a, restored, cap, controller_publish(stack, rid, a, cap))
        rtarget = publish(a, rid, cap)
        with open(os.path.join(rtarget, "before.bin"), "rb") as f:
            assert f.read() == payload
        unpublish(a, rid, rtarget)
        unstage(a, rid)
        controller_unpublish(stack, rid, a)

        # Online expansion while the file system is mounted and published.
        before = df_total(target)
        new_size = size + 64 * MIB
        answer = stack.csi.controller.ControllerExpandVolume(
            pb.ControllerExpandVolumeRequest(
                volume_id=vid, capacity_range=pb.CapacityRange(required_bytes=new_size),
                volume_capability=cap),
            timeout=60,
        )  # fmt: skip
        assert answer.node_expansion_required
        expand = pb.NodeExpandVolumeRequest(
            volume_id=vid,
            volume_path=target,
            staging_target_path=a.staging(vid),
            capacity_range=pb.CapacityRange(required_bytes=new_size),
            volume_capability=cap,
        )
        if fs_type == "ext4" and not has_cap_sys_resource():
            # ext4 online resize needs CAP_SYS_RESOURCE (ext4_resize_begin), which this
            # machine's bounding set lacks: the device still grows, resize2fs is refused.
            code, details = rpc_code(a.node.NodeExpandVolume, expand)
            assert code == Code.INTERNAL and "resize2fs" in details, details
            device = mount_source(a.staging(vid))
            with open(device, "rb") as f:
                assert f.seek(0, os.SEEK_END) == new_size
        else:
            grown = a.node.NodeExpandVolume(expand, timeout=120)
            assert grown.capacity_bytes >= new_size
            after = df_total(target)
            assert after > before + 48 * MIB, (before, after)
            with open(os.path.join(target, "before.bin"), "rb") as f:
                assert f.read() == payload
            stats = a.node.NodeGetVolumeStats(
                pb.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=target), timeout=30
            )
            assert stats.usage[0].total == after
    finally:
        unpublish(a, vid, target)
        unstage(a, vid)
        controller_unpublish(stack, vid, a)
    assert not leftovers(a.root)
    stack.csi.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=rid), timeout=60)
    stack.csi.controller.DeleteSnapshot(
        pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id), timeout=60
    )
    stack.csi.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid), timeout=60)


def test_block_expand(stack: Stack, nodes: list[NodePlugin]) -> None:
    b = nodes[1]
    cap = fs_cap("")
    volume = create_volume(stack, "grow-block", cap)
    vid = volume.volume_id
    stage(b, volume, cap, controller_publish(stack, vid, b, cap))
    target = publish(b, vid, cap)
    try:
        stack.csi.controller.ControllerExpandVolume(
            pb.ControllerExpandVolumeRequest(
                volume_id=vid, capacity_range=pb.CapacityRange(required_bytes=48 * MIB)),
            timeout=60,
        )  # fmt: skip
        grown = b.node.NodeExpandVolume(
            pb.NodeExpandVolumeRequest(volume_id=vid, volume_path=target,
                                       capacity_range=pb.CapacityRange(required_bytes=48 * MIB)),
            timeout=120,
        )  # fmt: skip
        assert grown.capacity_bytes == 48 * MIB
        with open(target, "rb") as f:
            assert f.seek(0, os.SEEK_END) == 48 * MIB
        tail = os.urandom(64 << 10)
        direct_write(target, 48 * MIB - len(tail), tail)
        assert direct_read(target, 48 * MIB - len(tail), len(tail)) == tail
    finally:
        unpublish(b, vid, target)
        unstage(b, vid)
        controller_unpublish(stack, vid, b)
    assert not leftovers(b.root)
    stack.csi.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid), timeout=60)


def test_circuit_breaker(nodes: list[NodePlugin]) -> None:
    a = nodes[0]
    vid = "unreachable"
    request = pb.NodeStageVolumeRequest(
        volume_id=vid, staging_target_path=a.staging(vid), volume_capability=fs_cap("ext4"),
        publish_context={"iqn": f"{PREFIX}:{vid}", "portals": "127.0.0.1:1", "lun": "0"},
    )  # fmt: skip
    for _ in range(3):
        code, details = rpc_code(a.node.NodeStageVolume, request)
        assert code != Code.OK and "breaker" not in details, details
        assert "127.0.0.1:1" in details
    start = time.monotonic()
    code, details = rpc_code(a.node.NodeStageVolume, request)
    assert time.monotonic() - start < 1.0
    assert code == Code.UNAVAILABLE and "circuit breaker open" in details, details
    assert ".reset" in details  # the message says how to reset it
    (a.root / "state" / "breaker" / f"{vid}.reset").touch()
    code, details = rpc_code(a.node.NodeStageVolume, request)
    assert code != Code.UNAVAILABLE and "breaker" not in details, details
    code, details = rpc_code(a.node.NodeStageVolume, request)
    assert "breaker" not in details  # the count restarted after the reset
    code, details = rpc_code(a.node.NodeStageVolume, request)
    assert "breaker" not in details, details  # the third failure since the reset opens it
    code, details = rpc_code(a.node.NodeStageVolume, request)
    assert code == Code.UNAVAILABLE and "circuit breaker open" in details, details
    assert (a.root / "state" / "breaker" / f"{vid}.json").exists()
    (a.root / "state" / "breaker" / "reset").touch()  # reset every breaker
    code, details = rpc_code(a.node.NodeStageVolume, request)
    assert code != Code.UNAVAILABLE and "breaker" not in details, details
    assert not (a.root / "state" / "breaker" / "reset").exists()  # the reset was consumed
    code, details = rpc_code(a.node.NodeUnstageVolume, pb.NodeUnstageVolumeRequest(
        volume_id=vid, staging_target_path=a.staging(vid)))  # fmt: skip
    assert code == Code.OK, details
    assert not leftovers(a.root)


def test_mount_storm_refuses_publish(stack: Stack, nodes: list[NodePlugin], tmp_path: Path) -> None:
    s = nodes[2]
    cap = fs_cap("ext4")
    volume = create_volume(stack, "storm-vol", cap)
    vid = volume.volume_id
    stage(s, volume, cap, controller_publish(stack, vid, s, cap))
    src = tmp_path / "src"
    src.mkdir()
    binds = [tmp_path / f"b{i}" for i in range(STORM_THRESHOLD + 1)]
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "storm-src", str(src)], check=True,
                   timeout=30)  # fmt: skip
    try:
        for b in binds:
            b.mkdir()
            subprocess.run(["mount", "--bind", str(src), str(b)], check=True, timeout=30)
        code, details = rpc_code(s.node.NodePublishVolume, pb.NodePublishVolumeRequest(
            volume_id=vid, staging_target_path=s.staging(vid), target_path=s.target(vid),
            volume_capability=cap))  # fmt: skip
        assert code == Code.FAILED_PRECONDITION, details
        assert "mount storm" in details and "storm-src" in details, details
        assert f"threshold {STORM_THRESHOLD}" in details
    finally:
        for b in binds:
            subprocess.run(["umount", str(b)], check=False, timeout=30)
        subprocess.run(["umount", str(src)], check=False, timeout=30)
    # Once the duplicates are gone, publishing works again.
    target = publish(s, vid, cap)
    assert os.path.ismount(target)
    unpublish(s, vid, target)
    unstage(s, vid)
    controller_unpublish(stack, vid, s)
    assert not leftovers(s.root)
    stack.csi.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid), timeout=60)
