"""Capability, parameter, capacity, id and lock checks of the CSI controller."""

from __future__ import annotations

import pytest

from blockyard.csi import ids
from blockyard.csi.capabilities import AccessType, parse_capabilities, parse_capability
from blockyard.csi.errors import (
    CapacityOutOfRangeError,
    InvalidParameterError,
    InvalidStartingTokenError,
    MissingFieldError,
    UnsupportedCapabilityError,
)
from blockyard.csi.locks import OperationLocks
from blockyard.csi.params import (
    DEFAULT_VOLUME_SIZE_BYTES,
    parse_parameters,
    resolve_fs_type,
    size_for_range,
    size_in_range,
)
from blockyard.csi.proto import csi_pb2 as pb
from blockyard.engine.limits import MAX_VOLUME_SIZE_BYTES
from blockyard.errors import InvalidArgumentError, OperationInProgressError
from blockyard.server.backend import SnapshotRef

Mode = pb.VolumeCapability.AccessMode
MIB = 1 << 20


def block(mode: int) -> pb.VolumeCapability:
    return pb.VolumeCapability(block={}, access_mode=Mode(mode=mode))


def mount(mode: int, fs_type: str = "") -> pb.VolumeCapability:
    return pb.VolumeCapability(mount={"fs_type": fs_type}, access_mode=Mode(mode=mode))


@pytest.mark.parametrize(
    "mode",
    [
        Mode.SINGLE_NODE_WRITER,
        Mode.SINGLE_NODE_READER_ONLY,
        Mode.SINGLE_NODE_SINGLE_WRITER,
        Mode.SINGLE_NODE_MULTI_WRITER,
        Mode.MULTI_NODE_READER_ONLY,
    ],
)
def test_modes_served_for_both_access_types(mode: int) -> None:
    assert parse_capability("c", block(mode)).access_type is AccessType.BLOCK
    cap = parse_capability("c", mount(mode, "xfs"))
    assert cap.access_type is AccessType.MOUNT and cap.fs_type == "xfs"


def test_rwx_is_block_only_and_says_why() -> None:
    cap = parse_capability("c", block(Mode.MULTI_NODE_MULTI_WRITER))
    assert cap.multi_node
    with pytest.raises(UnsupportedCapabilityError, match="cluster file system") as info:
        parse_capability("volume_capabilities[0]", mount(Mode.MULTI_NODE_MULTI_WRITER, "ext4"))
    assert "volume_capabilities[0]" in str(info.value) and "Block" in str(info.value)


def test_refused_capabilities() -> None:
    with pytest.raises(UnsupportedCapabilityError, match="single"):
        parse_capability("c", block(Mode.MULTI_NODE_SINGLE_WRITER))
    with pytest.raises(UnsupportedCapabilityError, match="btrfs"):
        parse_capability("c", mount(Mode.SINGLE_NODE_WRITER, "btrfs"))
    with pytest.raises(UnsupportedCapabilityError, match="4096"):
        parse_capability(
            "c",
            pb.VolumeCapability(
                mount={"mount_flags": ["x" * 4097]},
                access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER),
            ),
        )


def test_missing_parts_name_the_field() -> None:
    with pytest.raises(MissingFieldError, match=r"c\.access_type"):
        parse_capability("c", pb.VolumeCapability(access_mode=Mode(mode=1)))
    with pytest.raises(MissingFieldError, match=r"c\.access_mode"):
        parse_capability("c", pb.VolumeCapability(block={}))
    with pytest.raises(MissingFieldError, match=r"c\.access_mode"):
        parse_capability("c", block(Mode.UNKNOWN))
    with pytest.raises(MissingFieldError, match="volume_capabilities is required"):
        parse_capabilities("volume_capabilities", [])


def test_parameters() -> None:
    assert parse_parameters("p", {}).fs_type == ""
    assert parse_parameters("p", {"fsType": "xfs", "replicas": "1", "durability": "local"})
    for bad, word in [
        ({"fstype": "xfs"}, "unknown parameter 'fstype'"),
        ({"fsType": "ntfs"}, "ntfs"),
        ({"replicas": "3"}, "replicas"),
        ({"durability": "sync-all"}, "durability"),
    ]:
        with pytest.raises(InvalidParameterError, match=word):
            parse_parameters("p", bad)


