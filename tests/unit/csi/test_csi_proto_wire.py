"""The generated CSI code speaks the CSI v1.12 wire format.

Messages are built from hand-encoded bytes (tag = field number << 3 | wire type; maps are
repeated entries with key = 1, value = 2). Every field number and enum value used below was
checked one by one against upstream's protobuf definitions (container-storage-interface/spec:
the protobuf blocks of spec.md, from which upstream's csi.proto is generated, and csi.proto
itself for the v1.0 parts), so a wrong field number, wire type, enum value or oneof in
csi.proto fails here. Each such fact carries the comment "verified against upstream
csi.proto"."""

from __future__ import annotations

import pytest
from google.protobuf.message import Message

from blockyard.csi.proto import csi_pb2 as pb

Mode = pb.VolumeCapability.AccessMode
CtrlRPC = pb.ControllerServiceCapability.RPC
NodeRPC = pb.NodeServiceCapability.RPC

# (message, its exact encoding). Single map entries and field order keep encodings unique.
CASES: list[tuple[Message, bytes]] = [
    # CreateVolumeRequest: name = 1, capacity_range = 2 {required_bytes = 1, limit_bytes = 2}.
    # verified against upstream csi.proto
    (
        pb.CreateVolumeRequest(
            name="a", capacity_range=pb.CapacityRange(required_bytes=5, limit_bytes=9)
        ),
        b"\x0a\x01a" + b"\x12\x04\x08\x05\x10\x09",
    ),
    # CreateVolumeRequest.volume_capabilities = 3: VolumeCapability {block = 1 (oneof
    # access_type) {}, access_mode = 3 {mode = 1}}; AccessMode.SINGLE_NODE_MULTI_WRITER = 7.
    # verified against upstream csi.proto
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
    # CreateVolumeRequest: parameters = 4; volume_content_source = 6 {snapshot = 1 (oneof type)
    # {snapshot_id = 1}}; mutable_parameters = 8.
    # verified against upstream csi.proto
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
    # CreateVolumeRequest: secrets = 5; accessibility_requirements = 7 {requisite = 1,
    # preferred = 2}; Topology.segments = 1.
    # verified against upstream csi.proto
    (
        pb.CreateVolumeRequest(
            secrets={"p": "q"},
            accessibility_requirements=pb.TopologyRequirement(
                requisite=[pb.Topology(segments={"k": "v"})],
                preferred=[pb.Topology(segments={"z": "w"})],
            ),
        ),
        b"\x2a\x06\x0a\x01p\x12\x01q"
        + b"\x3a\x14"
        + b"\x0a\x08\x0a\x06\x0a\x01k\x12\x01v"
        + b"\x12\x08\x0a\x06\x0a\x01z\x12\x01w",
    ),
    # VolumeContentSource.volume = 2 (oneof type) {VolumeSource.volume_id = 1}.
    # verified against upstream csi.proto
    (
        pb.VolumeContentSource(volume=pb.VolumeContentSource.VolumeSource(volume_id="v")),
        b"\x12\x03\x0a\x01v",
    ),
    # VolumeCapability.mount = 2 (oneof access_type) {fs_type = 1, mount_flags = 2,
    # volume_mount_group = 3}; AccessMode.MULTI_NODE_MULTI_WRITER = 5.
    # verified against upstream csi.proto
    (
        pb.VolumeCapability(
            mount=pb.VolumeCapability.MountVolume(
                fs_type="x", mount_flags=["f"], volume_mount_group="g"
            ),
            access_mode=Mode(mode=Mode.MULTI_NODE_MULTI_WRITER),
        ),
        b"\x12\x09\x0a\x01x\x12\x01f\x1a\x01g" + b"\x1a\x02\x08\x05",
    ),
    # Volume: capacity_bytes = 1, volume_id = 2, volume_context = 3, content_source = 4,
    # accessible_topology = 5 (repeated).
    # verified against upstream csi.proto
    (
        pb.Volume(
            capacity_bytes=8,
            volume_id="v",
            volume_context={"a": "b"},
            content_source=pb.VolumeContentSource(
                volume=pb.VolumeContentSource.VolumeSource(volume_id="w")
            ),
            accessible_topology=[pb.Topology(segments={"k": "v"})],
        ),
        b"\x08\x08\x12\x01v"
        + b"\x1a\x06\x0a\x01a\x12\x01b"
        + b"\x22\x05\x12\x03\x0a\x01w"
        + b"\x2a\x08\x0a\x06\x0a\x01k\x12\x01v",
    ),
    # ControllerPublishVolumeRequest: volume_id = 1, node_id = 2, readonly = 4,
    # volume_context = 6.
    # verified against upstream csi.proto
    (
        pb.ControllerPublishVolumeRequest(
            volume_id="v", node_id="n", readonly=True, volume_context={"a": "b"}
        ),
        b"\x0a\x01v\x12\x01n\x20\x01" + b"\x32\x06\x0a\x01a\x12\x01b",
    ),
    # ControllerPublishVolumeResponse: publish_context = 1.
    # verified against upstream csi.proto
    (
        pb.ControllerPublishVolumeResponse(publish_context={"a": "b"}),
        b"\x0a\x06\x0a\x01a\x12\x01b",
    ),
    # ValidateVolumeCapabilitiesRequest: volume_id = 1, volume_context = 2, parameters = 4,
    # secrets = 5, mutable_parameters = 6.
    # verified against upstream csi.proto
    (
        pb.ValidateVolumeCapabilitiesRequest(
            volume_id="v",
            volume_context={"a": "b"},
            parameters={"p": "q"},
            secrets={"s": "t"},
            mutable_parameters={"m": "n"},
        ),
        b"\x0a\x01v"
        + b"\x12\x06\x0a\x01a\x12\x01b"
        + b"\x22\x06\x0a\x01p\x12\x01q"
        + b"\x2a\x06\x0a\x01s\x12\x01t"
        + b"\x32\x06\x0a\x01m\x12\x01n",
    ),
    # ValidateVolumeCapabilitiesResponse: confirmed = 1 {volume_context = 1, parameters = 3,
    # mutable_parameters = 4}, message = 2.
    # verified against upstream csi.proto
    (
        pb.ValidateVolumeCapabilitiesResponse(
            confirmed=pb.ValidateVolumeCapabilitiesResponse.Confirmed(
                volume_context={"a": "b"}, parameters={"p": "q"}, mutable_parameters={"m": "n"}
            ),
            message="x",
        ),
        b"\x0a\x18"
        + b"\x0a\x06\x0a\x01a\x12\x01b"
        + b"\x1a\x06\x0a\x01p\x12\x01q"
        + b"\x22\x06\x0a\x01m\x12\x01n"
        + b"\x12\x01x",
    ),
    # ControllerModifyVolumeRequest: volume_id = 1, secrets = 2, mutable_parameters = 3.
    # verified against upstream csi.proto
    (
        pb.ControllerModifyVolumeRequest(
            volume_id="v", secrets={"s": "t"}, mutable_parameters={"m": "n"}
        ),
        b"\x0a\x01v" + b"\x12\x06\x0a\x01s\x12\x01t" + b"\x1a\x06\x0a\x01m\x12\x01n",
    ),
    # GetPluginCapabilitiesResponse: capabilities = 1; PluginCapability volume_expansion = 2
    # {type = 1}, ONLINE = 1; service = 1 {type = 1}, VOLUME_ACCESSIBILITY_CONSTRAINTS = 2.
    # verified against upstream csi.proto
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
    # verified against upstream csi.proto
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
    # verified against upstream csi.proto
    (
        pb.GetCapacityResponse(available_capacity=7, minimum_volume_size={"value": 1}),
        b"\x08\x07" + b"\x1a\x02\x08\x01",
    ),
    # ControllerServiceCapability rpc = 1 (oneof type) {type = 1}: GET_VOLUME = 12,
    # GET_SNAPSHOT = 15.
    # verified against upstream csi.proto
    (
        pb.ControllerGetCapabilitiesResponse(
            capabilities=[
                pb.ControllerServiceCapability(rpc=CtrlRPC(type=CtrlRPC.GET_VOLUME)),
                pb.ControllerServiceCapability(rpc=CtrlRPC(type=CtrlRPC.GET_SNAPSHOT)),
            ]
        ),
        b"\x0a\x04\x0a\x02\x08\x0c" + b"\x0a\x04\x0a\x02\x08\x0f",
    ),
    # ControllerServiceCapability.RPC: SINGLE_NODE_MULTI_WRITER = 13, MODIFY_VOLUME = 14.
    # verified against upstream csi.proto
    (
        pb.ControllerGetCapabilitiesResponse(
            capabilities=[
                pb.ControllerServiceCapability(rpc=CtrlRPC(type=CtrlRPC.SINGLE_NODE_MULTI_WRITER)),
                pb.ControllerServiceCapability(rpc=CtrlRPC(type=CtrlRPC.MODIFY_VOLUME)),
            ]
        ),
        b"\x0a\x04\x0a\x02\x08\x0d" + b"\x0a\x04\x0a\x02\x08\x0e",
    ),
    # Snapshot: size_bytes = 1, snapshot_id = 2, source_volume_id = 3, creation_time = 4
    # (Timestamp seconds = 1), ready_to_use = 5, group_snapshot_id = 6.
    # verified against upstream csi.proto
    (
        pb.Snapshot(
            size_bytes=2,
            snapshot_id="s",
            source_volume_id="v",
            creation_time={"seconds": 1},
            ready_to_use=True,
            group_snapshot_id="g",
        ),
        b"\x08\x02\x12\x01s\x1a\x01v\x22\x02\x08\x01\x28\x01\x32\x01g",
    ),
    # ListSnapshotsRequest: max_entries = 1, starting_token = 2, source_volume_id = 3,
    # snapshot_id = 4.
    # verified against upstream csi.proto
    (
        pb.ListSnapshotsRequest(
            max_entries=3, starting_token="t", source_volume_id="v", snapshot_id="s"
        ),
        b"\x08\x03\x12\x01t\x1a\x01v\x22\x01s",
    ),
    # GetSnapshotRequest: snapshot_id = 1, secrets = 2.
    # verified against upstream csi.proto
    (
        pb.GetSnapshotRequest(snapshot_id="s", secrets={"k": "v"}),
        b"\x0a\x01s" + b"\x12\x06\x0a\x01k\x12\x01v",
    ),
    # ControllerExpandVolumeResponse: capacity_bytes = 1, node_expansion_required = 2.
    # verified against upstream csi.proto
    (
        pb.ControllerExpandVolumeResponse(capacity_bytes=4, node_expansion_required=True),
        b"\x08\x04\x10\x01",
    ),
    # NodeServiceCapability rpc = 1 {type = 1}: SINGLE_NODE_MULTI_WRITER = 5,
    # VOLUME_MOUNT_GROUP = 6.
    # verified against upstream csi.proto
    (
        pb.NodeGetCapabilitiesResponse(
            capabilities=[
                pb.NodeServiceCapability(rpc=NodeRPC(type=NodeRPC.SINGLE_NODE_MULTI_WRITER)),
                pb.NodeServiceCapability(rpc=NodeRPC(type=NodeRPC.VOLUME_MOUNT_GROUP)),
            ]
        ),
        b"\x0a\x04\x0a\x02\x08\x05" + b"\x0a\x04\x0a\x02\x08\x06",
    ),
    # NodePublishVolumeRequest: staging_target_path = 3, target_path = 4, readonly = 6.
    # verified against upstream csi.proto
    (
        pb.NodePublishVolumeRequest(staging_target_path="p", target_path="t", readonly=True),
        b"\x1a\x01p\x22\x01t\x30\x01",
    ),
    # NodeGetInfoResponse: node_id = 1, max_volumes_per_node = 2, accessible_topology = 3
    # {segments = 1}.
    # verified against upstream csi.proto
    (
        pb.NodeGetInfoResponse(
            node_id="n", max_volumes_per_node=3, accessible_topology={"segments": {"k": "v"}}
        ),
        b"\x0a\x01n\x10\x03\x1a\x08\x0a\x06\x0a\x01k\x12\x01v",
    ),
    # NodeExpandVolumeRequest: volume_id = 1, volume_path = 2, staging_target_path = 4,
    # secrets = 6.
    # verified against upstream csi.proto
    (
        pb.NodeExpandVolumeRequest(
            volume_id="v", volume_path="p", staging_target_path="s", secrets={"k": "v"}
        ),
        b"\x0a\x01v\x12\x01p\x22\x01s" + b"\x32\x06\x0a\x01k\x12\x01v",
    ),
    # VolumeGroupSnapshot: group_snapshot_id = 1, snapshots = 2 {snapshot_id = 2},
    # ready_to_use = 4.
    # verified against upstream csi.proto
    (
        pb.VolumeGroupSnapshot(
            group_snapshot_id="g", snapshots=[pb.Snapshot(snapshot_id="s")], ready_to_use=True
        ),
        b"\x0a\x01g\x12\x03\x12\x01s\x20\x01",
    ),
    # GetMetadataAllocatedRequest: snapshot_id = 1, starting_offset = 2, max_results = 3.
    # verified against upstream csi.proto
    (
        pb.GetMetadataAllocatedRequest(snapshot_id="s", starting_offset=300, max_results=2),
        b"\x0a\x01s\x10\xac\x02\x18\x02",
    ),
    # GetMetadataAllocatedResponse: block_metadata_type = 1 (VARIABLE_LENGTH = 2),
    # volume_capacity_bytes = 2, block_metadata = 3 {byte_offset = 1, size_bytes = 2}.
    # verified against upstream csi.proto
    (
        pb.GetMetadataAllocatedResponse(
            block_metadata_type=pb.VARIABLE_LENGTH,
            volume_capacity_bytes=9,
            block_metadata=[pb.BlockMetadata(byte_offset=1, size_bytes=2)],
        ),
        b"\x08\x02\x10\x09\x1a\x04\x08\x01\x10\x02",
    ),
    # GetMetadataDeltaRequest: base_snapshot_id = 1, target_snapshot_id = 2,
    # starting_offset = 3, max_results = 4.
    # verified against upstream csi.proto
    (
        pb.GetMetadataDeltaRequest(
            base_snapshot_id="b", target_snapshot_id="t", starting_offset=5, max_results=2
        ),
        b"\x0a\x01b\x12\x01t\x18\x05\x20\x02",
    ),
]


