"""The generated CSI code speaks the CSI v1.12 wire format: messages built from hand-encoded
bytes (tag = field number << 3 | wire type) for field numbers checked against the published
spec. A wrong field number or enum value in csi.proto fails here."""

from __future__ import annotations

import pytest
from google.protobuf.message import Message

from blockyard.csi.proto import csi_pb2 as pb

Mode = pb.VolumeCapability.AccessMode

# (message, its exact encoding). Single map entries and field order keep encodings unique.
CASES: list[tuple[Message, bytes]] = [
    # CreateVolumeRequest: name = 1, capacity_range = 2 {required_bytes = 1, limit_bytes = 2}.
    (
        pb.CreateVolumeRequest(
            name="a", capacity_range=pb.CapacityRange(required_bytes=5, limit_bytes=9)
        ),
        b"\x0a\x01a" + b"\x12\x04\x08\x05\x10\x09",
    ),
    # volume_capabilities = 3: VolumeCapability {block = 1 {}, access_mode = 3 {mode = 1}},
    # SINGLE_NODE_MULTI_WRITER = 7.
    (
        pb.CreateVolumeRequest(
            volume_capabilities=[
                pb.VolumeCapability(
                    block=pb.VolumeCapability.BlockVolume(),
                    access_mode=Mode(mode=Mode.SINGLE_NODE_MULTI_WRITER),
                )
            ]
        ),
        b"\x1a\x06" + b"\x0a\x00" + b"\x1a\x02\x08\x07",
    ),
    # parameters = 4 (map entry key = 1, value = 2); volume_content_source = 6 {snapshot = 1
    # {snapshot_id = 1}}; mutable_parameters = 8.
    (
        pb.CreateVolumeRequest(
            parameters={"k": "v"},
            volume_content_source=pb.VolumeContentSource(
                snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id="s")
            ),
            mutable_parameters={"m": "n"},
        ),
        b"\x22\x06\x0a\x01k\x12\x01v"
        + b"\x32\x05\x0a\x03\x0a\x01s"
        + b"\x42\x06\x0a\x01m\x12\x01n",
    ),
    # MountVolume: fs_type = 1, mount_flags = 2, volume_mount_group = 3 inside mount = 2;
    # MULTI_NODE_MULTI_WRITER = 5.
    (
        pb.VolumeCapability(
            mount=pb.VolumeCapability.MountVolume(
                fs_type="x", mount_flags=["f"], volume_mount_group="g"
            ),
            access_mode=Mode(mode=Mode.MULTI_NODE_MULTI_WRITER),
        ),
        b"\x12\x09\x0a\x01x\x12\x01f\x1a\x01g" + b"\x1a\x02\x08\x05",
    ),
    # ControllerPublishVolumeRequest: volume_id = 1, node_id = 2, readonly = 4,
    # volume_context = 6.
    (
        pb.ControllerPublishVolumeRequest(
            volume_id="v", node_id="n", readonly=True, volume_context={"a": "b"}
        ),
        b"\x0a\x01v\x12\x01n\x20\x01" + b"\x32\x06\x0a\x01a\x12\x01b",
    ),
    # ControllerPublishVolumeResponse: publish_context = 1.
    (
        pb.ControllerPublishVolumeResponse(publish_context={"a": "b"}),
        b"\x0a\x06\x0a\x01a\x12\x01b",
    ),
    # GetPluginCapabilitiesResponse: capabilities = 1; PluginCapability volume_expansion = 2
    # {type = 1}, ONLINE = 1; service = 1 {type = 1}, VOLUME_ACCESSIBILITY_CONSTRAINTS = 2.
    (
        pb.GetPluginCapabilitiesResponse(
            capabilities=[
                pb.PluginCapability(
                    volume_expansion=pb.PluginCapability.VolumeExpansion(
                        type=pb.PluginCapability.VolumeExpansion.ONLINE
                    )
                ),
                pb.PluginCapability(
                    service=pb.PluginCapability.Service(
                        type=pb.PluginCapability.Service.VOLUME_ACCESSIBILITY_CONSTRAINTS
                    )
                ),
            ]
        ),
        b"\x0a\x04\x12\x02\x08\x01" + b"\x0a\x04\x0a\x02\x08\x02",
    ),
    # ListVolumesResponse: entries = 1 {volume = 1 {volume_id = 2}, status = 2
    # {published_node_ids = 1, volume_condition = 2 {abnormal = 1}}}, next_token = 2.
    (
        pb.ListVolumesResponse(
            entries=[
                pb.ListVolumesResponse.Entry(
                    volume=pb.Volume(volume_id="v"),
                    status=pb.ListVolumesResponse.VolumeStatus(
                        published_node_ids=["n"],
                        volume_condition=pb.VolumeCondition(abnormal=True),
                    ),
                )
            ],
            next_token="t",
        ),
        b"\x0a\x0e" + b"\x0a\x03\x12\x01v" + b"\x12\x07\x0a\x01n\x12\x02\x08\x01" + b"\x12\x01t",
    ),
    # GetCapacityResponse: available_capacity = 1, minimum_volume_size = 3 (Int64Value value=1).
    (
        pb.GetCapacityResponse(available_capacity=7, minimum_volume_size={"value": 1}),
        b"\x08\x07" + b"\x1a\x02\x08\x01",
    ),
    # ControllerServiceCapability rpc = 1 {type = 1}: GET_VOLUME = 12, GET_SNAPSHOT = 15.
    (
        pb.ControllerGetCapabilitiesResponse(
            capabilities=[
                pb.ControllerServiceCapability(
                    rpc=pb.ControllerServiceCapability.RPC(
                        type=pb.ControllerServiceCapability.RPC.GET_VOLUME
                    )
                ),
                pb.ControllerServiceCapability(
                    rpc=pb.ControllerServiceCapability.RPC(
                        type=pb.ControllerServiceCapability.RPC.GET_SNAPSHOT
                    )
                ),
            ]
        ),
        b"\x0a\x04\x0a\x02\x08\x0c" + b"\x0a\x04\x0a\x02\x08\x0f",
    ),
    # Snapshot: size_bytes = 1, snapshot_id = 2, source_volume_id = 3, ready_to_use = 5,
    # group_snapshot_id = 6.
    (
        pb.Snapshot(
            size_bytes=2,
            snapshot_id="s",
            source_volume_id="v",
            ready_to_use=True,
            group_snapshot_id="g",
        ),
        b"\x08\x02\x12\x01s\x1a\x01v\x28\x01\x32\x01g",
    ),
    # ListSnapshotsRequest: max_entries = 1, starting_token = 2, source_volume_id = 3,
    # snapshot_id = 4.
    (
        pb.ListSnapshotsRequest(
            max_entries=3, starting_token="t", source_volume_id="v", snapshot_id="s"
        ),
        b"\x08\x03\x12\x01t\x1a\x01v\x22\x01s",
    ),
    # ControllerExpandVolumeResponse: capacity_bytes = 1, node_expansion_required = 2.
    (
        pb.ControllerExpandVolumeResponse(capacity_bytes=4, node_expansion_required=True),
        b"\x08\x04\x10\x01",
    ),
    # NodePublishVolumeRequest: staging_target_path = 3, target_path = 4, readonly = 6.
    (
        pb.NodePublishVolumeRequest(staging_target_path="p", target_path="t", readonly=True),
        b"\x1a\x01p\x22\x01t\x30\x01",
    ),
    # NodeGetInfoResponse: node_id = 1, max_volumes_per_node = 2, accessible_topology = 3
    # {segments = 1}.
    (
        pb.NodeGetInfoResponse(
            node_id="n", max_volumes_per_node=3, accessible_topology={"segments": {"k": "v"}}
        ),
        b"\x0a\x01n\x10\x03\x1a\x08\x0a\x06\x0a\x01k\x12\x01v",
    ),
    # GetMetadataAllocatedRequest: snapshot_id = 1, starting_offset = 2, max_results = 3.
    (
        pb.GetMetadataAllocatedRequest(snapshot_id="s", starting_offset=300, max_results=2),
        b"\x0a\x01s\x10\xac\x02\x18\x02",
    ),
]