def test_fs_type_resolution() -> None:
    caps = parse_capabilities("c", [mount(Mode.SINGLE_NODE_WRITER)])
    assert resolve_fs_type(caps, parse_parameters("p", {})) == "ext4"
    assert resolve_fs_type(caps, parse_parameters("p", {"fsType": "xfs"})) == "xfs"
    assert resolve_fs_type(parse_capabilities("c", [block(1)]), parse_parameters("p", {})) == ""
    conflicting = parse_capabilities("c", [mount(1, "ext4")])
    with pytest.raises(UnsupportedCapabilityError, match="conflicting"):
        resolve_fs_type(conflicting, parse_parameters("p", {"fsType": "xfs"}))


def test_capacity_rounding_and_bounds() -> None:
    assert size_for_range("r", 5 * MIB + 1, 0) == 5 * MIB + 4096
    assert size_for_range("r", 1, 0) == MIB  # the engine's minimum
    assert size_for_range("r", 0, 0) == DEFAULT_VOLUME_SIZE_BYTES
    assert size_for_range("r", 0, 8 * MIB + 5) == 8 * MIB  # default capped at the limit
    assert size_for_range("r", 0, 0, floor_bytes=3 * MIB) == 3 * MIB  # a clone's source size
    assert size_for_range("r", 4 * MIB, 0, floor_bytes=3 * MIB) == 4 * MIB
    with pytest.raises(CapacityOutOfRangeError, match="at least"):
        size_for_range("r", 0, 4096)
    with pytest.raises(CapacityOutOfRangeError, match="above limit_bytes"):
        size_for_range("r", 5 * MIB + 1, 5 * MIB + 2)
    with pytest.raises(CapacityOutOfRangeError, match="source"):
        size_for_range("r", 0, 2 * MIB, floor_bytes=3 * MIB)
    with pytest.raises(CapacityOutOfRangeError, match=r"required_bytes .* above limit"):
        size_for_range("r", 9 * MIB, 8 * MIB)
    with pytest.raises(CapacityOutOfRangeError, match="largest"):
        size_for_range("r", MAX_VOLUME_SIZE_BYTES + 1, 0)
    with pytest.raises(InvalidArgumentError, match="negative"):
        size_for_range("r", -1, 0)
    assert size_in_range(4 * MIB, 3 * MIB, 0) and not size_in_range(4 * MIB, 0, 3 * MIB)


def test_snapshot_ids_and_tokens() -> None:
    ref = SnapshotRef("pvc-1", "snapshot-2")
    sid = ids.snapshot_id(ref)
    assert ids.parse_snapshot_id(sid) == ref
    for bad in ["", "pvc-1", "@s", "v@", "v@s@t", "a/b@c"]:
        assert ids.parse_snapshot_id(bad) is None
    assert ids.decode_snapshot_token("") is None
    assert ids.decode_snapshot_token(ids.encode_snapshot_token(sid)) == sid
    for bad in ["garbage!", ids.encode_snapshot_token("no-separator"), "x" * 2000]:
        with pytest.raises(InvalidStartingTokenError):
            ids.decode_snapshot_token(bad)


def test_locks_refuse_a_second_operation_and_release() -> None:
    locks = OperationLocks(max_claimed=3)
    with locks.claim("CreateVolume", "volume:a"):
        assert locks.busy("volume:a")
        with (
            pytest.raises(OperationInProgressError, match="CreateVolume on volume:a"),
            locks.claim("DeleteVolume", "volume:b", "volume:a"),
        ):
            pass
        assert not locks.busy("volume:b"), "a refused claim takes nothing"
    assert not locks.busy("volume:a")
    with pytest.raises(RuntimeError), locks.claim("X", "volume:a"):
        raise RuntimeError("boom")
    assert not locks.busy("volume:a"), "released on error"
