"""INQUIRY, VPD pages, READ CAPACITY, REPORT LUNS, CDB validation and inspect()."""

from __future__ import annotations

import struct
import uuid

from scsi_support import BLOCKS, I1, VOLUME_UUID, Harness, Nexus, data_of, inquiry, read10, sense_of

from blockyard.scsi import Direction, LuIdentity, Status
from blockyard.scsi.alua import StaticAlua
from blockyard.scsi.commands import COMMANDS, validate_cdb
from blockyard.scsi.lu import LogicalUnit
from blockyard.scsi.reservations import MemoryReservationStore
from blockyard.testing.memdev import MemoryBlockDevice


def test_standard_inquiry(h: Harness) -> None:
    data = data_of(h.run(inquiry(alloc=260)))
    assert data[0] == 0 and data[2] == 0x06 and data[3] & 0x0F == 2
    assert data[4] == len(data) - 5
    assert (data[5] >> 4) & 0x3 == 1  # implicit ALUA
    assert data[3] & 0x10 and data[7] & 0x02
    assert all(c == 0 or 0x20 <= c <= 0x7E for c in data[8:36])


def test_inquiry_allocation_length_truncates(h: Harness) -> None:
    for alloc in (0, 1, 5, 36):
        result = h.run(inquiry(alloc=alloc))
        assert result.status == Status.GOOD
        assert len(bytes(result.data_in or b"")) == alloc


def test_inquiry_page_without_evpd_points_at_byte2(h: Harness) -> None:
    result = h.run(inquiry(evpd=0, page=0x80))
    assert sense_of(result) == (5, 0x24, 0)
    assert result.sense is not None and result.sense[15] & 0xC0 == 0xC0
    assert struct.unpack(">H", result.sense[16:18])[0] == 2


def test_cmddt_and_unknown_vpd_are_refused(h: Harness) -> None:
    assert sense_of(h.run(inquiry(evpd=2)))[:2] == (5, 0x24)
    assert sense_of(h.run(inquiry(evpd=1, page=0x99)))[:2] == (5, 0x24)


def _vpd(h: Harness, page: int) -> bytes:
    data = data_of(h.run(inquiry(evpd=1, page=page, alloc=4096)))
    assert data[1] == page
    assert struct.unpack(">H", data[2:4])[0] == len(data) - 4
    return data


def test_supported_vpd_pages_are_all_served(h: Harness) -> None:
    pages = _vpd(h, 0)[4:]
    assert list(pages) == sorted(pages)
    assert {0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2} <= set(pages)
    for page in pages:
        _vpd(h, page)


def _designators(page: bytes) -> list[tuple[int, int, bytes]]:
    out, pos = [], 4
    while pos < len(page):
        length = page[pos + 3]
        out.append((page[pos + 1] & 0x30, page[pos + 1] & 0x0F, page[pos + 4 : pos + 4 + length]))
        pos += 4 + length
    assert pos == len(page)
    return out


def test_device_identification(h: Harness) -> None:
    desigs = _designators(_vpd(h, 0x83))
    naa = [v for assoc, kind, v in desigs if assoc == 0 and kind == 3]
    assert len(naa) == 1 and len(naa[0]) == 16 and naa[0][0] >> 4 == 6
    rel = [v for assoc, kind, v in desigs if assoc == 0x10 and kind == 4]
    tpg = [v for assoc, kind, v in desigs if assoc == 0x10 and kind == 5]
    assert struct.unpack(">H", rel[0][2:])[0] == I1.relative_target_port_id
    assert struct.unpack(">H", tpg[0][2:])[0] == I1.target_port_group_id
    t10 = [v for assoc, kind, v in desigs if assoc == 0 and kind == 1]
    assert t10[0].startswith(b"BLOCKYRD")


def test_naa_is_stable_per_uuid_and_unique_across_uuids() -> None:
    same = {LuIdentity(VOLUME_UUID).naa_id() for _ in range(3)}
    assert len(same) == 1
    ids = {LuIdentity(uuid.uuid4()).naa_id() for _ in range(2000)}
    assert len(ids) == 2000
    assert all(i[0] >> 4 == 6 for i in ids)


def test_naa_identical_across_servers_exporting_the_same_volume() -> None:
    def naa_from(port: int) -> bytes:
        lu = LogicalUnit(
            MemoryBlockDevice(8),
            LuIdentity(VOLUME_UUID),
            StaticAlua.single(port_id=port),
            MemoryReservationStore(),
        )
        nexus = Nexus("iqn.x:i,i,0x1", "iqn.x:t,t,0x1", port, 1)
        lu.execute(nexus, bytes(6))
        page = bytes(lu.execute(nexus, inquiry(1, 0x83, 1024)).data_in or b"")
        return _designators(page)[0][2]

    assert naa_from(1) == naa_from(2)


def test_block_limits_and_provisioning(h: Harness) -> None:
    bl = _vpd(h, 0xB0)
    assert len(bl) == 64
    assert bl[4] & 1  # WSNZ
    assert bl[5] == 1  # MAXIMUM COMPARE AND WRITE LENGTH
    assert struct.unpack(">H", bl[6:8])[0] == 8  # 4 KiB physical / 512 logical
    assert struct.unpack(">I", bl[8:12])[0] == h.device.max_transfer_blocks
    assert struct.unpack(">I", bl[20:24])[0] > 0 and struct.unpack(">I", bl[24:28])[0] > 0
    assert struct.unpack(">Q", bl[36:44])[0] > 0
    bdc = _vpd(h, 0xB1)
    assert struct.unpack(">H", bdc[4:6])[0] == 1
    lbp = _vpd(h, 0xB2)
    assert lbp[5] & 0xE0 == 0xE0 and (lbp[5] >> 2) & 7 == 1 and lbp[6] & 7 == 2