@pytest.mark.parametrize(("message", "wire"), CASES, ids=lambda c: type(c).__name__)
def test_wire_round_trip(message: Message, wire: bytes) -> None:
    assert message.SerializeToString(deterministic=True) == wire
    parsed = type(message)()
    parsed.ParseFromString(wire)
    assert parsed == message


def test_enum_values_match_the_spec() -> None:
    # verified against upstream csi.proto
    assert Mode.SINGLE_NODE_SINGLE_WRITER == 6
    assert Mode.SINGLE_NODE_MULTI_WRITER == 7
    assert CtrlRPC.SINGLE_NODE_MULTI_WRITER == 13
    assert CtrlRPC.MODIFY_VOLUME == 14
    assert CtrlRPC.GET_SNAPSHOT == 15
    assert NodeRPC.SINGLE_NODE_MULTI_WRITER == 5
    assert NodeRPC.VOLUME_MOUNT_GROUP == 6
    assert pb.PluginCapability.Service.GROUP_CONTROLLER_SERVICE == 3
    assert pb.PluginCapability.Service.SNAPSHOT_METADATA_SERVICE == 4
    assert pb.PluginCapability.VolumeExpansion.OFFLINE == 2
    assert pb.VolumeUsage.INODES == 2
    assert pb.GroupControllerServiceCapability.RPC.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT == 1
    assert (pb.FIXED_LENGTH, pb.VARIABLE_LENGTH) == (1, 2)


