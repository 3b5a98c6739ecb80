"""CSI conformance of the Identity and Controller services: a real `blockyard csi` on its unix
socket in front of a real `blockyard serve`, positive and negative cases for every RPC, with
qemu-io over iSCSI checking that clones hold the data their source held."""

from __future__ import annotations

import re
import subprocess

import grpc
import pytest
from csi_helpers import MIB, Mode, Stack, block_cap, mount_cap, rpc_code
from serve_helpers import need_tools, run_tool

import blockyard
from blockyard.csi.proto import csi_pb2 as pb

Code = grpc.StatusCode
RPC = pb.ControllerServiceCapability.RPC
SNW = Mode.SINGLE_NODE_WRITER
RWX = Mode.MULTI_NODE_MULTI_WRITER
ROX = Mode.MULTI_NODE_READER_ONLY


def create(stack: Stack, name: str, size: int = 2 * MIB, **kw: object) -> pb.Volume:
    caps = kw.pop("caps", [block_cap()])
    request = pb.CreateVolumeRequest(
        name=name,
        capacity_range=pb.CapacityRange(required_bytes=size),
        volume_capabilities=caps,  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )
    volume: pb.Volume = stack.csi.controller.CreateVolume(request, timeout=60).volume
    return volume


def publish(
    stack: Stack, volume: str, node: str, cap: pb.VolumeCapability | None = None, ro: bool = False
) -> pb.ControllerPublishVolumeRequest:
    return pb.ControllerPublishVolumeRequest(
        volume_id=volume, node_id=node, volume_capability=cap or block_cap(), readonly=ro
    )


# ---- Identity ------------------------------------------------------------------------------


def test_identity(stack: Stack) -> None:
    info = stack.csi.identity.GetPluginInfo(pb.GetPluginInfoRequest(), timeout=10)
    assert (info.name, info.vendor_version) == ("block.blockyard.io", blockyard.__version__)
    caps = stack.csi.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest(), timeout=10)
    services = {c.service.type for c in caps.capabilities if c.HasField("service")}
    assert services == {
        pb.PluginCapability.Service.CONTROLLER_SERVICE,
        pb.PluginCapability.Service.VOLUME_ACCESSIBILITY_CONSTRAINTS,
    }
    expansion = [
        c.volume_expansion.type for c in caps.capabilities if c.HasField("volume_expansion")
    ]
    assert expansion == [pb.PluginCapability.VolumeExpansion.ONLINE]
    probe = stack.csi.identity.Probe(pb.ProbeRequest(), timeout=10)
    assert probe.HasField("ready") and probe.ready.value


def test_controller_capabilities(stack: Stack) -> None:
    answer = stack.csi.controller.ControllerGetCapabilities(
        pb.ControllerGetCapabilitiesRequest(), timeout=10
    )
    got = {c.rpc.type for c in answer.capabilities}
    assert {
        RPC.CREATE_DELETE_VOLUME, RPC.PUBLISH_UNPUBLISH_VOLUME, RPC.LIST_VOLUMES,
        RPC.GET_CAPACITY, RPC.CREATE_DELETE_SNAPSHOT, RPC.LIST_SNAPSHOTS, RPC.CLONE_VOLUME,
        RPC.EXPAND_VOLUME, RPC.LIST_VOLUMES_PUBLISHED_NODES, RPC.GET_VOLUME,
        RPC.VOLUME_CONDITION, RPC.PUBLISH_READONLY,
    } <= got  # fmt: skip
    assert RPC.MODIFY_VOLUME not in got
    code, _ = rpc_code(
        stack.csi.controller.ControllerModifyVolume,
        pb.ControllerModifyVolumeRequest(volume_id="x"),
    )
    assert code == Code.UNIMPLEMENTED


# ---- Missing fields, unknown ids -------------------------------------------------------------

