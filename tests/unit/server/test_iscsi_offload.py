"""Which commands the iSCSI server runs on its event loop, and the per-volume lanes that share
its thread pool (server/iscsi_offload.py)."""

from __future__ import annotations

import struct

import pytest

from blockyard.scsi.constants import Op
from blockyard.server.iscsi_offload import VolumeLanes, runs_inline


def _cdb(opcode: int, byte1: int = 0) -> bytes:
    return bytes([opcode, byte1]) + bytes(14)


@pytest.mark.parametrize(
    "cdb",
    [
        _cdb(Op.TEST_UNIT_READY),
        _cdb(Op.INQUIRY),
        _cdb(Op.REPORT_LUNS),
        _cdb(Op.MODE_SENSE_10),
        _cdb(Op.MODE_SELECT_6),
        _cdb(Op.READ_CAPACITY_10),
        _cdb(Op.SERVICE_ACTION_IN_16, 0x10),  # READ CAPACITY (16)
        _cdb(Op.MAINTENANCE_IN, 0x0A),  # REPORT TARGET PORT GROUPS
        _cdb(Op.PERSISTENT_RESERVE_IN),
        _cdb(Op.REQUEST_SENSE),
        _cdb(Op.PRE_FETCH_16),
    ],
)
def test_commands_answered_from_memory_run_inline(cdb: bytes) -> None:
    assert runs_inline(cdb)


@pytest.mark.parametrize(
    "cdb",
    [
        _cdb(Op.READ_10),
        _cdb(Op.READ_16),
        _cdb(Op.WRITE_10),
        _cdb(Op.WRITE_6),
        _cdb(Op.VERIFY_16),
        _cdb(Op.WRITE_SAME_16),
        _cdb(Op.UNMAP),
        _cdb(Op.COMPARE_AND_WRITE),
        _cdb(Op.SYNCHRONIZE_CACHE_10),
        _cdb(Op.PERSISTENT_RESERVE_OUT),  # fsyncs the reservation file
        _cdb(Op.SERVICE_ACTION_IN_16, 0x12),  # GET LBA STATUS: SEEK_DATA / SEEK_HOLE
        struct.pack(">B15x", 0xC0),  # an opcode we do not know: the safe side
        b"",
    ],
)
def test_commands_that_may_touch_storage_go_to_the_pool(cdb: bytes) -> None:
    assert not runs_inline(cdb)


def test_a_volume_runs_at_most_its_share_and_queues_the_rest_in_order() -> None:
    lanes: VolumeLanes[str, int] = VolumeLanes(2)
    assert [lanes.submit("a", i) for i in range(5)] == [True, True, False, False, False]
    assert lanes.submit("b", 10) is True  # another volume is not held up
    assert (lanes.running("a"), lanes.waiting("a"), lanes.running("b")) == (2, 3, 1)
    assert lanes.finished("a") == 2
    assert lanes.finished("a") == 3
    assert lanes.running("a") == 2
    assert lanes.finished("a") == 4
    assert lanes.finished("a") is None
    assert lanes.finished("a") is None
    assert lanes.running("a") == 0 and lanes.waiting("a") == 0
    assert lanes.finished("b") is None
    assert len(lanes) == 0  # idle volumes leave nothing behind


def test_lanes_need_a_positive_share() -> None:
    with pytest.raises(ValueError, match="per_key_max"):
        VolumeLanes(0)