def _oneof_of(message: type[Message], field: str) -> str | None:
    oneof = message.DESCRIPTOR.fields_by_name[field].containing_oneof
    return None if oneof is None else oneof.name


def test_oneof_membership() -> None:
    # verified against upstream csi.proto: block = 1 and mount = 2 form oneof access_type,
    # access_mode = 3 is outside it; VolumeContentSource, PluginCapability and the capability
    # messages each have one oneof named type.
    assert _oneof_of(pb.VolumeCapability, "block") == "access_type"
    assert _oneof_of(pb.VolumeCapability, "mount") == "access_type"
    assert _oneof_of(pb.VolumeCapability, "access_mode") is None
    assert _oneof_of(pb.VolumeContentSource, "snapshot") == "type"
    assert _oneof_of(pb.VolumeContentSource, "volume") == "type"
    assert _oneof_of(pb.PluginCapability, "service") == "type"
    assert _oneof_of(pb.PluginCapability, "volume_expansion") == "type"
    assert _oneof_of(pb.ControllerServiceCapability, "rpc") == "type"
    assert _oneof_of(pb.NodeServiceCapability, "rpc") == "type"
    assert _oneof_of(pb.CreateVolumeRequest, "volume_content_source") is None


def test_options_match_the_spec() -> None:
    # verified against upstream csi.proto: csi_secret = 1059 and every alpha_* = 1060.
    assert pb.csi_secret.number == 1059
    for ext in (
        pb.alpha_enum,
        pb.alpha_enum_value,
        pb.alpha_field,
        pb.alpha_message,
        pb.alpha_method,
        pb.alpha_service,
    ):
        assert ext.number == 1060

    def field_options(message: type[Message], field: str) -> Message:
        return message.DESCRIPTOR.fields_by_name[field].GetOptions()

    secrets = field_options(pb.CreateVolumeRequest, "secrets")
    assert secrets.Extensions[pb.csi_secret]
    node_expand = field_options(pb.NodeExpandVolumeRequest, "secrets")
    assert node_expand.Extensions[pb.csi_secret]
    assert node_expand.Extensions[pb.alpha_field]
    assert field_options(pb.GetCapacityResponse, "minimum_volume_size").Extensions[pb.alpha_field]
    assert not field_options(pb.CreateVolumeRequest, "parameters").Extensions[pb.csi_secret]

    mode_value = Mode.DESCRIPTOR.enum_types_by_name["Mode"].values_by_name
    assert mode_value["SINGLE_NODE_MULTI_WRITER"].GetOptions().Extensions[pb.alpha_enum_value]
    assert not mode_value["MULTI_NODE_MULTI_WRITER"].GetOptions().Extensions[pb.alpha_enum_value]
    assert pb.VolumeCondition.DESCRIPTOR.GetOptions().Extensions[pb.alpha_message]

    services = pb.DESCRIPTOR.services_by_name
    assert services["SnapshotMetadata"].GetOptions().Extensions[pb.alpha_service]
    assert not services["GroupController"].GetOptions().Extensions[pb.alpha_service]
    controller = services["Controller"].methods_by_name
    assert controller["GetSnapshot"].GetOptions().Extensions[pb.alpha_method]
    assert controller["ControllerGetVolume"].GetOptions().Extensions[pb.alpha_method]


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
    assert len(services["GroupController"].methods) == 4
    assert services["SnapshotMetadata"].methods_by_name["GetMetadataDelta"].server_streaming
    assert services["SnapshotMetadata"].methods_by_name["GetMetadataAllocated"].server_streaming