MISSING = [
    ("CreateVolume", pb.CreateVolumeRequest(volume_capabilities=[block_cap()]), "name"),
    ("CreateVolume", pb.CreateVolumeRequest(name="m1"), "volume_capabilities"),
    (
        "CreateVolume",
        pb.CreateVolumeRequest(name="m1", volume_capabilities=[pb.VolumeCapability(block={})]),
        "access_mode",
    ),
    (
        "CreateVolume",
        pb.CreateVolumeRequest(
            name="m1",
            volume_capabilities=[block_cap()],
            volume_content_source=pb.VolumeContentSource(snapshot={}),
        ),
        "snapshot_id",
    ),
    ("DeleteVolume", pb.DeleteVolumeRequest(), "volume_id"),
    ("ControllerPublishVolume", pb.ControllerPublishVolumeRequest(node_id="n"), "volume_id"),
    ("ControllerPublishVolume", pb.ControllerPublishVolumeRequest(volume_id="v"), "node_id"),
    (
        "ControllerPublishVolume",
        pb.ControllerPublishVolumeRequest(volume_id="v", node_id="n"),
        "volume_capability",
    ),
    ("ControllerUnpublishVolume", pb.ControllerUnpublishVolumeRequest(), "volume_id"),
    (
        "ValidateVolumeCapabilities",
        pb.ValidateVolumeCapabilitiesRequest(volume_capabilities=[block_cap()]),
        "volume_id",
    ),
    (
        "ValidateVolumeCapabilities",
        pb.ValidateVolumeCapabilitiesRequest(volume_id="v"),
        "volume_capabilities",
    ),
    ("ControllerGetVolume", pb.ControllerGetVolumeRequest(), "volume_id"),
    ("ControllerExpandVolume", pb.ControllerExpandVolumeRequest(volume_id="v"), "capacity_range"),
    (
        "ControllerExpandVolume",
        pb.ControllerExpandVolumeRequest(capacity_range=pb.CapacityRange(required_bytes=MIB)),
        "volume_id",
    ),
    ("CreateSnapshot", pb.CreateSnapshotRequest(name="s"), "source_volume_id"),
    ("CreateSnapshot", pb.CreateSnapshotRequest(source_volume_id="v"), "name"),
    ("DeleteSnapshot", pb.DeleteSnapshotRequest(), "snapshot_id"),
    ("GetSnapshot", pb.GetSnapshotRequest(), "snapshot_id"),
    ("ListVolumes", pb.ListVolumesRequest(max_entries=-1), "max_entries"),
    ("ListSnapshots", pb.ListSnapshotsRequest(max_entries=-1), "max_entries"),
]


@pytest.mark.parametrize(("method", "request_", "field"), MISSING)
def test_missing_fields_are_invalid_argument(
    stack: Stack, method: str, request_: object, field: str
) -> None:
    code, details = rpc_code(getattr(stack.csi.controller, method), request_)
    assert code == Code.INVALID_ARGUMENT, details
    assert field in details


UNKNOWN = [
    ("ControllerPublishVolume", publish(None, "nope", "n")),  # type: ignore[arg-type]
    ("ControllerPublishVolume", publish(None, "bad/id", "n")),  # type: ignore[arg-type]
    (
        "ValidateVolumeCapabilities",
        pb.ValidateVolumeCapabilitiesRequest(volume_id="nope", volume_capabilities=[block_cap()]),
    ),
    ("ControllerGetVolume", pb.ControllerGetVolumeRequest(volume_id="nope")),
    (
        "ControllerExpandVolume",
        pb.ControllerExpandVolumeRequest(
            volume_id="nope", capacity_range=pb.CapacityRange(required_bytes=MIB)
        ),
    ),
    ("CreateSnapshot", pb.CreateSnapshotRequest(source_volume_id="nope", name="s-nope")),
    ("GetSnapshot", pb.GetSnapshotRequest(snapshot_id="nope@s")),
    (
        "CreateVolume",
        pb.CreateVolumeRequest(
            name="from-nothing",
            volume_capabilities=[block_cap()],
            volume_content_source=pb.VolumeContentSource(snapshot={"snapshot_id": "nope@s"}),
        ),
    ),
    (
        "CreateVolume",
        pb.CreateVolumeRequest(
            name="from-nothing",
            volume_capabilities=[block_cap()],
            volume_content_source=pb.VolumeContentSource(volume={"volume_id": "nope"}),
        ),
    ),
]


