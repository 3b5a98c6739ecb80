"""The master's records: JSON round-trips, validation with clear errors, format versions."""

from __future__ import annotations

import json
import uuid
from dataclasses import replace

import pytest

from blockyard.engine.epoch import Role
from blockyard.errors import InvalidArgumentError
from blockyard.master import model
from blockyard.master.model import (
    CopyRecord,
    CopyState,
    ServerAddresses,
    ServerRecord,
    ServerState,
    VolumeRecord,
    VolumeStatus,
)
from blockyard.replication.commit import DurabilityMode

UUID = str(uuid.UUID(int=7))


def volume(**changes: object) -> VolumeRecord:
    rec = VolumeRecord(
        name="vol-a",
        uuid=UUID,
        size_bytes=1 << 30,
        replica_count=2,
        mode=DurabilityMode.SYNC_ALL,
        epoch=3,
        status=VolumeStatus.ACTIVE,
        primary="s1",
        copies=(
            CopyRecord("s1", Role.PRIMARY, CopyState.IN_SYNC, 10),
            CopyRecord("s2", Role.REPLICA, CopyState.OUT_OF_SYNC, 9),
        ),
        created_ns=123,
        parameters={"fs": "ext4"},
        pending_out_of_sync=("10.0.0.9:3261",),
    )
    return replace(rec, **changes)  # type: ignore[arg-type]


def server(**changes: object) -> ServerRecord:
    rec = ServerRecord(
        "s1",
        ServerAddresses(("10.0.0.1:3260", "10.0.1.1:3260"), "10.0.0.1:9500", "10.0.0.1:9600"),
        zone="z1",
        capacity_bytes=10 << 30,
        free_bytes=5 << 30,
        allocated_bytes=2 << 30,
        state=ServerState.DRAINING,
        registered_ns=99,
    )
    return replace(rec, **changes)  # type: ignore[arg-type]


def test_volume_round_trip() -> None:
    rec = volume()
    assert model.decode_volume(model.encode_volume(rec)) == rec


def test_server_round_trip() -> None:
    rec = server()
    assert model.decode_server(model.encode_server(rec)) == rec


def test_newer_format_is_refused_with_upgrade_hint() -> None:
    doc = json.loads(model.encode_volume(volume()))
    doc["format"] = model.FORMAT_VERSION + 1
    with pytest.raises(InvalidArgumentError, match="upgrade this master"):
        model.decode_volume(json.dumps(doc).encode(), "volumes/vol-a")


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("epoch", -1, "epoch must be an integer"),
        ("mode", "sometimes", "mode 'sometimes' is not one of"),
        ("status", 5, "status 5 is not one of"),
        ("uuid", "nope", "is not a UUID"),
        ("replica_count", 9, "replica_count"),
        ("copies", "x", "copies is not a list"),
    ],
)
def test_bad_field_names_record_and_field(field: str, value: object, match: str) -> None:
    doc = json.loads(model.encode_volume(volume()))
    doc[field] = value
    with pytest.raises(InvalidArgumentError, match=match) as info:
        model.decode_volume(json.dumps(doc).encode(), "volumes/vol-a")
    assert "volumes/vol-a" in str(info.value)


def test_missing_field_is_named() -> None:
    doc = json.loads(model.encode_volume(volume()))
    del doc["primary"]
    with pytest.raises(InvalidArgumentError, match="no field 'primary'"):
        model.decode_volume(json.dumps(doc).encode())


def test_not_json_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="not valid JSON"):
        model.decode_server(b"\xff{", "servers/x")


def test_two_copies_on_one_server_are_refused() -> None:
    rec = volume(
        copies=(
            CopyRecord("s1", Role.PRIMARY, CopyState.IN_SYNC),
            CopyRecord("s1", Role.REPLICA, CopyState.IN_SYNC),
        )
    )
    with pytest.raises(InvalidArgumentError, match="two copies on server s1"):
        model.encode_volume(rec)


def test_primary_must_hold_the_primary_copy() -> None:
    with pytest.raises(InvalidArgumentError, match="primary s9 holds no copy"):
        model.encode_volume(volume(primary="s9"))
    with pytest.raises(InvalidArgumentError, match="has role primary but the primary is s2"):
        model.encode_volume(volume(primary="s2"))


def test_settled_status() -> None:
    assert volume().settled_status() is VolumeStatus.DEGRADED
    synced = volume(copies=tuple(replace(c, state=CopyState.IN_SYNC) for c in volume().copies))
    assert synced.settled_status() is VolumeStatus.ACTIVE
    assert volume(status=VolumeStatus.DELETING).settled_status() is VolumeStatus.DELETING


def test_copy_transitions() -> None:
    model.check_copy_transition("v", "s", CopyState.PENDING, CopyState.REBUILDING)
    model.check_copy_transition("v", "s", CopyState.OUT_OF_SYNC, CopyState.REBUILDING)
    with pytest.raises(InvalidArgumentError, match="cannot go from in_sync to pending"):
        model.check_copy_transition("v", "s", CopyState.IN_SYNC, CopyState.PENDING)
