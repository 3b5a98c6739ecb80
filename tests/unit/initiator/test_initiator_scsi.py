"""Initiator-side SCSI helpers: CDBs the target decodes as meant, parsers fed the target's
own encoders (and garbage), and the one status-to-action/error mapping."""

from __future__ import annotations

import struct
import uuid

import pytest

from blockyard.attach.initiator import scsi
from blockyard.attach.initiator.errors import ScsiStatusError
from blockyard.attach.initiator.scsi import Disposition, Sense
from blockyard.errors import InvalidArgumentError, NoSpaceError, OutOfRangeError
from blockyard.scsi import commands
from blockyard.scsi.alua import AccessState, TargetPortGroup, encode_rtpg
from blockyard.scsi.constants import Op, SenseKey, Status
from blockyard.scsi.identity import LuIdentity, device_identification
from blockyard.scsi.nexus import Nexus
from blockyard.scsi.sense import build_sense


def test_cdbs_are_what_the_target_inspects() -> None:
    info = commands.inspect(scsi.write16(10, 8, fua=True), 512, 2048)
    assert info.error is None and info.data_out_bytes == 8 * 512
    assert scsi.write16(10, 8, fua=True)[1] & scsi.FUA_BIT
    read = scsi.read16(1 << 40, 3)
    assert read[0] == Op.READ_16 and struct.unpack_from(">QI", read, 2) == (1 << 40, 3)
    params = scsi.unmap_parameter_list([(5, 7), (100, 1)])
    assert len(params) == 8 + 2 * 16
    assert commands.inspect(scsi.unmap(len(params)), 512, 2048).data_out_bytes == len(params)
    assert struct.unpack_from(">HH", params) == (len(params) - 2, 32)
    same = scsi.write_same16(4, 9, unmap=True)
    assert same[1] & scsi.WRITE_SAME_UNMAP_BIT and commands.inspect(same, 512, 2048).error is None
    for cdb in (
        scsi.read_capacity16(),
        scsi.get_lba_status(3),
        scsi.inquiry_vpd(0x83),
        scsi.report_target_port_groups(),
        scsi.synchronize_cache16(),
    ):
        assert commands.inspect(cdb, 512, 2048).error is None, cdb.hex()


def test_capacity_parse() -> None:
    data = struct.pack(">QIBBH", 8191, 512, 0, 3, 0xC000) + bytes(16)
    cap = scsi.parse_capacity16(data)
    assert (cap.block_count, cap.logical_block_size, cap.physical_block_size) == (8192, 512, 4096)
    assert cap.thin_provisioned and cap.unmapped_reads_zero
    with pytest.raises(ScsiStatusError):
        scsi.parse_capacity16(b"\x00" * 8)
    with pytest.raises(ScsiStatusError):
        scsi.parse_capacity16(struct.pack(">QI", 10, 513) + bytes(20))


def test_device_identification_from_the_targets_encoder() -> None:
    identity = LuIdentity(uuid.UUID(int=42))
    nexus = Nexus("iqn.2026-11.x.y:i,i,0x1", "iqn.2026-11.x.y:t,t,0x0001", 3, 7)
    parsed = scsi.parse_device_identification(device_identification(identity, nexus))
    assert parsed.naa == identity.naa_id().hex()
    assert (parsed.target_port_group, parsed.relative_target_port) == (7, 3)
    # Truncated and foreign pages yield nothing rather than garbage.
    page = device_identification(identity, nexus)
    assert scsi.parse_device_identification(page[:10]).naa is None
    assert scsi.parse_device_identification(b"\x00\x80\x00\x00").naa is None