@pytest.mark.parametrize(("method", "request_"), UNKNOWN)
def test_unknown_ids_are_not_found(stack: Stack, method: str, request_: object) -> None:
    code, details = rpc_code(getattr(stack.csi.controller, method), request_)
    assert code == Code.NOT_FOUND, details
    assert "does not exist" in details


def test_deletes_of_unknown_objects_succeed(stack: Stack) -> None:
    ctl = stack.csi.controller
    for request in [pb.DeleteVolumeRequest(volume_id=v) for v in ("nope", "bad/id")]:
        assert rpc_code(ctl.DeleteVolume, request)[0] == Code.OK
    for sid in ("nope@s", "garbage"):
        assert rpc_code(ctl.DeleteSnapshot, pb.DeleteSnapshotRequest(snapshot_id=sid))[0] == Code.OK
    unpublish = pb.ControllerUnpublishVolumeRequest(volume_id="nope", node_id="n")
    assert rpc_code(ctl.ControllerUnpublishVolume, unpublish)[0] == Code.OK


# ---- CreateVolume / DeleteVolume -------------------------------------------------------------


def test_create_is_idempotent_and_rounds(stack: Stack) -> None:
    first = create(stack, "cv-idem", 5 * MIB + 1, caps=[mount_cap(fs_type="xfs")])
    assert first.capacity_bytes == 5 * MIB + 4096
    assert first.volume_id == "cv-idem" and dict(first.volume_context) == {"fsType": "xfs"}
    assert [dict(t.segments) for t in first.accessible_topology] == [
        {"topology.block.blockyard.io/pool": "default"}
    ]
    again = create(stack, "cv-idem", 5 * MIB + 1, caps=[mount_cap(fs_type="xfs")])
    assert again == first
    tiny = create(stack, "cv-tiny", 1)
    assert tiny.capacity_bytes == MIB


def test_create_conflicts(stack: Stack) -> None:
    create(stack, "cv-conflict", 2 * MIB)
    ctl = stack.csi.controller
    bigger = pb.CreateVolumeRequest(
        name="cv-conflict",
        capacity_range=pb.CapacityRange(required_bytes=4 * MIB),
        volume_capabilities=[block_cap()],
    )
    code, details = rpc_code(ctl.CreateVolume, bigger)
    assert code == Code.ALREADY_EXISTS and "ControllerExpandVolume" in details
    as_fs = pb.CreateVolumeRequest(
        name="cv-conflict",
        capacity_range=pb.CapacityRange(required_bytes=2 * MIB),
        volume_capabilities=[mount_cap()],
    )
    assert rpc_code(ctl.CreateVolume, as_fs)[0] == Code.ALREADY_EXISTS


@pytest.mark.parametrize(
    ("required", "limit"), [(0, 4096), (5 * MIB + 1, 5 * MIB + 2), (8 * MIB, 4 * MIB)]
)
def test_create_out_of_range(stack: Stack, required: int, limit: int) -> None:
    request = pb.CreateVolumeRequest(
        name="cv-range",
        capacity_range=pb.CapacityRange(required_bytes=required, limit_bytes=limit),
        volume_capabilities=[block_cap()],
    )
    code, details = rpc_code(stack.csi.controller.CreateVolume, request)
    assert code == Code.OUT_OF_RANGE, details