@pytest.mark.parametrize(("message", "wire"), CASES, ids=lambda c: type(c).__name__)
def test_wire_round_trip(message: Message, wire: bytes) -> None:
    assert message.SerializeToString(deterministic=True) == wire
    parsed = type(message)()
    parsed.ParseFromString(wire)
    assert parsed == message


def test_enum_values_match_the_spec() -> None:
    assert Mode.SINGLE_NODE_SINGLE_WRITER == 6
    assert pb.ControllerServiceCapability.RPC.SINGLE_NODE_MULTI_WRITER == 13
    assert pb.ControllerServiceCapability.RPC.MODIFY_VOLUME == 14
    assert pb.NodeServiceCapability.RPC.VOLUME_MOUNT_GROUP == 6
    assert pb.PluginCapability.Service.GROUP_CONTROLLER_SERVICE == 3
    assert pb.PluginCapability.Service.SNAPSHOT_METADATA_SERVICE == 4


def test_services_and_package() -> None:
    services = pb.DESCRIPTOR.services_by_name
    assert pb.DESCRIPTOR.package == "csi.v1"
    assert set(services) == {
        "Identity",
        "Controller",
        "GroupController",
        "SnapshotMetadata",
        "Node",
    }
    controller = {m.name for m in services["Controller"].methods}
    assert {"GetSnapshot", "ControllerModifyVolume", "ControllerGetVolume"} <= controller
    assert len(controller) == 15
    assert len(services["Node"].methods) == 8
    assert services["SnapshotMetadata"].methods_by_name["GetMetadataDelta"].server_streaming
