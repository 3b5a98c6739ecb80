"""Block commands: READ/WRITE, FUA, WRITE SAME, UNMAP, COMPARE AND WRITE, VERIFY, GET LBA STATUS."""

from __future__ import annotations

import struct

from scsi_support import BLOCKS, I1, Harness, data_of, read10, read16, sense_of, write10, write16

from blockyard.errors import (
    CorruptionError,
    FencedError,
    FlushTimeoutError,
    NoSpaceError,
    StorageIOError,
    WalFullTimeoutError,
)
from blockyard.scsi import Status


def test_write_read_round_trip(h: Harness) -> None:
    payload = bytes(range(256)) * 4
    assert h.run(write10(10, 2), payload).status == Status.GOOD
    assert data_of(h.run(read10(10, 2))) == payload
    assert data_of(h.run(read16(10, 2))) == payload
    read6 = bytes([0x08, 0, 0, 10, 2, 0])
    assert data_of(h.run(read6)) == payload


def test_read6_zero_means_256_blocks(h: Harness) -> None:
    assert len(data_of(h.run(bytes([0x08, 0, 0, 0, 0, 0])))) == 256 * 512


def test_out_of_range_and_zero_length(h: Harness) -> None:
    assert sense_of(h.run(read10(BLOCKS, 1))) == (5, 0x21, 0)
    assert sense_of(h.run(read10(BLOCKS + 1, 0))) == (5, 0x21, 0)
    assert sense_of(h.run(read16(2**64 - 1, 1))) == (5, 0x21, 0)
    assert sense_of(h.run(write16(BLOCKS - 1, 2), bytes(1024))) == (5, 0x21, 0)
    assert h.run(read10(0, 0)).status == Status.GOOD
    assert h.run(write10(0, 0)).status == Status.GOOD


def test_fua_reaches_the_device(h: Harness) -> None:
    before = h.device.flush_count
    h.run(write10(0, 1, flags=0x08), bytes(512))
    assert h.device.flush_count == before + 1
    h.run(bytes([0x35]) + bytes(9))
    assert h.device.flush_count == before + 2


def test_short_data_out_is_refused_long_is_trimmed(h: Harness) -> None:
    assert sense_of(h.run(write10(0, 2), bytes(512)))[:2] == (5, 0x24)
    assert h.run(write10(0, 1), b"\x01" * 1024).status == Status.GOOD
    assert h.device.read(1, 1) == bytes(512)