def test_create_refuses_rwx_filesystem_and_bad_parameters(stack: Stack) -> None:
    ctl = stack.csi.controller
    rwx_fs = pb.CreateVolumeRequest(name="cv-rwx", volume_capabilities=[mount_cap(RWX)])
    code, details = rpc_code(ctl.CreateVolume, rwx_fs)
    assert code == Code.INVALID_ARGUMENT
    assert "cluster file system" in details and "Block" in details
    for params in ({"fsType": "btrfs"}, {"replicas": "3"}, {"durability": "sync"}, {"x": "y"}):
        request = pb.CreateVolumeRequest(
            name="cv-params", volume_capabilities=[mount_cap()], parameters=params
        )
        code, details = rpc_code(ctl.CreateVolume, request)
        assert code == Code.INVALID_ARGUMENT, details
    ok = create(
        stack,
        "cv-params",
        caps=[block_cap(RWX)],
        parameters={"replicas": "1", "durability": "local"},
    )
    assert ok.volume_id == "cv-params" and not ok.volume_context


def test_create_topology(stack: Stack) -> None:
    ours = pb.Topology(segments={"topology.block.blockyard.io/pool": "default"})
    other = pb.Topology(segments={"topology.block.blockyard.io/pool": "elsewhere"})
    request = pb.CreateVolumeRequest(
        name="cv-topo",
        capacity_range=pb.CapacityRange(required_bytes=MIB),
        volume_capabilities=[block_cap()],
        accessibility_requirements=pb.TopologyRequirement(requisite=[other]),
    )
    code, details = rpc_code(stack.csi.controller.CreateVolume, request)
    assert code == Code.RESOURCE_EXHAUSTED and "requisite" in details
    request.accessibility_requirements.requisite.append(ours)
    assert rpc_code(stack.csi.controller.CreateVolume, request)[0] == Code.OK


def test_delete_is_idempotent_and_refuses_volumes_in_use(stack: Stack) -> None:
    ctl = stack.csi.controller
    create(stack, "dv-1")
    ctl.ControllerPublishVolume(publish(stack, "dv-1", "node-a"), timeout=30)
    code, details = rpc_code(ctl.DeleteVolume, pb.DeleteVolumeRequest(volume_id="dv-1"))
    assert code == Code.FAILED_PRECONDITION and "node-a" in details
    snap = ctl.CreateSnapshot(pb.CreateSnapshotRequest(source_volume_id="dv-1", name="dv-s"))
    ctl.ControllerUnpublishVolume(
        pb.ControllerUnpublishVolumeRequest(volume_id="dv-1", node_id="node-a"), timeout=30
    )
    code, details = rpc_code(ctl.DeleteVolume, pb.DeleteVolumeRequest(volume_id="dv-1"))
    assert code == Code.FAILED_PRECONDITION and "dv-1@dv-s" in details, "snapshots first"
    ctl.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot.snapshot_id))
    for _ in range(2):
        assert rpc_code(ctl.DeleteVolume, pb.DeleteVolumeRequest(volume_id="dv-1"))[0] == Code.OK
    assert (
        rpc_code(ctl.ControllerGetVolume, pb.ControllerGetVolumeRequest(volume_id="dv-1"))[0]
        == Code.NOT_FOUND
    )
    names = stack.serve.call(lambda c: c.list_all_volumes())
    assert "dv-1" not in [v.name for v in names]


# ---- Publish / Unpublish ---------------------------------------------------------------------


def test_publish_context_and_idempotency(stack: Stack) -> None:
    ctl = stack.csi.controller
    create(stack, "pv-1")
    request = publish(stack, "pv-1", "node-a")
    first = dict(ctl.ControllerPublishVolume(request, timeout=30).publish_context)
    assert first["portals"].split(",") == stack.serve.iscsi
    assert first["portal"] == stack.serve.iscsi[0]
    served = stack.serve.call(lambda c: c.get_volume("pv-1"))
    assert first["iqn"] == served.export.iqn and first["lun"] == "0"
    assert first["iqn"].startswith("iqn.2026-11.io.blockyard:pv-1.")
    assert re.fullmatch(r"[0-9a-f]{32}", first["naaId"])
    assert dict(ctl.ControllerPublishVolume(request, timeout=30).publish_context) == first
    readonly = publish(stack, "pv-1", "node-a", ro=True)
    code, details = rpc_code(ctl.ControllerPublishVolume, readonly)
    assert code == Code.ALREADY_EXISTS and "unpublish" in details
    code, details = rpc_code(ctl.ControllerPublishVolume, publish(stack, "pv-1", "node-b"))
    assert code == Code.FAILED_PRECONDITION and "node-a" in details
    unpublish = pb.ControllerUnpublishVolumeRequest(volume_id="pv-1", node_id="node-a")
    for _ in range(2):
        assert rpc_code(ctl.ControllerUnpublishVolume, unpublish)[0] == Code.OK
    assert rpc_code(ctl.ControllerPublishVolume, publish(stack, "pv-1", "node-b"))[0] == Code.OK


