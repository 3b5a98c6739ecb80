"""Unit attentions, ALUA gating, MODE SENSE/SELECT and RESERVE(6)."""

from __future__ import annotations

import struct

from scsi_support import I1, I2, Harness, data_of, inquiry, read10, sense_of, tur, write10

from blockyard.scsi import AccessState, Status
from blockyard.scsi.lu import ResetKind
from blockyard.scsi.nexus import UA_QUEUE_DEPTH_MAX, UnitAttentionQueue


def test_new_nexus_sees_power_on_once() -> None:
    h = Harness()
    assert sense_of(h.run(read10(0, 1))) == (6, 0x29, 0)
    assert h.run(read10(0, 1)).status == Status.GOOD


def test_inquiry_report_luns_do_not_consume_unit_attentions() -> None:
    h = Harness()
    assert h.run(inquiry()).status == Status.GOOD
    luns = bytes([0xA0, 0, 0, 0, 0, 0]) + struct.pack(">I", 64) + bytes(2)
    assert h.run(luns).status == Status.GOOD
    assert sense_of(h.run(tur())) == (6, 0x29, 0)


def test_request_sense_returns_and_clears_the_unit_attention() -> None:
    h = Harness()
    data = data_of(h.run(bytes([0x03, 0, 0, 0, 252, 0])))
    assert data[0] == 0x70 and data[2] & 0x0F == 6 and (data[12], data[13]) == (0x29, 0)
    assert h.run(tur()).status == Status.GOOD
    data = data_of(h.run(bytes([0x03, 0, 0, 0, 252, 0])))
    assert data[2] & 0x0F == 0
    assert sense_of(h.run(bytes([0x03, 1, 0, 0, 252, 0])))[:2] == (5, 0x24)  # DESC=1


def test_unit_attentions_are_reported_in_order_per_nexus() -> None:
    h = Harness().ready(I1, I2)
    h.device.resize(4096)
    h.lu.notify_capacity_changed()
    h.lu.notify_alua_changed()
    h.lu.notify_capacity_changed()  # a repeat is not queued twice
    assert sense_of(h.run(tur())) == (6, 0x2A, 0x09)
    assert sense_of(h.run(tur())) == (6, 0x2A, 0x06)
    assert h.run(tur()).status == Status.GOOD
    assert h.lu.pending_unit_attentions(I2) == ((0x2A, 0x09), (0x2A, 0x06))


def test_soft_threshold_unit_attention_reaches_every_nexus() -> None:
    h = Harness().ready(I1, I2)
    h.lu.notify_soft_threshold()
    # SBC-4 §4.7.3.7.3: THIN PROVISIONING SOFT THRESHOLD REACHED.
    assert sense_of(h.run(tur())) == (6, 0x38, 0x07)
    assert h.run(tur()).status == Status.GOOD
    assert h.lu.pending_unit_attentions(I2) == ((0x38, 0x07),)


def test_reset_supersedes_older_unit_attentions() -> None:
    h = Harness().ready(I1)
    h.lu.notify_capacity_changed()
    h.lu.reset(ResetKind.LOGICAL_UNIT)
    assert sense_of(h.run(tur())) == (6, 0x29, 0x03)
    assert h.run(tur()).status == Status.GOOD


def test_unit_attention_queue_is_bounded() -> None:
    q = UnitAttentionQueue()
    for i in range(100):
        q.push((0x2A, i))
    assert len(q) == UA_QUEUE_DEPTH_MAX
    assert q.peek() == (0x2A, 100 - UA_QUEUE_DEPTH_MAX)


def test_standby_port_group() -> None:
    h = Harness().ready(I1)
    h.alua.set_state(1, AccessState.STANDBY)
    h.lu.notify_alua_changed()
    assert sense_of(h.run(tur())) == (6, 0x2A, 0x06)
    assert sense_of(h.run(read10(0, 1))) == (2, 0x04, 0x0B)
    assert sense_of(h.run(write10(0, 1), bytes(512))) == (2, 0x04, 0x0B)
    assert sense_of(h.run(tur())) == (2, 0x04, 0x0B)
    assert h.run(inquiry()).status == Status.GOOD
    rtpg = bytes([0xA3, 0x0A, 0, 0, 0, 0]) + struct.pack(">I", 1024) + bytes(2)
    data = data_of(h.run(rtpg))
    assert struct.unpack(">I", data[:4])[0] == len(data) - 4
    assert data[4] & 0x0F == 2 and struct.unpack(">H", data[6:8])[0] == 1
    ext = data_of(h.run(bytes([0xA3, 0x2A, 0, 0, 0, 0]) + struct.pack(">I", 1024) + bytes(2)))
    assert ext[4] >> 4 == 1 and struct.unpack(">I", ext[:4])[0] == len(ext) - 4
    assert h.run(bytes([0x1A, 0, 0x3F, 0, 255, 0])).status == Status.GOOD
    assert h.run(bytes([0x5E, 0, 0, 0, 0, 0, 0, 0, 64, 0])).status == Status.GOOD
    h.alua.set_state(1, AccessState.UNAVAILABLE)
    assert sense_of(h.run(bytes([0x1A, 0, 0x3F, 0, 255, 0]))) == (2, 0x04, 0x0C)
    h.alua.set_state(1, AccessState.TRANSITIONING)
    assert sense_of(h.run(read10(0, 1))) == (2, 0x04, 0x0A)
    h.alua.set_state(1, AccessState.ACTIVE_NON_OPTIMIZED)
    assert h.run(read10(0, 1)).status == Status.GOOD