def _ws16(lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", 0x93, flags, lba, blocks, 0, 0)


def test_write_same_patterns_and_unmap(h: Harness) -> None:
    pattern = b"\xa5" * 512
    assert h.run(_ws16(100, 40), pattern).status == Status.GOOD
    assert h.device.read(100, 40) == pattern * 40
    assert h.run(_ws16(100, 40, flags=0x08), bytes(512)).status == Status.GOOD
    assert not h.device.lba_status(100).mapped
    assert h.run(_ws16(100, 8, flags=0x09)).status == Status.GOOD  # UNMAP + NDOB
    ws10 = struct.pack(">BBIBHB", 0x41, 0, 300, 0, 3, 0)
    assert h.run(ws10, b"\x01" * 512).status == Status.GOOD
    assert h.device.read(300, 3) == b"\x01" * 1536


def test_write_same_rules(h: Harness) -> None:
    assert sense_of(h.run(_ws16(0, 0), bytes(512)))[:2] == (5, 0x24)  # WSNZ=1
    assert sense_of(h.run(_ws16(BLOCKS + 1, 0), bytes(512))) == (5, 0x21, 0)
    assert sense_of(h.run(_ws16(0, 1, flags=0x10), bytes(512)))[:2] == (5, 0x24)  # ANCHOR
    assert sense_of(h.run(_ws16(0, 1), bytes(1024)))[:2] == (5, 0x24)  # data-out != 1 block


def _unmap(descs: list[tuple[int, int]], declared: int | None = None) -> tuple[bytes, bytes]:
    body = b"".join(struct.pack(">QI4x", lba, n) for lba, n in descs)
    bd_len = len(body) if declared is None else declared
    params = struct.pack(">HH4x", bd_len + 6, bd_len) + body
    cdb = struct.pack(">BBxxxxBHB", 0x42, 0, 0, len(params), 0)
    return cdb, params


def test_unmap(h: Harness) -> None:
    h.run(write10(0, 8), b"\x07" * 4096)
    cdb, params = _unmap([(0, 4), (6, 1)])
    assert h.run(cdb, params).status == Status.GOOD
    assert h.device.read(0, 8) == bytes(2048) + b"\x07" * 1024 + bytes(512) + b"\x07" * 512
    cdb, params = _unmap([(BLOCKS - 1, 2)])
    assert sense_of(h.run(cdb, params)) == (5, 0x21, 0)
    cdb, params = _unmap([(0, 1)], declared=64)
    assert sense_of(h.run(cdb, params)) == (5, 0x1A, 0)
    zero = struct.pack(">BBxxxxBHB", 0x42, 0, 0, 0, 0)
    assert h.run(zero).status == Status.GOOD
    cdb, params = _unmap([(0, 1)] * 257)
    assert sense_of(h.lu.execute(I1, cdb, params))[:2] == (5, 0x24)  # list too long


def _caw(lba: int, blocks: int = 1) -> bytes:
    return struct.pack(">BBQxxxBBB", 0x89, 0, lba, blocks, 0, 0)


def test_compare_and_write(h: Harness) -> None:
    old = b"\x11" * 512
    new = b"\x22" * 512
    h.run(write10(5, 1), old)
    assert h.run(_caw(5), old + new).status == Status.GOOD
    assert h.device.read(5, 1) == new
    wrong = bytearray(new)
    wrong[77] ^= 0xFF
    result = h.run(_caw(5), bytes(wrong) + old)
    assert sense_of(result) == (0x0E, 0x1D, 0)
    assert result.sense is not None and result.sense[0] & 0x80
    assert struct.unpack(">I", result.sense[3:7])[0] == 77
    assert h.device.read(5, 1) == new
    assert sense_of(h.run(_caw(BLOCKS), old + new)) == (5, 0x21, 0)
    assert sense_of(h.run(_caw(0, 2), bytes(2048)))[:2] == (5, 0x24)
    assert sense_of(h.run(_caw(5), bytes(512 * 4)))[:2] == (5, 0x24)


def _verify10(lba: int, blocks: int, bytchk: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2F, bytchk << 1, lba, 0, blocks, 0)


def test_verify(h: Harness) -> None:
    data = bytes(range(256)) * 4
    h.run(write10(20, 2), data)
    assert h.run(_verify10(20, 2, 0)).status == Status.GOOD
    assert h.run(_verify10(20, 2, 1), data).status == Status.GOOD
    bad = bytearray(data)
    bad[600] ^= 1
    result = h.run(_verify10(20, 2, 1), bytes(bad))
    assert sense_of(result) == (0x0E, 0x1D, 0)
    assert result.sense is not None and struct.unpack(">I", result.sense[3:7])[0] == 600
    assert sense_of(h.run(_verify10(20, 2, 2)))[:2] == (5, 0x24)
    h.run(write10(40, 2), b"\x09" * 1024)
    assert h.run(_verify10(40, 2, 3), b"\x09" * 512).status == Status.GOOD
    assert sense_of(h.run(_verify10(BLOCKS, 1, 0))) == (5, 0x21, 0)


def test_get_lba_status(h: Harness) -> None:
    h.run(write10(8, 8), b"\x01" * 4096)
    cdb = bytes([0x9E, 0x12]) + struct.pack(">QI", 0, 1024) + bytes(2)
    data = data_of(h.run(cdb))
    length = struct.unpack(">I", data[:4])[0]
    assert length == len(data) - 4
    descs = [struct.unpack(">QIB3x", data[p : p + 16]) for p in range(8, len(data), 16)]
    assert descs[0] == (0, 8, 1) and descs[1] == (8, 8, 0)
    oob = bytes([0x9E, 0x12]) + struct.pack(">QI", BLOCKS, 1024) + bytes(2)
    assert sense_of(h.run(oob)) == (5, 0x21, 0)


def test_write_cache_disabled_makes_writes_fua(h: Harness) -> None:
    ms = bytes([0x1A, 0x08, 0x08, 0, 255, 0])
    page = bytearray(data_of(h.run(ms))[4:])
    page[2] &= ~0x04
    params = bytes(4) + bytes(page)
    assert h.run(bytes([0x15, 0x10, 0, 0, len(params), 0]), params).status == Status.GOOD
    before = h.device.flush_count
    h.run(write10(0, 1), bytes(512))
    assert h.device.flush_count == before + 1


class _Failing:
    """Wraps the memory device and raises ``exc`` from read, write and flush."""

    def __init__(self, harness: Harness, exc: Exception) -> None:
        self._exc = exc
        dev = harness.device
        dev.read = self._raise  # type: ignore[method-assign]
        dev.write = self._raise  # type: ignore[method-assign]
        dev.flush = self._raise  # type: ignore[method-assign]

    def _raise(self, *args: object, **kwargs: object) -> bytes:
        raise self._exc


def test_error_mapping(h: Harness) -> None:
    cases = [
        (StorageIOError("eio"), read10(1, 1), None, (3, 0x11, 0)),
        (StorageIOError("eio"), write10(1, 1), bytes(512), (3, 0x0C, 0)),
        (CorruptionError("bad", volume="v", path="p", offset=1), read10(1, 1), None, (3, 0x11, 0)),
        (NoSpaceError("full"), write10(1, 1), bytes(512), (7, 0x27, 7)),
        (FencedError("stale"), write10(1, 1), bytes(512), (2, 0x04, 0x0B)),
    ]
    for exc, cdb, data, expected in cases:
        _Failing(h, exc)
        assert sense_of(h.run(cdb, data)) == expected
    _Failing(h, WalFullTimeoutError("wal"))
    assert h.run(write10(1, 1), bytes(512)).status == Status.TASK_SET_FULL
    _Failing(h, FlushTimeoutError("slow"))
    assert h.run(bytes([0x35]) + bytes(9)).status == Status.BUSY