def test_rtpg_parse_both_formats() -> None:
    groups = [
        TargetPortGroup(1, AccessState.STANDBY, (1,)),
        TargetPortGroup(2, AccessState.ACTIVE_OPTIMIZED, (2, 5), preferred=True),
    ]
    for extended in (False, True):
        parsed = scsi.parse_rtpg(encode_rtpg(groups, extended=extended))
        assert [(g.group_id, g.state, g.relative_ports) for g in parsed] == [
            (1, AccessState.STANDBY, (1,)),
            (2, AccessState.ACTIVE_OPTIMIZED, (2, 5)),
        ]
        assert parsed[1].preferred
    truncated = encode_rtpg(groups, extended=True)[:-2]
    assert len(scsi.parse_rtpg(truncated)) == 1
    assert scsi.parse_rtpg(b"") == []


def test_lba_status_parse() -> None:
    data = struct.pack(">I4xQIB3x", 20, 100, 50, 1)
    assert scsi.parse_lba_status(data, 120) == (100, 50, False)
    assert scsi.parse_lba_status(data, 150) is None
    assert scsi.parse_lba_status(data[:10], 100) is None


def test_sense_formats() -> None:
    fixed = build_sense(SenseKey.NOT_READY, (0x04, 0x0B))
    assert scsi.parse_sense(fixed) == Sense(2, 0x04, 0x0B)
    descriptor = bytes([0x72, 0x05, 0x21, 0x00, 0, 0, 0, 0])
    assert scsi.parse_sense(descriptor) == Sense(5, 0x21, 0)
    assert scsi.parse_sense(b"") is None
    assert scsi.parse_sense(b"\x10\x00") is None


@pytest.mark.parametrize(
    ("status", "sense", "expected"),
    [
        (Status.GOOD, None, Disposition.DONE),
        (Status.BUSY, None, Disposition.RETRY),
        (Status.TASK_SET_FULL, None, Disposition.RETRY),
        (Status.CHECK_CONDITION, Sense(6, 0x29, 0), Disposition.RETRY),
        (Status.CHECK_CONDITION, Sense(6, 0x2A, 0x06), Disposition.RETRY_REFRESH),
        (Status.CHECK_CONDITION, Sense(6, 0x2A, 0x09), Disposition.RETRY_REFRESH),
        (Status.CHECK_CONDITION, Sense(2, 0x04, 0x0A), Disposition.FAILOVER),
        (Status.CHECK_CONDITION, Sense(2, 0x04, 0x0B), Disposition.FAILOVER),
        (Status.CHECK_CONDITION, Sense(2, 0x04, 0x0C), Disposition.FAILOVER),
        (Status.CHECK_CONDITION, Sense(0xB, 0x4B, 0), Disposition.RETRY),
        (Status.CHECK_CONDITION, Sense(5, 0x21, 0), Disposition.FAIL),
        (Status.CHECK_CONDITION, Sense(3, 0x11, 0), Disposition.FAIL),
        (Status.CHECK_CONDITION, None, Disposition.FAIL),
        (Status.RESERVATION_CONFLICT, None, Disposition.FAIL),
    ],
)
def test_classify(status: int, sense: Sense | None, expected: Disposition) -> None:
    assert scsi.classify(status, sense) is expected


def test_outcome_errors_mirror_the_target_mapping() -> None:
    cc = Status.CHECK_CONDITION
    assert isinstance(scsi.outcome_error("READ", cc, Sense(5, 0x21, 0), 9), OutOfRangeError)
    invalid = scsi.outcome_error("READ", cc, Sense(5, 0x24, 0), 9)
    assert isinstance(invalid, InvalidArgumentError)
    assert not isinstance(invalid, OutOfRangeError)
    assert isinstance(scsi.outcome_error("WRITE", cc, Sense(7, 0x27, 7), 1), NoSpaceError)
    medium = scsi.outcome_error("WRITE", cc, Sense(3, 0x0C, 0), 1)
    assert isinstance(medium, ScsiStatusError) and medium.sense_key == 3 and "LBA 1" in str(medium)
    conflict = scsi.outcome_error("WRITE", Status.RESERVATION_CONFLICT, None, None)
    assert isinstance(conflict, ScsiStatusError) and conflict.status == Status.RESERVATION_CONFLICT