def test_rwx_block_allows_two_nodes_for_live_migration(stack: Stack) -> None:
    ctl = stack.csi.controller
    create(stack, "pv-rwx", caps=[block_cap(RWX)])
    for node in ("src", "dst"):
        ctl.ControllerPublishVolume(publish(stack, "pv-rwx", node, block_cap(RWX)), timeout=30)
    code, details = rpc_code(
        ctl.ControllerPublishVolume, publish(stack, "pv-rwx", "third", block_cap(RWX))
    )
    assert code == Code.FAILED_PRECONDITION and "live migration" in details
    code, _ = rpc_code(ctl.ControllerPublishVolume, publish(stack, "pv-rwx", "third", block_cap()))
    assert code == Code.FAILED_PRECONDITION, "single-node mode while published elsewhere"
    got = ctl.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id="pv-rwx"), timeout=30)
    assert sorted(got.status.published_node_ids) == ["dst", "src"]
    everywhere = pb.ControllerUnpublishVolumeRequest(volume_id="pv-rwx")  # no node: all nodes
    ctl.ControllerUnpublishVolume(everywhere, timeout=30)
    got = ctl.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id="pv-rwx"), timeout=30)
    assert list(got.status.published_node_ids) == []
    create(stack, "pv-rox", caps=[mount_cap(ROX)])
    for i in range(4):
        request = publish(stack, "pv-rox", f"reader-{i}", mount_cap(ROX), ro=True)
        assert rpc_code(ctl.ControllerPublishVolume, request)[0] == Code.OK


def test_controller_restart_keeps_publish_state(stack: Stack) -> None:
    create(stack, "pv-restart")
    stack.csi.controller.ControllerPublishVolume(publish(stack, "pv-restart", "node-a"), timeout=30)
    csi = stack.restart_csi()
    code, details = rpc_code(
        csi.controller.ControllerPublishVolume, publish(stack, "pv-restart", "node-b")
    )
    assert code == Code.FAILED_PRECONDITION and "node-a" in details
    got = csi.controller.ControllerGetVolume(
        pb.ControllerGetVolumeRequest(volume_id="pv-restart"), timeout=30
    )
    assert list(got.status.published_node_ids) == ["node-a"]
    delete = pb.DeleteVolumeRequest(volume_id="pv-restart")
    assert rpc_code(csi.controller.DeleteVolume, delete)[0] == Code.FAILED_PRECONDITION


# ---- Validate / List / Get / Capacity --------------------------------------------------------


def test_validate_volume_capabilities(stack: Stack) -> None:
    create(stack, "vv-1", caps=[mount_cap(fs_type="ext4")])
    ctl = stack.csi.controller
    good = pb.ValidateVolumeCapabilitiesRequest(
        volume_id="vv-1", volume_capabilities=[mount_cap()], volume_context={"fsType": "ext4"}
    )
    answer = ctl.ValidateVolumeCapabilities(good, timeout=30)
    assert list(answer.confirmed.volume_capabilities) == [mount_cap()]
    assert dict(answer.confirmed.volume_context) == {"fsType": "ext4"}
    for caps in ([mount_cap(RWX)], [mount_cap(fs_type="xfs")]):
        bad = pb.ValidateVolumeCapabilitiesRequest(volume_id="vv-1", volume_capabilities=caps)
        answer = ctl.ValidateVolumeCapabilities(bad, timeout=30)
        assert not answer.HasField("confirmed") and answer.message


