"""The READ/WRITE fast path of the target connection against the general path.

The fast path (TargetConnection._fast_command) must be invisible on the wire: fed the same PDUs
one at a time, a connection with it and one without it send byte-identical bytes and leave
identical volumes. Fed in batches (where the fast path also merges adjacent writes), the
answers per ITT agree except for the ExpCmdSN/MaxCmdSN/StatSN bookkeeping, which legitimately
depends on when each command is answered.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import struct
import uuid
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from target_support import BLOCKS, Initiator, pattern, read10, tur, write10

from blockyard.errors import ReplicationUnavailableError, StorageIOError
from blockyard.iscsi.pdu import (
    R2T,
    DataIn,
    Pdu,
    ScsiCommand,
    ScsiResponse,
    TaskManagementRequest,
    TaskManagementResponse,
    decode_pdu,
    encode_pdu,
)
from blockyard.iscsi.reader import NEED_DATA, PduReader, PeerRole
from blockyard.iscsi.target_session import WRITE_RUN_BYTES_MAX
from blockyard.scsi import LogicalUnit, LuIdentity, MemoryReservationStore, StaticAlua
from blockyard.testing.memdev import MemoryBlockDevice

BLOCK = 512
STATUS_CHECK_CONDITION = 0x02
STATUS_RESERVATION_CONFLICT = 0x18
SENSE_KEY_UNIT_ATTENTION = 0x06


def read16(lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", 0x88, flags, lba, blocks, 0, 0)


def write16(lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", 0x8A, flags, lba, blocks, 0, 0)


def new_lu(device: MemoryBlockDevice | None = None) -> LogicalUnit:
    return LogicalUnit(
        device or MemoryBlockDevice(BLOCKS),
        LuIdentity(uuid.UUID("12345678-1234-5678-1234-567812345678")),
        StaticAlua.single(),
        MemoryReservationStore(),
        volume_name="vol1",
    )


def ready(fast: bool, lu: LogicalUnit | None = None, isid: int | None = None) -> Initiator:
    ini = Initiator(lu=lu or new_lu())
    if isid is not None:
        ini.login_settings = dataclasses.replace(ini.login_settings, isid=isid)
    ini.login()
    ini.send(ScsiCommand(itt=1, cdb=tur(), cmd_sn=ini.next_cmd_sn()))  # eat POWER ON UA
    ini.conn.fast_path = fast
    return ini


def raw_output(ini: Initiator, data: bytes) -> bytes:
    """Feed ``data`` and return exactly the bytes the connection wants sent."""
    ini.conn.receive_data(data)
    ini._run(ini.conn.next_events())
    return b"".join(bytes(b) for b in ini.conn.data_to_send())


# A command the fast path may or may not take: mostly eligible, with every reason to decline
# (FUA write, out of range, zero length, EDTL mismatch, reserved bits, immediate, LUN 1,
# data for a read, missing data for a write).
_ops = st.sampled_from(["r10", "r16", "w10", "w16"])
_quirks = st.sampled_from(
    [None] * 12
    + ["fua", "dpo", "range", "zero", "edtl_short", "edtl_long", "bits", "immediate", "lun"]
    + ["group", "control", "no_data", "read_fua"]
)
_command = st.tuples(_ops, st.integers(0, BLOCKS - 1), st.integers(1, 24), _quirks)


def build(spec: tuple[str, int, int, str | None], itt: int, cmd_sn: int) -> bytes:
    op, lba, blocks, quirk = spec
    blocks = min(blocks, BLOCKS - lba) or 1
    reading = op[0] == "r"
    flags = 0
    if quirk == "fua" or (quirk == "read_fua" and reading):
        flags |= 0x08
    if quirk == "dpo":
        flags |= 0x10
    if quirk == "range":
        lba = BLOCKS - blocks + 1
    if quirk == "zero":
        blocks = 0
    if quirk == "bits":
        flags |= 0x04
    if op == "r10":
        cdb = read10(lba, blocks)
    elif op == "w10":
        cdb = write10(lba, blocks)
    elif op == "r16":
        cdb = read16(lba, blocks)
    else:
        cdb = write16(lba, blocks)
    raw_cdb = bytearray(cdb.ljust(16, b"\x00"))
    raw_cdb[1] |= flags
    group_at, control_at = (6, 9) if op.endswith("10") else (14, 15)
    if quirk == "group":
        raw_cdb[group_at] = 0x20
    if quirk == "control":
        raw_cdb[control_at] = 0x04
    edtl = blocks * BLOCK
    if quirk == "edtl_short":
        edtl = max(0, edtl - BLOCK)
    elif quirk == "edtl_long":
        edtl += BLOCK
    data = b""
    if not reading and quirk != "no_data":
        data = pattern(min(edtl, blocks * BLOCK, 65536), seed=itt)
    return encode_pdu(
        ScsiCommand(
            itt=itt,
            cdb=bytes(raw_cdb),
            lun=(1 << 48) if quirk == "lun" else 0,
            expected_data_transfer_length=edtl,
            cmd_sn=cmd_sn,
            read=reading,
            write=not reading,
            final=True,
            immediate=quirk == "immediate",
            data=data,
        )
    )


@settings(max_examples=150, deadline=None)
@given(st.lists(_command, min_size=1, max_size=24))
def test_one_at_a_time_is_byte_identical(commands: list[tuple[str, int, int, str | None]]) -> None:
    fast, slow = ready(True), ready(False)
    for i, spec in enumerate(commands):
        pdu_bytes = build(spec, 0x100 + i, fast.cmd_sn)
        immediate = spec[3] == "immediate"
        if not immediate:
            fast.next_cmd_sn()
            slow.next_cmd_sn()
        assert raw_output(fast, pdu_bytes) == raw_output(slow, pdu_bytes), spec
    assert fast.lu.device.read(0, BLOCKS) == slow.lu.device.read(0, BLOCKS)
    assert fast.conn.stat_sn == slow.conn.stat_sn
    assert fast.conn.exp_cmd_sn == slow.conn.exp_cmd_sn


def _decode_all(raw: bytes) -> list[Pdu]:
    reader = PduReader(peer=PeerRole.TARGET, max_data_segment_length=(1 << 24) - 1)
    reader.receive_data(raw)
    out: list[Pdu] = []
    while True:
        pdu = reader.next_pdu()
        if pdu is NEED_DATA:
            return out
        out.append(pdu)


def _by_itt(pdus: list[Pdu]) -> dict[int, list[tuple[object, ...]]]:
    """Per ITT, each PDU with the answer-time bookkeeping masked."""
    found: dict[int, list[tuple[object, ...]]] = {}
    key: tuple[object, ...]
    for pdu in pdus:
        assert isinstance(pdu, DataIn | R2T | ScsiResponse), pdu
        if isinstance(pdu, DataIn):
            key = (
                "data-in", pdu.status_present, pdu.status, pdu.final, pdu.data_sn,
                pdu.buffer_offset, pdu.residual_count, pdu.residual_overflow,
                pdu.residual_underflow, bytes(pdu.data),
            )  # fmt: skip
        elif isinstance(pdu, R2T):
            key = ("r2t", pdu.r2t_sn, pdu.buffer_offset, pdu.desired_data_transfer_length)
        else:
            assert isinstance(pdu, ScsiResponse), pdu
            key = (
                "response", pdu.status, pdu.response, pdu.exp_data_sn, pdu.residual_count,
                pdu.residual_overflow, pdu.residual_underflow, bytes(pdu.data),
            )  # fmt: skip
        found.setdefault(pdu.itt, []).append(key)
    return found


# Batches: eligible commands plus declines that change nothing (a declined write that did
# change data would run after later fast commands, an order SAM-5 allows for SIMPLE tasks but
# that no byte comparison can follow).
_batch_quirks = st.sampled_from([None] * 8 + ["range", "bits", "edtl_long", "dpo"])
_batch_command = st.tuples(_ops, st.integers(0, BLOCKS - 1), st.integers(1, 24), _batch_quirks)


@settings(max_examples=150, deadline=None)
@given(st.lists(_batch_command, min_size=1, max_size=40), st.integers(1, 8))
def test_batches_answer_the_same(
    commands: list[tuple[str, int, int, str | None]], split: int
) -> None:
    fast, slow = ready(True), ready(False)
    pdus = []
    for i, spec in enumerate(commands):
        pdus.append(build(spec, 0x100 + i, fast.next_cmd_sn()))
        slow.next_cmd_sn()
    raw_fast = raw_slow = b""
    for start in range(0, len(pdus), split):
        chunk = b"".join(pdus[start : start + split])
        raw_fast += raw_output(fast, chunk)
        raw_slow += raw_output(slow, chunk)
    got_fast, got_slow = _decode_all(raw_fast), _decode_all(raw_slow)
    assert _by_itt(got_fast) == _by_itt(got_slow)
    assert fast.lu.device.read(0, BLOCKS) == slow.lu.device.read(0, BLOCKS)
    # StatSN still counts every status once, with no gap, in the order sent.
    for got in (got_fast, got_slow):
        stat_sns = [
            p.stat_sn
            for p in got
            if isinstance(p, ScsiResponse) or (isinstance(p, DataIn) and p.status_present)
        ]
        if stat_sns:
            assert stat_sns == list(range(stat_sns[0], stat_sns[0] + len(stat_sns)))


def test_adjacent_writes_merge_into_one_device_write() -> None:
    device = MemoryBlockDevice(BLOCKS)
    calls: list[tuple[int, int]] = []
    original = device.write

    def counting_write(
        lba: int, data: bytes | bytearray | memoryview, *, fua: bool = False
    ) -> None:
        calls.append((lba, len(data)))
        original(lba, data, fua=fua)

    device.write = counting_write  # type: ignore[method-assign]
    ini = ready(True, new_lu(device))
    blob = b""
    for i in range(8):
        data = pattern(8 * BLOCK, seed=i)
        cmd = ScsiCommand(
            itt=0x200 + i,
            cdb=write10(64 + 8 * i, 8),
            expected_data_transfer_length=len(data),
            cmd_sn=ini.next_cmd_sn(),
            write=True,
            data=data,
        )
        blob += encode_pdu(cmd)
    answers = ini.send_bytes(blob)
    assert calls == [(64, 8 * 8 * BLOCK)]
    assert [a.itt for a in answers if isinstance(a, ScsiResponse)] == list(range(0x200, 0x208))
    assert all(isinstance(a, ScsiResponse) and a.status == 0 for a in answers)
    expected = b"".join(pattern(8 * BLOCK, seed=i) for i in range(8))
    assert device.read(64, 64) == expected


def test_write_runs_are_capped() -> None:
    device = MemoryBlockDevice(BLOCKS)
    calls: list[int] = []
    original = device.write

    def counting_write(
        lba: int, data: bytes | bytearray | memoryview, *, fua: bool = False
    ) -> None:
        calls.append(len(data))
        original(lba, data, fua=fua)

    device.write = counting_write  # type: ignore[method-assign]
    ini = ready(True, new_lu(device))
    per = 128  # 64 KiB, the default FirstBurstLength
    blob = b"".join(
        encode_pdu(
            ScsiCommand(
                itt=0x300 + i,
                cdb=write10(per * i, per),
                expected_data_transfer_length=per * BLOCK,
                cmd_sn=ini.next_cmd_sn(),
                write=True,
                data=bytes(per * BLOCK),
            )
        )
        for i in range(BLOCKS // per)
    )
    ini.send_bytes(blob)
    assert max(calls) <= WRITE_RUN_BYTES_MAX
    assert sum(calls) == BLOCKS * BLOCK


def test_reservation_held_elsewhere_closes_the_gate() -> None:
    lu = new_lu()
    holder, other = ready(True, lu), ready(True, lu, isid=0x400001370001)
    reserve6 = bytes([0x16]) + bytes(15)
    answer = holder.send(ScsiCommand(itt=2, cdb=reserve6, cmd_sn=holder.next_cmd_sn()))
    assert isinstance(answer[0], ScsiResponse) and answer[0].status == 0
    read = ScsiCommand(
        itt=3, cdb=read10(0, 1), expected_data_transfer_length=BLOCK, cmd_sn=other.next_cmd_sn(),
        read=True,
    )  # fmt: skip
    answer = other.send(read)
    assert isinstance(answer[0], ScsiResponse)
    assert answer[0].status == STATUS_RESERVATION_CONFLICT


def test_unit_attention_closes_the_gate_until_reported() -> None:
    ini = ready(True)
    ini.lu.notify_capacity_changed()

    def read_once(itt: int) -> Pdu:
        cmd = ScsiCommand(
            itt=itt, cdb=read10(0, 1), expected_data_transfer_length=BLOCK,
            cmd_sn=ini.next_cmd_sn(), read=True,
        )  # fmt: skip
        return ini.send(cmd)[0]

    first = read_once(4)
    assert isinstance(first, ScsiResponse) and first.status == STATUS_CHECK_CONDITION
    assert first.data[2 + 2] & 0x0F == SENSE_KEY_UNIT_ATTENTION
    second = read_once(5)
    assert isinstance(second, DataIn) and second.status_present and second.status == 0


class FailingDevice(MemoryBlockDevice):
    def read(self, lba: int, block_count: int) -> bytes:
        raise StorageIOError("injected read failure")

    def write(self, lba: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        raise StorageIOError("injected write failure")


def test_device_errors_answer_like_the_general_path() -> None:
    fast = ready(True, new_lu(FailingDevice(BLOCKS)))
    slow = ready(False, new_lu(FailingDevice(BLOCKS)))
    for itt, cdb, write in ((6, read10(8, 2), False), (7, write10(8, 2), True)):
        cmd_sn = fast.next_cmd_sn()
        slow.next_cmd_sn()
        pdu = encode_pdu(
            ScsiCommand(
                itt=itt, cdb=cdb, expected_data_transfer_length=2 * BLOCK, cmd_sn=cmd_sn,
                read=not write, write=write, data=bytes(2 * BLOCK) if write else b"",
            )
        )  # fmt: skip
        got = raw_output(fast, pdu)
        assert got == raw_output(slow, pdu)
        answer = decode_pdu(got[:48], memoryview(b""), memoryview(got[48:]))
        assert isinstance(answer, ScsiResponse) and answer.status == STATUS_CHECK_CONDITION


def _scsi_read_pdu(itt: int) -> bytes:
    return encode_pdu(
        ScsiCommand(itt=itt, cdb=read10(itt, 1), expected_data_transfer_length=BLOCK, read=True)
    )


def _take(reader: PduReader) -> bytes | None:
    chunk = reader.next_scsi_command()
    return None if chunk is None else bytes(chunk)


def test_reader_fast_take_whole_bytewise_and_with_trailing_data() -> None:
    first, second = _scsi_read_pdu(1), _scsi_read_pdu(2)
    # Whole.
    reader = PduReader(peer=PeerRole.INITIATOR)
    reader.receive_data(first)
    assert _take(reader) == first
    assert reader.buffered_bytes == 0
    # One byte at a time: nothing until the last byte.
    reader = PduReader(peer=PeerRole.INITIATOR)
    for i, byte in enumerate(first):
        assert reader.next_scsi_command() is None
        reader.receive_data(bytes([byte]))
        if i < len(first) - 1:
            assert reader.next_scsi_command() is None
    assert _take(reader) == first
    # Trailing data stays for the next call.
    reader = PduReader(peer=PeerRole.INITIATOR)
    reader.receive_data(first + second[:20])
    assert _take(reader) == first
    assert reader.next_scsi_command() is None
    assert reader.buffered_bytes == 20


def test_reader_fast_take_leaves_other_pdus_to_next_pdu() -> None:
    nop = bytes([0x40, 0x80]) + bytes(46)  # NOP-Out, immediate
    reader = PduReader(peer=PeerRole.INITIATOR)
    reader.receive_data(nop)
    assert reader.next_scsi_command() is None
    assert reader.buffered_bytes == len(nop)
    # Digests on: the fast take steps aside.
    reader = PduReader(peer=PeerRole.INITIATOR, header_digest=True)
    reader.receive_data(_scsi_read_pdu(1))
    assert reader.next_scsi_command() is None


def test_plain_reads_and_writes_emit_no_events() -> None:
    """Guards the speed-up itself: with the gate open, plain READ/WRITE never become tasks."""
    ini = ready(True)
    before = len(ini.events)
    data = pattern(8 * BLOCK)
    answers = ini.send(
        ScsiCommand(
            itt=0x400, cdb=write16(8, 8), expected_data_transfer_length=len(data),
            cmd_sn=ini.next_cmd_sn(), write=True, data=data,
        ),
        ScsiCommand(
            itt=0x401, cdb=read10(8, 8), expected_data_transfer_length=len(data),
            cmd_sn=ini.next_cmd_sn(), read=True,
        ),
    )  # fmt: skip
    assert len(ini.events) == before
    assert isinstance(answers[0], ScsiResponse) and answers[0].status == 0
    assert isinstance(answers[1], DataIn) and bytes(answers[1].data) == data
    assert ini.conn.tasks_in_flight == 0


# ---- the device would block: the fast path hands the command to the general path ----------


class BlockingDevice(MemoryBlockDevice):
    """A memory device with the engine's non-waiting calls, which decline (a cold page cache,
    a full WAL, a busy writer) when a seeded coin says so; ``always`` declines every time."""

    def __init__(self, blocks: int, seed: int, *, always: bool = False) -> None:
        super().__init__(blocks)
        self._rng = random.Random(seed)
        self._always = always
        self.declined = 0

    def _declines(self) -> bool:
        if self._always or self._rng.random() < 0.5:
            self.declined += 1
            return True
        return False

    def try_read(self, lba: int, block_count: int) -> bytes | None:
        return None if self._declines() else self.read(lba, block_count)

    def try_write(self, lba: int, data: bytes | bytearray | memoryview) -> int | None:
        if self._declines():
            return None
        self.write(lba, data)
        return 1


@settings(max_examples=150, deadline=None)
@given(st.lists(_command, min_size=1, max_size=24), st.integers(0, 2**32))
def test_one_at_a_time_is_byte_identical_when_the_device_would_block(
    commands: list[tuple[str, int, int, str | None]], seed: int
) -> None:
    fast = ready(True, new_lu(BlockingDevice(BLOCKS, seed)))
    slow = ready(False)
    for i, spec in enumerate(commands):
        pdu_bytes = build(spec, 0x100 + i, fast.cmd_sn)
        if spec[3] != "immediate":
            fast.next_cmd_sn()
            slow.next_cmd_sn()
        assert raw_output(fast, pdu_bytes) == raw_output(slow, pdu_bytes), spec
    assert fast.lu.device.read(0, BLOCKS) == slow.lu.device.read(0, BLOCKS)
    assert (fast.conn.stat_sn, fast.conn.exp_cmd_sn, fast.conn.max_cmd_sn) == (
        slow.conn.stat_sn,
        slow.conn.exp_cmd_sn,
        slow.conn.max_cmd_sn,
    )


@settings(max_examples=150, deadline=None)
@given(st.lists(_batch_command, min_size=1, max_size=40), st.integers(1, 8), st.integers(0, 2**32))
def test_batches_answer_the_same_when_the_device_would_block(
    commands: list[tuple[str, int, int, str | None]], split: int, seed: int
) -> None:
    fast = ready(True, new_lu(BlockingDevice(BLOCKS, seed)))
    slow = ready(False)
    pdus = []
    for i, spec in enumerate(commands):
        pdus.append(build(spec, 0x100 + i, fast.next_cmd_sn()))
        slow.next_cmd_sn()
    raw_fast = raw_slow = b""
    for start in range(0, len(pdus), split):
        chunk = b"".join(pdus[start : start + split])
        raw_fast += raw_output(fast, chunk)
        raw_slow += raw_output(slow, chunk)
    got_fast, got_slow = _decode_all(raw_fast), _decode_all(raw_slow)
    assert _by_itt(got_fast) == _by_itt(got_slow)
    assert fast.lu.device.read(0, BLOCKS) == slow.lu.device.read(0, BLOCKS)
    stat_sns = [
        p.stat_sn
        for p in got_fast
        if isinstance(p, ScsiResponse) or (isinstance(p, DataIn) and p.status_present)
    ]
    if stat_sns:
        assert stat_sns == list(range(stat_sns[0], stat_sns[0] + len(stat_sns)))


@settings(max_examples=100, deadline=None)
@given(st.lists(_batch_command, min_size=1, max_size=40), st.integers(1, 8))
def test_a_device_that_always_blocks_makes_the_fast_path_the_general_one(
    commands: list[tuple[str, int, int, str | None]], split: int
) -> None:
    """Every command the fast path takes or tries, it hands over unchanged: the bytes on the
    wire are the general path's, batches included (MaxCmdSN too: a run that had to wait
    advanced it for answers that were never sent)."""
    fast = ready(True, new_lu(BlockingDevice(BLOCKS, 0, always=True)))
    slow = ready(False)
    pdus = []
    for i, spec in enumerate(commands):
        pdus.append(build(spec, 0x100 + i, fast.next_cmd_sn()))
        slow.next_cmd_sn()
    for start in range(0, len(pdus), split):
        chunk = b"".join(pdus[start : start + split])
        assert raw_output(fast, chunk) == raw_output(slow, chunk)
    assert fast.lu.device.read(0, BLOCKS) == slow.lu.device.read(0, BLOCKS)
    assert fast.conn.max_cmd_sn == slow.conn.max_cmd_sn


class DeclinesFirstWrite(MemoryBlockDevice):
    """Declines its first try_write (a full WAL that the flusher then drains); reads and
    later writes go through."""

    def __init__(self, blocks: int) -> None:
        super().__init__(blocks)
        self.tries = 0

    def try_read(self, lba: int, block_count: int) -> bytes | None:
        return self.read(lba, block_count)

    def try_write(self, lba: int, data: bytes | bytearray | memoryview) -> int | None:
        self.tries += 1
        if self.tries == 1:
            return None
        self.write(lba, data)
        return 1


def _hold(ini: Initiator, *, fast_path: bool = True) -> None:
    """Keep the commands handed to the general path (events) until finish_held; the fast
    path stays as it was (the harness turns it off with auto_execute)."""
    ini.auto_execute = False
    ini.conn.fast_path = fast_path


def _write_pdu(ini: Initiator, itt: int, lba: int, blocks: int) -> bytes:
    data = pattern(blocks * BLOCK, seed=itt)
    return encode_pdu(
        ScsiCommand(
            itt=itt, cdb=write10(lba, blocks), expected_data_transfer_length=len(data),
            cmd_sn=ini.next_cmd_sn(), write=True, data=data,
        )
    )  # fmt: skip


def _read_pdu(ini: Initiator, itt: int, lba: int, blocks: int) -> bytes:
    return encode_pdu(
        ScsiCommand(
            itt=itt, cdb=read10(lba, blocks), expected_data_transfer_length=blocks * BLOCK,
            cmd_sn=ini.next_cmd_sn(), read=True,
        )
    )  # fmt: skip


def test_a_read_that_flushes_a_run_that_would_block_goes_after_it() -> None:
    device = DeclinesFirstWrite(BLOCKS)
    ini = ready(True, new_lu(device))
    _hold(ini)
    blob = _write_pdu(ini, 0x500, 0, 8) + _write_pdu(ini, 0x501, 8, 8)
    blob += _read_pdu(ini, 0x502, 0, 16)  # reads what the run writes
    assert ini.send_bytes(blob) == []  # the run had to wait: the read waits behind it
    assert device.read(0, 16) == bytes(16 * BLOCK)
    assert ini.conn.tasks_in_flight == 3
    answers = ini.finish_held()
    assert [a.itt for a in answers if isinstance(a, ScsiResponse)] == [0x500, 0x501]
    data = b"".join(bytes(a.data) for a in answers if isinstance(a, DataIn))
    assert data == pattern(8 * BLOCK, seed=0x500) + pattern(8 * BLOCK, seed=0x501)


def test_commands_overtake_waiting_ones_only_on_other_blocks() -> None:
    device = DeclinesFirstWrite(BLOCKS)
    ini = ready(True, new_lu(device))
    _hold(ini)
    blob = _write_pdu(ini, 0x600, 0, 8) + _write_pdu(ini, 0x601, 8, 8)  # a run: must wait
    blob += _write_pdu(ini, 0x602, 100, 8)  # other blocks: written at once
    blob += _write_pdu(ini, 0x603, 4, 8)  # the waiting run's blocks: waits behind it
    blob += _read_pdu(ini, 0x604, 100, 8)  # other blocks: read at once
    blob += _read_pdu(ini, 0x605, 12, 1)  # the run's blocks: waits
    answers = ini.send_bytes(blob)
    assert [a.itt for a in answers] == [0x602, 0x604]
    assert bytes(answers[1].data) == pattern(8 * BLOCK, seed=0x602)  # type: ignore[attr-defined]
    assert device.read(0, 16) == bytes(16 * BLOCK)  # nothing reached the waiting blocks
    assert len(ini.held) == 4
    answers = ini.finish_held()
    assert [a.itt for a in answers] == [0x600, 0x601, 0x603, 0x605]
    expected = pattern(8 * BLOCK, seed=0x600)[: 4 * BLOCK] + pattern(8 * BLOCK, seed=0x603)
    expected += pattern(8 * BLOCK, seed=0x601)[4 * BLOCK :]
    assert device.read(0, 16) == expected
    assert bytes(answers[3].data) == expected[12 * BLOCK : 13 * BLOCK]  # type: ignore[attr-defined]


def test_a_waiting_command_other_than_read_or_write_holds_back_every_fast_command() -> None:
    ini = ready(True)
    _hold(ini)
    params = struct.pack(">HH4xQI4x", 22, 16, 200, 8)  # SBC-4 §5.32: one descriptor
    unmap = struct.pack(">B6xHx", 0x42, len(params))  # UNMAP (10)
    held = ScsiCommand(
        itt=0x800, cdb=unmap, expected_data_transfer_length=len(params),
        cmd_sn=ini.next_cmd_sn(), write=True, data=params,
    )  # fmt: skip
    answers = ini.send_bytes(encode_pdu(held) + _read_pdu(ini, 0x801, 0, 8))
    assert answers == []  # the read waits for the UNMAP, though on other blocks
    assert [a.itt for a in ini.finish_held() if isinstance(a, ScsiResponse | DataIn)] == [
        0x800,
        0x801,
    ]
    # SYNCHRONIZE CACHE changes no block: a write behind a waiting one goes at once.
    sync = ScsiCommand(itt=0x802, cdb=bytes([0x35]) + bytes(9), cmd_sn=ini.next_cmd_sn())
    answers = ini.send_bytes(encode_pdu(sync) + _write_pdu(ini, 0x803, 0, 8))
    assert [a.itt for a in answers] == [0x803]
    assert [a.itt for a in ini.finish_held()] == [0x802]


def test_a_run_that_would_block_leaves_max_cmd_sn_where_the_general_path_has_it() -> None:
    """Its answers were computed (advancing MaxCmdSN) but never sent: the window the initiator
    is told must count the run's commands as in flight, as the general path does."""
    fast = ready(True, new_lu(BlockingDevice(BLOCKS, 0, always=True)))
    slow = ready(False)
    _hold(fast)
    _hold(slow, fast_path=False)
    blob_fast = b"".join(_write_pdu(fast, 0x700 + i, 8 * i, 8) for i in range(4))
    blob_slow = b"".join(_write_pdu(slow, 0x700 + i, 8 * i, 8) for i in range(4))
    assert fast.send_bytes(blob_fast) == slow.send_bytes(blob_slow) == []
    assert fast.conn.max_cmd_sn == slow.conn.max_cmd_sn
    assert fast.conn.tasks_in_flight == slow.conn.tasks_in_flight == 4
    assert fast.finish_held() == slow.finish_held()