def _mode_sense6(page: int, pc: int = 0, dbd: bool = False, sub: int = 0) -> bytes:
    return bytes([0x1A, 0x08 if dbd else 0, (pc << 6) | page, sub, 255, 0])


def test_mode_sense_all_pages_and_descriptor() -> None:
    h = Harness().ready()
    data = data_of(h.run(_mode_sense6(0x3F)))
    assert data[0] == len(data) - 1 and data[3] == 8
    assert struct.unpack(">I", data[4:8])[0] == 2048 and data[9:12] == b"\x00\x02\x00"
    pos, codes = 12, []
    while pos < len(data):
        codes.append(data[pos] & 0x3F)
        pos += 2 + data[pos + 1]
    assert (
        pos == len(data) and codes == sorted(codes) and {0x01, 0x02, 0x08, 0x0A, 0x1C} <= set(codes)
    )
    assert data_of(h.run(_mode_sense6(0x3F, sub=0xFF))) == data
    assert sense_of(h.run(_mode_sense6(0x08, sub=1)))[:2] == (5, 0x24)
    assert sense_of(h.run(_mode_sense6(0x08, pc=3))) == (5, 0x39, 0)
    assert sense_of(h.run(_mode_sense6(0x05)))[:2] == (5, 0x24)
    changeable = data_of(h.run(_mode_sense6(0x08, pc=1, dbd=True)))
    assert changeable[3] == 0 and changeable[4 + 2] == 0x04
    ten = bytes([0x5A, 0x10, 0x08, 0, 0, 0, 0, 0x04, 0, 0])
    data10 = data_of(h.run(ten))
    assert data10[4] & 1 and struct.unpack(">H", data10[6:8])[0] == 16
    assert struct.unpack(">Q", data10[8:16])[0] == 2048
    assert len(data_of(h.run(bytes([0x1A, 0, 0x3F, 0, 4, 0])))) == 4


def test_mode_select_round_trip_and_unit_attention_for_others() -> None:
    h = Harness().ready(I1, I2)
    current = data_of(h.run(_mode_sense6(0x08, dbd=True)))
    page = bytearray(current[4:])
    page[2] &= ~0x04
    params = bytes(4) + bytes(page)
    assert h.run(bytes([0x15, 0x10, 0, 0, len(params), 0]), params).status == Status.GOOD
    assert data_of(h.run(_mode_sense6(0x08, dbd=True)))[4:] == bytes(page)
    assert sense_of(h.run(tur(), nexus=I2)) == (6, 0x2A, 0x01)
    assert h.run(tur()).status == Status.GOOD
    page[3] = 0x55  # not changeable
    params = bytes(4) + bytes(page)
    result = h.run(bytes([0x15, 0x10, 0, 0, len(params), 0]), params)
    assert sense_of(result) == (5, 0x26, 0)
    assert result.sense is not None and struct.unpack(">H", result.sense[16:18])[0] == 7
    assert sense_of(h.run(bytes([0x15, 0x11, 0, 0, len(params), 0]), params))[:2] == (5, 0x24)
    assert sense_of(h.run(bytes([0x15, 0x10, 0, 0, 3, 0]), bytes(3))) == (5, 0x1A, 0)
    assert h.run(bytes([0x15, 0x10, 0, 0, 0, 0])).status == Status.GOOD


def test_reserve6_blocks_other_nexus_until_release_or_loss() -> None:
    h = Harness().ready(I1, I2)
    assert h.run(bytes([0x16, 0, 0, 0, 0, 0])).status == Status.GOOD
    assert h.run(read10(0, 1), nexus=I2).status == Status.RESERVATION_CONFLICT
    assert h.run(tur(), nexus=I2).status == Status.RESERVATION_CONFLICT
    assert h.run(inquiry(), nexus=I2).status == Status.GOOD
    assert h.run(bytes([0x16, 0, 0, 0, 0, 0]), nexus=I2).status == Status.RESERVATION_CONFLICT
    assert h.run(bytes([0x17, 0, 0, 0, 0, 0]), nexus=I2).status == Status.GOOD
    assert h.run(read10(0, 1)).status == Status.GOOD
    h.lu.nexus_lost(I1)
    assert h.run(read10(0, 1), nexus=I2).status == Status.GOOD