def test_list_volumes_pagination_and_published_nodes(stack: Stack) -> None:
    ctl = stack.csi.controller
    for i in range(5):
        create(stack, f"lv-{i}")
    ctl.ControllerPublishVolume(publish(stack, "lv-3", "node-l"), timeout=30)
    everything = ctl.ListVolumes(pb.ListVolumesRequest(), timeout=30)
    assert not everything.next_token
    ids_all = [e.volume.volume_id for e in everything.entries]
    assert {f"lv-{i}" for i in range(5)} <= set(ids_all)
    paged: list[str] = []
    token = ""
    for _ in range(len(ids_all) + 1):
        page = ctl.ListVolumes(pb.ListVolumesRequest(max_entries=2, starting_token=token))
        assert len(page.entries) <= 2
        paged += [e.volume.volume_id for e in page.entries]
        token = page.next_token
        if not token:
            break
    assert paged == ids_all
    by_id = {e.volume.volume_id: e for e in everything.entries}
    assert list(by_id["lv-3"].status.published_node_ids) == ["node-l"]
    assert not by_id["lv-3"].status.volume_condition.abnormal
    code, details = rpc_code(ctl.ListVolumes, pb.ListVolumesRequest(starting_token="bogus"))
    assert code == Code.ABORTED and "starting_token" in details


def test_controller_get_volume_and_capacity(stack: Stack) -> None:
    create(stack, "gv-1", 3 * MIB)
    ctl = stack.csi.controller
    got = ctl.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id="gv-1"), timeout=30)
    assert got.volume.capacity_bytes == 3 * MIB
    assert "served on 2 portal(s)" in got.status.volume_condition.message
    capacity = ctl.GetCapacity(pb.GetCapacityRequest(volume_capabilities=[mount_cap()]))
    assert capacity.available_capacity > 0
    assert capacity.minimum_volume_size.value == MIB
    assert 0 < capacity.maximum_volume_size.value <= capacity.available_capacity
    for request in (
        pb.GetCapacityRequest(volume_capabilities=[mount_cap(RWX)]),
        pb.GetCapacityRequest(accessible_topology=pb.Topology(segments={"k": "v"})),
    ):
        assert ctl.GetCapacity(request, timeout=30).available_capacity == 0


# ---- Expand ------------------------------------------------------------------------------------


def test_expand(stack: Stack) -> None:
    ctl = stack.csi.controller
    create(stack, "ev-fs", caps=[mount_cap()])
    create(stack, "ev-blk")
    grow = pb.ControllerExpandVolumeRequest(
        volume_id="ev-fs",
        capacity_range=pb.CapacityRange(required_bytes=6 * MIB + 1),
        volume_capability=mount_cap(),
    )
    for _ in range(2):
        answer = ctl.ControllerExpandVolume(grow, timeout=60)
        assert answer.capacity_bytes == 6 * MIB + 4096 and answer.node_expansion_required
    block = pb.ControllerExpandVolumeRequest(
        volume_id="ev-blk",
        capacity_range=pb.CapacityRange(required_bytes=4 * MIB),
        volume_capability=block_cap(),
    )
    answer = ctl.ControllerExpandVolume(block, timeout=60)
    assert answer.capacity_bytes == 4 * MIB and not answer.node_expansion_required
    served = stack.serve.call(lambda c: c.get_volume("ev-blk"))
    assert served.size_bytes == 4 * MIB
    too_small = pb.ControllerExpandVolumeRequest(
        volume_id="ev-blk", capacity_range=pb.CapacityRange(required_bytes=MIB, limit_bytes=MIB)
    )
    assert rpc_code(ctl.ControllerExpandVolume, too_small)[0] == Code.OUT_OF_RANGE


# ---- Snapshots ---------------------------------------------------------------------------------