def test_clear_to_run_tells_the_transport_which_waiting_commands_may_go_first() -> None:
    """The fast path's ordering rule, for the READ/WRITEs the transport gets as events."""
    device = DeclinesFirstWrite(BLOCKS)
    ini = ready(True, new_lu(device))
    _hold(ini)
    blob = _write_pdu(ini, 0x900, 0, 8)  # had to wait
    blob += _write_pdu(ini, 0x901, 100, 8)  # other blocks: written at once
    blob += _read_pdu(ini, 0x902, 4, 2)  # the waiting write's blocks: an event too
    ini.send_bytes(blob)
    first, behind = ini.held
    assert ini.conn.clear_to_run(first.task_id)  # nothing before it
    assert not ini.conn.clear_to_run(behind.task_id)  # the write before it has its blocks
    ini.finish_held()
    params = struct.pack(">HH4xQI4x", 22, 16, 200, 8)
    unmap = ScsiCommand(
        itt=0x903, cdb=struct.pack(">B6xHx", 0x42, len(params)),
        expected_data_transfer_length=len(params), cmd_sn=ini.next_cmd_sn(), write=True,
        data=params,
    )  # fmt: skip
    ini.conn.fast_path = False
    ini.send_bytes(encode_pdu(unmap) + _read_pdu(ini, 0x904, 0, 1))
    fence, read = ini.held
    assert not ini.conn.clear_to_run(fence.task_id)  # not a READ or WRITE
    assert not ini.conn.clear_to_run(read.task_id)  # behind a fence
    ini.finish_held()
    assert not ini.conn.clear_to_run(read.task_id)  # no longer outstanding