def test_read_capacity(h: Harness) -> None:
    last, bs = struct.unpack(">II", data_of(h.run(bytes([0x25]) + bytes(9))))
    assert (last, bs) == (BLOCKS - 1, 512)
    cdb16 = bytes([0x9E, 0x10]) + bytes(8) + struct.pack(">I", 32) + bytes(2)
    data = data_of(h.run(cdb16))
    assert len(data) == 32
    assert struct.unpack(">Q", data[:8])[0] == BLOCKS - 1
    assert data[13] & 0x0F == 3
    assert data[14] & 0xC0 == 0xC0  # LBPME, LBPRZ
    short = bytes([0x9E, 0x10]) + bytes(8) + struct.pack(">I", 12) + bytes(2)
    assert len(data_of(h.run(short))) == 12
    bad = bytes([0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0])
    assert sense_of(h.run(bad))[:2] == (5, 0x24)


def test_report_luns(h: Harness) -> None:
    cdb = bytes([0xA0, 0, 0, 0, 0, 0]) + struct.pack(">I", 64) + bytes(2)
    data = data_of(h.run(cdb))
    assert struct.unpack(">I", data[:4])[0] == 8 and data[8:16] == bytes(8)
    too_small = bytes([0xA0, 0, 0, 0, 0, 0]) + struct.pack(">I", 8) + bytes(2)
    assert sense_of(h.run(too_small))[:2] == (5, 0x24)
    bad_select = bytes([0xA0, 0, 0x10, 0, 0, 0]) + struct.pack(">I", 64) + bytes(2)
    assert sense_of(h.run(bad_select))[:2] == (5, 0x24)


def test_unknown_opcode(h: Harness) -> None:
    assert sense_of(h.run(bytes([0xC5]) + bytes(15))) == (5, 0x20, 0)
    assert sense_of(h.run(b"")) == (5, 0x20, 0)


def test_reserved_bits_point_at_byte_and_bit(h: Harness) -> None:
    result = h.run(read10(0, 1, flags=0x20))  # RDPROTECT=001b: no protection information
    assert sense_of(result) == (5, 0x24, 0)
    assert result.sense is not None
    assert result.sense[15] == 0x80 | 0x40 | 0x08 | 5
    assert struct.unpack(">H", result.sense[16:18])[0] == 1
    naca = read10(0, 1)[:-1] + b"\x04"
    assert sense_of(h.run(naca))[:2] == (5, 0x24)


def test_short_cdb_is_refused(h: Harness) -> None:
    assert sense_of(h.run(bytes([0x28, 0, 0])))[:2] == (5, 0x24)


def test_inspect(h: Harness) -> None:
    info = h.lu.inspect(bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 8, 0]))
    assert (info.direction, info.data_out_bytes) == (Direction.WRITE, 8 * 512)
    info = h.lu.inspect(read10(0, 3))
    assert (info.direction, info.data_in_bytes) == (Direction.READ, 3 * 512)
    too_big = h.lu.inspect(bytes([0x2A, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0]))
    assert too_big.error is not None and too_big.data_out_bytes == 0
    assert too_big.error.asc_ascq == (0x24, 0)
    assert h.lu.inspect(bytes([0xFF])).error is not None
    verify_no_data = h.lu.inspect(bytes([0x2F, 0, 0, 0, 0, 0, 0, 0, 4, 0]))
    assert verify_no_data.direction == Direction.NONE
    ws16_ndob = h.lu.inspect(bytes([0x93, 0x09]) + bytes(8) + struct.pack(">I", 4) + bytes(2))
    assert ws16_ndob.data_out_bytes == 0


def test_report_supported_opcodes_matches_what_is_accepted(h: Harness) -> None:
    cdb = bytes([0xA3, 0x0C, 0, 0, 0, 0]) + struct.pack(">I", 65535) + bytes(2)
    data = data_of(h.run(cdb))
    length = struct.unpack(">I", data[:4])[0]
    assert length == len(data) - 4
    for pos in range(4, len(data), 8):
        opcode, sa, flags, cdb_len = struct.unpack(">BxHxBH", data[pos : pos + 8])
        option = 2 if flags & 1 else 1
        one = bytes([0xA3, 0x0C, option, opcode]) + struct.pack(">HI", sa, 512) + bytes(2)
        usage = data_of(h.run(one))
        assert usage[1] & 0x07 == 3
        assert struct.unpack(">H", usage[2:4])[0] == cdb_len
        assert usage[4] == opcode
        wrong = bytes([0xA3, 0x0C, 3 - option, opcode]) + struct.pack(">HI", sa, 512) + bytes(2)
        assert sense_of(h.run(wrong))[:2] == (5, 0x24)
    with_timeouts = bytes([0xA3, 0x0C, 0x80, 0, 0, 0]) + struct.pack(">I", 65535) + bytes(2)
    data = data_of(h.run(with_timeouts))
    assert (len(data) - 4) % 20 == 0


def test_every_reported_usage_bit_is_accepted_by_validation() -> None:
    for spec in COMMANDS:
        validate_cdb(spec, spec.usage)


def test_report_supported_tmfs(h: Harness) -> None:
    data = data_of(h.run(bytes([0xA3, 0x0D, 0, 0, 0, 0]) + struct.pack(">I", 4) + bytes(2)))
    assert len(data) == 4 and data[0] & 0x08  # LURS
    assert sense_of(h.run(bytes([0xA3, 0x0D, 0, 0, 0, 0]) + struct.pack(">I", 3) + bytes(2)))
