"""The kubelet/sidecar sequence against real processes: `blockyard serve`, a CSI controller
and node plugins on their unix sockets, real attach daemons (FUSE + loop), real mkfs and
mounts. Every file system and block volume is written on one node and re-verified after a
second stage on another node (its own node id, kubelet dir and attach state)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from csi_helpers import MIB, Stack, rpc_code
from csi_node_support import (
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
BLOCK_PAYLOAD_BYTES = 64 << 10


@pytest.fixture(scope="module")
def nodes(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[NodePlugin]]:
    root = tmp_path_factory.mktemp("nodes")
    plugins = [NodePlugin(root / "a", "node-a").start(), NodePlugin(root / "b", "node-b").start()]
    try:
        yield plugins
    finally:
        for p in plugins:
            if p.csi is not None:
                p.stop()
        scrub(root)
    assert not leftovers(root)


def write_block(device: str, offset: int, data: bytes) -> None:
    fd = os.open(device, os.O_RDWR | os.O_DIRECT)
    try:
        import mmap  # noqa: PLC0415

        buf = mmap.mmap(-1, len(data))
        buf.write(data)
        assert os.pwrite(fd, buf, offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_block(device: str, offset: int, length: int) -> bytes:
    import mmap  # noqa: PLC0415

    fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, length)
        assert os.preadv(fd, [buf], offset) == length
        return bytes(buf)
    finally:
        os.close(fd)


@pytest.mark.parametrize("fs_type", ["ext4", "xfs", ""], ids=["ext4", "xfs", "block"])
def test_lifecycle_and_second_node(stack: Stack, nodes: list[NodePlugin], fs_type: str) -> None:
    a, b = nodes
    cap = fs_cap(fs_type)
    name = f"life-{fs_type or 'block'}"
    size = 320 * MIB if fs_type == "xfs" else 32 * MIB
    volume = create_volume(stack, name, cap, size)
    vid = volume.volume_id
    payload = os.urandom(BLOCK_PAYLOAD_BYTES)

    ctx = controller_publish(stack, vid, a, cap)
    stage(a, volume, cap, ctx)
    stage(a, volume, cap, ctx)  # idempotent retry
    assert os.path.isdir(a.staging(vid))
    target = publish(a, vid, cap)
    assert publish(a, vid, cap) == target  # idempotent retry
    if fs_type:
        assert os.path.isdir(target)
        with open(os.path.join(target, "data.bin"), "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
    else:
        st = os.lstat(target)
        assert os.path.isfile(target) is False and (st.st_mode & 0o170000) == 0o060000
        write_block(target, 1 * MIB, payload)
        assert read_block(target, 1 * MIB, len(payload)) == payload
    stats = a.node.NodeGetVolumeStats(
        pb.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=target), timeout=30
    )
    assert not stats.volume_condition.abnormal, stats.volume_condition.message
    total = stats.usage[0].total
    assert 0 < total <= size
    if fs_type:
        assert [u.unit for u in stats.usage] == [pb.VolumeUsage.BYTES, pb.VolumeUsage.INODES]
    else:
        assert total == size

    unpublish(a, vid, target)
    unpublish(a, vid, target)  # idempotent
    assert not os.path.lexists(target)
    unstage(a, vid)
    unstage(a, vid)  # idempotent
    assert not leftovers(a.root)
    controller_unpublish(stack, vid, a)

    # A second node stages the same volume: the file system is checked, not reformatted.
    ctx = controller_publish(stack, vid, b, cap)
    stage(b, volume, cap, ctx)
    target = publish(b, vid, cap)
    if fs_type:
        with open(os.path.join(target, "data.bin"), "rb") as f:
            assert f.read() == payload
    else:
        assert read_block(target, 1 * MIB, len(payload)) == payload
    unpublish(b, vid, target)
    unstage(b, vid)
    controller_unpublish(stack, vid, b)
    assert not leftovers(b.root)
    stack.csi.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid), timeout=60)


def test_info_and_capabilities(nodes: list[NodePlugin]) -> None:
    a = nodes[0]
    info = a.node.NodeGetInfo(pb.NodeGetInfoRequest(), timeout=10)
    assert info.node_id == "node-a"
    assert dict(info.accessible_topology.segments) == {
        "topology.block.blockyard.io/pool": "default"
    }
    assert info.max_volumes_per_node > 0
    caps = a.node.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest(), timeout=10)
    RPC = pb.NodeServiceCapability.RPC
    assert {c.rpc.type for c in caps.capabilities} == {
        RPC.STAGE_UNSTAGE_VOLUME, RPC.GET_VOLUME_STATS, RPC.EXPAND_VOLUME,
        RPC.VOLUME_CONDITION, RPC.SINGLE_NODE_MULTI_WRITER,
    }  # fmt: skip


def _missing_cases(a: NodePlugin) -> list[tuple[str, object, str]]:
    cap = fs_cap("ext4")
    ctx = {"iqn": "iqn.2026-11.io.blockyard:x", "portals": "127.0.0.1:1"}
    st, tg = a.staging("x"), a.target("x")
    return [
        ("NodeStageVolume", pb.NodeStageVolumeRequest(staging_target_path=st,
         volume_capability=cap, publish_context=ctx), "volume_id"),
        ("NodeStageVolume", pb.NodeStageVolumeRequest(volume_id="x", volume_capability=cap,
         publish_context=ctx), "staging_target_path"),
        ("NodeStageVolume", pb.NodeStageVolumeRequest(volume_id="x", staging_target_path=st,
         publish_context=ctx), "volume_capability"),
        ("NodeStageVolume", pb.NodeStageVolumeRequest(volume_id="x", staging_target_path=st,
         volume_capability=cap), "publish_context.iqn"),
        ("NodeStageVolume", pb.NodeStageVolumeRequest(volume_id="x", staging_target_path=st,
         volume_capability=cap, publish_context={"iqn": ctx["iqn"]}), "portals"),
        ("NodeStageVolume", pb.NodeStageVolumeRequest(volume_id="x", staging_target_path=st,
         volume_capability=cap, publish_context={**ctx, "iqn": "iqn.2020-01.com.other:disk"}),
         "managed prefix"),
        ("NodeUnstageVolume", pb.NodeUnstageVolumeRequest(staging_target_path=st), "volume_id"),
        ("NodeUnstageVolume", pb.NodeUnstageVolumeRequest(volume_id="x"), "staging_target_path"),
        ("NodePublishVolume", pb.NodePublishVolumeRequest(staging_target_path=st,
         target_path=tg, volume_capability=cap), "volume_id"),
        ("NodePublishVolume", pb.NodePublishVolumeRequest(volume_id="x", staging_target_path=st,
         volume_capability=cap), "target_path"),
        ("NodePublishVolume", pb.NodePublishVolumeRequest(volume_id="x", target_path=tg,
         volume_capability=cap), "staging_target_path"),
        ("NodePublishVolume", pb.NodePublishVolumeRequest(volume_id="x", staging_target_path=st,
         target_path=tg), "volume_capability"),
        ("NodeUnpublishVolume", pb.NodeUnpublishVolumeRequest(target_path=tg), "volume_id"),
        ("NodeUnpublishVolume", pb.NodeUnpublishVolumeRequest(volume_id="x"), "target_path"),
        ("NodeGetVolumeStats", pb.NodeGetVolumeStatsRequest(volume_path=tg), "volume_id"),
        ("NodeGetVolumeStats", pb.NodeGetVolumeStatsRequest(volume_id="x"), "volume_path"),
        ("NodeExpandVolume", pb.NodeExpandVolumeRequest(volume_path=tg), "volume_id"),
        ("NodeExpandVolume", pb.NodeExpandVolumeRequest(volume_id="x"), "volume_path"),
    ]  # fmt: skip


def test_missing_fields_are_invalid_argument(nodes: list[NodePlugin]) -> None:
    a = nodes[0]
    for method, request, field in _missing_cases(a):
        code, details = rpc_code(getattr(a.node, method), request)
        assert code == Code.INVALID_ARGUMENT, (method, field, code, details)
        assert field in details, (method, details)


def test_unknown_and_wrong_kind(stack: Stack, nodes: list[NodePlugin]) -> None:
    a = nodes[0]
    # Unstage/unpublish of what this node never staged: OK (idempotent).
    code, details = rpc_code(a.node.NodeUnstageVolume, pb.NodeUnstageVolumeRequest(
        volume_id="never-staged", staging_target_path=a.staging("never-staged")))  # fmt: skip
    assert code == Code.OK, details
    code, details = rpc_code(a.node.NodeUnpublishVolume, pb.NodeUnpublishVolumeRequest(
        volume_id="never-staged", target_path=a.target("never-staged")))  # fmt: skip
    assert code == Code.OK, details
    # Publish before stage: FAILED_PRECONDITION.
    code, details = rpc_code(a.node.NodePublishVolume, pb.NodePublishVolumeRequest(
        volume_id="never-staged", staging_target_path=a.staging("never-staged"),
        target_path=a.target("never-staged"), volume_capability=fs_cap("ext4")))  # fmt: skip
    assert code == Code.FAILED_PRECONDITION and "not staged" in details
    # Stats and expand of unknown volumes: NOT_FOUND.
    code, _ = rpc_code(a.node.NodeGetVolumeStats, pb.NodeGetVolumeStatsRequest(
        volume_id="never-staged", volume_path=a.target("never-staged")))  # fmt: skip
    assert code == Code.NOT_FOUND
    code, _ = rpc_code(a.node.NodeExpandVolume, pb.NodeExpandVolumeRequest(
        volume_id="never-staged", volume_path=a.target("never-staged")))  # fmt: skip
    assert code == Code.NOT_FOUND

    # A block target that exists as a directory is refused, never replaced.
    cap = fs_cap("")
    volume = create_volume(stack, "kind-block", cap)
    vid = volume.volume_id
    ctx = controller_publish(stack, vid, a, cap)
    stage(a, volume, cap, ctx)
    try:
        target = a.block_target(vid)
        Path(target).mkdir(parents=True)
        code, details = rpc_code(a.node.NodePublishVolume, pb.NodePublishVolumeRequest(
            volume_id=vid, staging_target_path=a.staging(vid), target_path=target,
            volume_capability=cap))  # fmt: skip
        assert code == Code.INVALID_ARGUMENT and "directory" in details, details
        assert os.path.isdir(target)
        os.rmdir(target)
        # Staging as a file system what is staged as block: ALREADY_EXISTS.
        code, details = rpc_code(a.node.NodeStageVolume, pb.NodeStageVolumeRequest(
            volume_id=vid, staging_target_path=a.staging(vid), volume_capability=fs_cap("ext4"),
            publish_context=ctx))  # fmt: skip
        assert code == Code.ALREADY_EXISTS, details
        # A staging path that is a file is refused.
        file_path = a.root / "not-a-dir"
        file_path.write_text("x")
        code, details = rpc_code(a.node.NodeStageVolume, pb.NodeStageVolumeRequest(
            volume_id="other", staging_target_path=str(file_path), volume_capability=cap,
            publish_context=ctx))  # fmt: skip
        assert code == Code.INVALID_ARGUMENT and "not a directory" in details, details
    finally:
        unstage(a, vid)
        controller_unpublish(stack, vid, a)
    assert not leftovers(a.root)
    stack.csi.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid), timeout=60)