# ---- the write is done but its answer waits (a replicated volume's receipt) ----------------


class ReceiptDevice(MemoryBlockDevice):
    """A memory device whose non-waiting writes are done at once but acknowledged only when
    the test completes their future (as ``ReplicatedDevice.try_write_pending`` waits for the
    replicas' receipt)."""

    def __init__(self, blocks: int) -> None:
        super().__init__(blocks)
        self.loop = asyncio.new_event_loop()
        self.futures: list[asyncio.Future[None]] = []

    def try_read(self, lba: int, block_count: int) -> bytes | None:
        return self.read(lba, block_count)

    def try_write(self, lba: int, data: bytes | bytearray | memoryview) -> int | None:
        return None  # the general path's inline attempt declines, as ReplicatedDevice's does

    def try_write_pending(
        self, lba: int, data: bytes | bytearray | memoryview
    ) -> int | asyncio.Future[None] | None:
        self.write(lba, data)
        fut: asyncio.Future[None] = self.loop.create_future()
        self.futures.append(fut)
        return fut


@pytest.fixture
def receipt() -> Iterator[tuple[Initiator, ReceiptDevice]]:
    device = ReceiptDevice(BLOCKS)
    try:
        yield ready(True, new_lu(device)), device
    finally:
        device.loop.close()