def test_snapshots(stack: Stack) -> None:
    ctl = stack.csi.controller
    create(stack, "sv-a")
    create(stack, "sv-b")
    request = pb.CreateSnapshotRequest(source_volume_id="sv-a", name="sn-1")
    first = ctl.CreateSnapshot(request, timeout=60).snapshot
    assert first.snapshot_id == "sv-a@sn-1" and first.source_volume_id == "sv-a"
    assert first.ready_to_use and first.size_bytes == 2 * MIB and first.creation_time.seconds
    assert ctl.CreateSnapshot(request, timeout=60).snapshot == first
    taken = pb.CreateSnapshotRequest(source_volume_id="sv-b", name="sn-1")
    code, details = rpc_code(ctl.CreateSnapshot, taken)
    assert code == Code.ALREADY_EXISTS and "sv-a" in details
    for name in ("sn-2", "sn-3"):
        ctl.CreateSnapshot(pb.CreateSnapshotRequest(source_volume_id="sv-a", name=name))
    ctl.CreateSnapshot(pb.CreateSnapshotRequest(source_volume_id="sv-b", name="sn-4"))

    def listed(**kw: object) -> list[str]:
        answer = ctl.ListSnapshots(pb.ListSnapshotsRequest(**kw), timeout=30)  # type: ignore[arg-type]
        return [e.snapshot.snapshot_id for e in answer.entries]

    assert listed(source_volume_id="sv-a") == ["sv-a@sn-1", "sv-a@sn-2", "sv-a@sn-3"]
    assert listed(snapshot_id="sv-b@sn-4") == ["sv-b@sn-4"]
    assert listed(snapshot_id="sv-b@nope") == listed(source_volume_id="nope") == []
    assert listed(snapshot_id="sv-b@sn-4", source_volume_id="sv-a") == []
    everything = listed()
    assert {"sv-a@sn-1", "sv-b@sn-4"} <= set(everything)
    paged: list[str] = []
    token = ""
    for _ in range(len(everything) + 1):
        page = ctl.ListSnapshots(pb.ListSnapshotsRequest(max_entries=1, starting_token=token))
        assert len(page.entries) <= 1
        paged += [e.snapshot.snapshot_id for e in page.entries]
        token = page.next_token
        if not token:
            break
    assert paged == everything
    code, _ = rpc_code(ctl.ListSnapshots, pb.ListSnapshotsRequest(starting_token="bogus"))
    assert code == Code.ABORTED
    got = ctl.GetSnapshot(pb.GetSnapshotRequest(snapshot_id="sv-a@sn-2"), timeout=30)
    assert got.snapshot.snapshot_id == "sv-a@sn-2"
    delete = pb.DeleteSnapshotRequest(snapshot_id="sv-a@sn-2")
    for _ in range(2):
        assert rpc_code(ctl.DeleteSnapshot, delete)[0] == Code.OK
    assert listed(source_volume_id="sv-a") == ["sv-a@sn-1", "sv-a@sn-3"]


# ---- Clones, with data checked over iSCSI ------------------------------------------------------


def _published_io(stack: Stack, volume: str, *commands: str) -> subprocess.CompletedProcess[str]:
    """qemu-io on the volume as the node it is published to: the target admits only the
    initiator name the controller put in its ACL (publish_context.initiatorName)."""
    request = publish(stack, volume, "data-node")
    context = dict(
        stack.csi.controller.ControllerPublishVolume(request, timeout=30).publish_context
    )
    opts = (
        f"driver=iscsi,transport=tcp,portal={context['portal']},target={context['iqn']},"
        f"lun={context['lun']},initiator-name={context['initiatorName']}"
    )
    args = ["qemu-io", "--image-opts"]
    for command in commands:
        args += ["-c", command]
    return run_tool(*args, opts)