def test_a_write_waiting_for_receipt_is_answered_only_when_its_future_completes(
    receipt: tuple[Initiator, ReceiptDevice],
) -> None:
    ini, device = receipt
    general = ready(False)
    _hold(general, fast_path=False)
    blob = _write_pdu(ini, 0x900, 0, 8) + _write_pdu(ini, 0x901, 8, 8)  # one run
    general_blob = _write_pdu(general, 0x900, 0, 8) + _write_pdu(general, 0x901, 8, 8)
    assert ini.send_bytes(blob) == []
    general.send_bytes(general_blob)
    # Written at once (one device write for the run), not answered; counted in flight, and
    # the window the initiator is told is the general path's with both commands running.
    assert device.read(0, 16) == pattern(8 * BLOCK, seed=0x900) + pattern(8 * BLOCK, seed=0x901)
    assert len(device.futures) == 1
    assert ini.conn.tasks_in_flight == general.conn.tasks_in_flight == 2
    assert ini.conn.max_cmd_sn == general.conn.max_cmd_sn
    assert ini.finish_writes() == []  # not done yet
    device.futures[0].set_result(None)
    answers = ini.finish_writes()
    assert [(a.itt, a.status) for a in answers if isinstance(a, ScsiResponse)] == [
        (0x900, 0),
        (0x901, 0),
    ]
    assert ini.conn.tasks_in_flight == 0
    # The answers are those of the general path (same StatSN/ExpCmdSN/MaxCmdSN bookkeeping).
    assert answers == general.finish_held()


def test_a_write_whose_receipt_fails_gets_the_general_paths_check_condition(
    receipt: tuple[Initiator, ReceiptDevice],
) -> None:
    ini, device = receipt
    assert ini.send_bytes(_write_pdu(ini, 0x910, 0, 8)) == []
    device.futures[0].set_exception(
        ReplicationUnavailableError("LSN 1 is not received by enough copies")
    )
    (answer,) = ini.finish_writes()
    assert isinstance(answer, ScsiResponse) and answer.status == STATUS_CHECK_CONDITION
    failing = ready(False, new_lu(FailingWrites(BLOCKS)))
    (expected,) = failing.send_bytes(_write_pdu(failing, 0x910, 0, 8))
    assert isinstance(expected, ScsiResponse)
    assert bytes(answer.data) == bytes(expected.data), "the same sense data"


class FailingWrites(MemoryBlockDevice):
    def write(self, lba: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        raise ReplicationUnavailableError("LSN 1 is not received by enough copies")


def test_commands_on_a_waiting_writes_blocks_wait_behind_it_others_do_not(
    receipt: tuple[Initiator, ReceiptDevice],
) -> None:
    ini, device = receipt
    _hold(ini)
    blob = _write_pdu(ini, 0x920, 0, 8)
    blob += _read_pdu(ini, 0x921, 100, 8)  # other blocks: at once
    blob += _read_pdu(ini, 0x922, 4, 1)  # the waiting write's blocks: behind it
    answers = ini.send_bytes(blob)
    assert [a.itt for a in answers] == [0x921]
    assert len(ini.held) == 1  # the read, handed to the general path
    device.futures[0].set_result(None)
    answers = ini.finish_writes() + ini.finish_held()
    assert [a.itt for a in answers] == [0x920, 0x922]
    assert bytes(answers[1].data) == pattern(8 * BLOCK, seed=0x920)[4 * BLOCK : 5 * BLOCK]  # type: ignore[attr-defined]


def test_an_aborted_waiting_write_gets_no_answer_and_the_abort_waits_for_it(
    receipt: tuple[Initiator, ReceiptDevice],
) -> None:
    ini, device = receipt
    assert ini.send_bytes(_write_pdu(ini, 0x930, 0, 8)) == []
    abort = TaskManagementRequest(
        itt=0x931, function=1, referenced_task_tag=0x930, cmd_sn=ini.cmd_sn,
        ref_cmd_sn=ini.cmd_sn - 1, immediate=True,
    )  # fmt: skip
    # SAM-5 §7.2: the TMF response comes after the aborted task is gone; it is executing.
    assert ini.send(abort) == []
    device.futures[0].set_result(None)
    answers = ini.finish_writes()
    assert len(answers) == 1
    assert isinstance(answers[0], TaskManagementResponse) and answers[0].response == 0
    assert ini.conn.tasks_in_flight == 0