def test_clones_hold_their_source_data(stack: Stack) -> None:
    need_tools("qemu-io")
    ctl = stack.csi.controller
    create(stack, "cl-src", 4 * MIB)
    wrote = _published_io(stack, "cl-src", "write -P 0xab 0 64k")
    assert wrote.returncode == 0, wrote.stderr
    snap = ctl.CreateSnapshot(pb.CreateSnapshotRequest(source_volume_id="cl-src", name="cl-snap"))
    wrote = _published_io(stack, "cl-src", "write -P 0xcd 0 64k")  # after the snapshot
    assert wrote.returncode == 0, wrote.stderr

    from_snap = create(
        stack,
        "cl-from-snap",
        8 * MIB,
        volume_content_source=pb.VolumeContentSource(
            snapshot={"snapshot_id": snap.snapshot.snapshot_id}
        ),
    )
    assert from_snap.capacity_bytes == 8 * MIB, "a larger clone grows"
    assert from_snap.content_source.snapshot.snapshot_id == "cl-src@cl-snap"
    from_volume = create(
        stack,
        "cl-from-vol",
        0,
        volume_content_source=pb.VolumeContentSource(volume={"volume_id": "cl-src"}),
    )
    assert from_volume.capacity_bytes == 4 * MIB and from_volume.content_source.volume.volume_id
    for name, pattern in (("cl-from-snap", "0xab"), ("cl-from-vol", "0xcd")):
        read = _published_io(stack, name, f"read -P {pattern} 0 64k")
        assert read.returncode == 0 and "Pattern verification failed" not in read.stdout, (
            name,
            read.stdout,
            read.stderr,
        )
    snapshots = stack.serve.call(lambda c: c.list_snapshots("cl-src"))
    assert [s.name for s in snapshots] == ["cl-snap"], "the clone's temporary snapshot is gone"
    again = create(
        stack,
        "cl-from-vol",
        0,
        volume_content_source=pb.VolumeContentSource(volume={"volume_id": "cl-src"}),
    )
    assert again == from_volume
    other_source = pb.CreateVolumeRequest(
        name="cl-from-vol",
        volume_capabilities=[block_cap()],
        volume_content_source=pb.VolumeContentSource(snapshot={"snapshot_id": "cl-src@cl-snap"}),
    )
    assert rpc_code(ctl.CreateVolume, other_source)[0] == Code.ALREADY_EXISTS
    too_small = pb.CreateVolumeRequest(
        name="cl-small",
        capacity_range=pb.CapacityRange(limit_bytes=2 * MIB),
        volume_capabilities=[block_cap()],
        volume_content_source=pb.VolumeContentSource(volume={"volume_id": "cl-src"}),
    )
    assert rpc_code(ctl.CreateVolume, too_small)[0] == Code.OUT_OF_RANGE


# ---- Concurrency -------------------------------------------------------------------------------


def test_concurrent_operations_on_one_volume_abort_the_second(stack: Stack) -> None:
    """Two CreateVolume calls for one name at once: one creates, the other is ABORTED at once
    (ember-csi style) rather than queued. A 64 MiB volume keeps the first busy long enough; if
    the two still did not overlap, try again with another name (bounded)."""
    ctl = stack.csi.controller
    for attempt in range(5):
        request = pb.CreateVolumeRequest(
            name=f"cc-{attempt}",
            capacity_range=pb.CapacityRange(required_bytes=64 * MIB),
            volume_capabilities=[block_cap()],
        )
        futures = [ctl.CreateVolume.future(request, timeout=60) for _ in range(2)]
        outcomes: list[tuple[grpc.StatusCode, str]] = []
        for future in futures:
            try:
                future.result()
                outcomes.append((Code.OK, ""))
            except grpc.RpcError as exc:
                outcomes.append((exc.code(), exc.details()))  # type: ignore[attr-defined]
        codes = sorted(code.value[0] for code, _ in outcomes)
        assert rpc_code(ctl.CreateVolume, request)[0] == Code.OK, "a retry afterwards succeeds"
        if codes == [0, 0]:
            continue  # the second arrived after the first had finished
        assert codes == [0, Code.ABORTED.value[0]], outcomes
        assert any("in progress" in details for _, details in outcomes)
        return
    pytest.fail("five pairs of concurrent CreateVolume calls never overlapped")
