"""Full-feature flows through the sans-IO target connection: login, R2T writes, multi-PDU
reads, SYNCHRONIZE CACHE, residuals, text, NOP and logout."""

from __future__ import annotations

import struct

from target_support import (
    TARGET,
    Initiator,
    pattern,
    read10,
    sync_cache10,
    tur,
    write10,
)

from blockyard.iscsi.negotiation import OperationalSettings
from blockyard.iscsi.pdu import (
    R2T,
    DataIn,
    DataOut,
    LogoutRequest,
    LogoutResponse,
    NopIn,
    NopOut,
    ScsiCommand,
    ScsiResponse,
    TextRequest,
    TextResponse,
    parse_sense_segment,
)
from blockyard.iscsi.target_session import CloseConnection, ConnectionState, LoggedIn
from blockyard.iscsi.text import parse_text


def clear_ua(ini: Initiator) -> None:
    """The first command of a new nexus reports POWER ON (a unit attention)."""
    rsp = ini.send(ScsiCommand(itt=1, cdb=tur(), cmd_sn=ini.next_cmd_sn()))
    assert isinstance(rsp[0], ScsiResponse) and rsp[0].status == 2


def write_with_r2t(ini: Initiator, itt: int, lba: int, data: bytes) -> list[R2T]:
    """Send a WRITE(10) without unsolicited data and answer every R2T."""
    blocks = len(data) // 512
    out = ini.send(
        ScsiCommand(
            itt=itt,
            cdb=write10(lba, blocks),
            expected_data_transfer_length=len(data),
            cmd_sn=ini.next_cmd_sn(),
            write=True,
        )
    )
    r2ts: list[R2T] = []
    while out and isinstance(out[-1], R2T):
        batch = [p for p in out if isinstance(p, R2T)]
        r2ts += batch
        out = []
        for r2t in batch:
            offset, end = r2t.buffer_offset, r2t.buffer_offset + r2t.desired_data_transfer_length
            seg = ini.params.max_xmit_data_segment_length
            pdus = []
            for sn, start in enumerate(range(offset, end, seg)):
                stop = min(end, start + seg)
                pdus.append(
                    DataOut(
                        itt=itt,
                        ttt=r2t.ttt,
                        data_sn=sn,
                        buffer_offset=start,
                        final=stop == end,
                        data=data[start:stop],
                    )
                )
            out += ini.send(*pdus)
    assert len(out) == 1 and isinstance(out[0], ScsiResponse), out
    assert out[0].status == 0 and out[0].itt == itt
    return r2ts


def test_login_write_read_sync_logout() -> None:
    ini = Initiator(
        operational=OperationalSettings(
            max_recv_data_segment_length=4096,
            max_burst_length=16384,
            first_burst_length=8192,
            max_outstanding_r2t=2,
        )
    )
    ini.login()
    assert ini.conn.state is ConnectionState.FULL_FEATURE
    logged_in = [e for e in ini.events if isinstance(e, LoggedIn)]
    assert logged_in[0].target_name == TARGET and logged_in[0].nexus is not None
    clear_ua(ini)

    data = pattern(64 * 1024)
    r2ts = write_with_r2t(ini, 2, 100, data)
    # 64 KiB at MaxBurstLength 16 KiB: four R2Ts, never more than MaxOutstandingR2T open.
    assert [r.desired_data_transfer_length for r in r2ts] == [16384] * 4
    assert [r.r2t_sn for r in r2ts] == [0, 1, 2, 3]
    assert [r.buffer_offset for r in r2ts] == [0, 16384, 32768, 49152]

    out = ini.send(
        ScsiCommand(
            itt=3,
            cdb=read10(100, 128),
            expected_data_transfer_length=len(data),
            cmd_sn=ini.next_cmd_sn(),
            read=True,
        )
    )
    assert all(isinstance(p, DataIn) for p in out)
    data_ins = [p for p in out if isinstance(p, DataIn)]
    assert len(data_ins) == 16  # 64 KiB at the initiator's MaxRecvDataSegmentLength 4 KiB
    assert all(len(p.data) <= 4096 for p in data_ins)
    assert [p.data_sn for p in data_ins] == list(range(16))
    assert b"".join(bytes(p.data) for p in data_ins) == data
    # F at each MaxBurstLength (16 KiB) boundary; status only in the last PDU.
    assert [i for i, p in enumerate(data_ins) if p.final] == [3, 7, 11, 15]
    assert [p.status_present for p in data_ins] == [False] * 15 + [True]
    assert data_ins[-1].status == 0 and data_ins[-1].residual_count == 0

    flushes_before = ini.lu.device.flush_count  # type: ignore[attr-defined]
    out = ini.send(ScsiCommand(itt=4, cdb=sync_cache10(), cmd_sn=ini.next_cmd_sn()))
    assert isinstance(out[0], ScsiResponse) and out[0].status == 0
    assert ini.lu.device.flush_count == flushes_before + 1  # type: ignore[attr-defined]

    out = ini.send(LogoutRequest(itt=5, cmd_sn=ini.next_cmd_sn(), immediate=True))
    assert isinstance(out[0], LogoutResponse) and out[0].response == 0
    assert out[0].time2wait == ini.params.default_time2wait
    assert any(isinstance(e, CloseConnection) for e in ini.events)
    assert ini.conn.closed


def test_immediate_and_unsolicited_data_then_r2t_for_the_rest() -> None:
    ini = Initiator(
        operational=OperationalSettings(
            initial_r2t=False, first_burst_length=8192, max_burst_length=16384
        ),
        target_operational=OperationalSettings(initial_r2t=False, first_burst_length=8192),
    )
    ini.login()
    assert not ini.params.initial_r2t and ini.params.immediate_data
    clear_ua(ini)
    data = pattern(20480, seed=9)
    out = ini.send(
        ScsiCommand(
            itt=7,
            cdb=write10(0, 40),
            expected_data_transfer_length=len(data),
            cmd_sn=ini.next_cmd_sn(),
            write=True,
            final=False,
            data=data[:4096],
        ),
        DataOut(itt=7, data_sn=0, buffer_offset=4096, final=True, data=data[4096:8192]),
    )
    r2ts = [p for p in out if isinstance(p, R2T)]
    assert len(r2ts) == 1 and r2ts[0].buffer_offset == 8192
    assert r2ts[0].desired_data_transfer_length == 12288
    out = ini.send(
        DataOut(itt=7, ttt=r2ts[0].ttt, buffer_offset=8192, final=True, data=data[8192:])
    )
    assert isinstance(out[0], ScsiResponse) and out[0].status == 0
    assert out[0].exp_data_sn == 1  # one R2T was sent for the command
    assert ini.lu.device.read(0, 40) == data


def test_residual_underflow_and_overflow() -> None:
    ini = Initiator()
    ini.login()
    clear_ua(ini)
    # READ of one block into a 10000-byte buffer: underflow of the difference.
    out = ini.send(
        ScsiCommand(
            itt=8,
            cdb=read10(0, 1),
            expected_data_transfer_length=10000,
            cmd_sn=ini.next_cmd_sn(),
            read=True,
        )
    )
    last = out[-1]
    assert isinstance(last, DataIn) and last.status_present
    assert last.residual_underflow and last.residual_count == 10000 - 512
    # READ of two blocks into one block's room: overflow, and only 512 bytes sent.
    out = ini.send(
        ScsiCommand(
            itt=9,
            cdb=read10(0, 2),
            expected_data_transfer_length=512,
            cmd_sn=ini.next_cmd_sn(),
            read=True,
        )
    )
    assert sum(len(p.data) for p in out if isinstance(p, DataIn)) == 512
    last = out[-1]
    assert isinstance(last, DataIn) and last.residual_overflow and last.residual_count == 512
    # WRITE of two blocks with EDTL of one: only the first block is written (FCP-4 §9.4.2 a).
    ini.lu.device.write(0, b"a" * 1024)
    out = ini.send(
        ScsiCommand(
            itt=10,
            cdb=write10(0, 2),
            expected_data_transfer_length=512,
            cmd_sn=ini.next_cmd_sn(),
            write=True,
            data=b"b" * 512,
        )
    )
    rsp = out[-1]
    assert isinstance(rsp, ScsiResponse) and rsp.status == 0
    assert rsp.residual_overflow and rsp.residual_count == 512
    assert ini.lu.device.read(0, 2) == b"b" * 512 + b"a" * 512


def test_check_condition_carries_sense_in_a_scsi_response() -> None:
    ini = Initiator()
    ini.login()
    clear_ua(ini)
    out = ini.send(
        ScsiCommand(
            itt=11,
            cdb=read10(1 << 30, 1),
            expected_data_transfer_length=512,
            cmd_sn=ini.next_cmd_sn(),
            read=True,
        )
    )
    assert len(out) == 1 and isinstance(out[0], ScsiResponse)
    sense = parse_sense_segment(out[0].data)
    assert out[0].status == 2 and sense[2] & 0x0F == 5 and sense[12] == 0x21


def test_other_luns_are_not_supported_but_report_luns_works() -> None:
    ini = Initiator()
    ini.login()
    clear_ua(ini)
    lun1 = 0x0001_0000_0000_0000
    out = ini.send(ScsiCommand(itt=12, cdb=tur(), lun=lun1, cmd_sn=ini.next_cmd_sn()))
    assert isinstance(out[0], ScsiResponse)
    assert parse_sense_segment(out[0].data)[12:14] == b"\x25\x00"
    report_luns = bytes([0xA0, 0, 0, 0, 0, 0]) + struct.pack(">I", 64) + bytes(6)
    out = ini.send(
        ScsiCommand(
            itt=13,
            cdb=report_luns,
            lun=lun1,
            expected_data_transfer_length=64,
            cmd_sn=ini.next_cmd_sn(),
            read=True,
        )
    )
    data = b"".join(bytes(p.data) for p in out if isinstance(p, DataIn))
    assert data[:4] == struct.pack(">I", 8) and data[8:16] == bytes(8)  # LUN 0 only


def test_nop_out_ping_is_answered_with_echo() -> None:
    ini = Initiator()
    ini.login()
    out = ini.send(NopOut(itt=20, cmd_sn=ini.cmd_sn, immediate=True, data=b"hello"))
    assert isinstance(out[0], NopIn) and out[0].itt == 20 and bytes(out[0].data) == b"hello"


def test_nop_in_ping_and_timeout_with_a_fake_clock() -> None:
    ini = Initiator()
    ini.login()
    limits = ini.conn._limits
    ini.clock.now += limits.nop_interval_s + 1
    out = ini.tick()
    assert len(out) == 1 and isinstance(out[0], NopIn) and out[0].itt == 0xFFFFFFFF
    ping = out[0]
    # Answered: the connection stays.
    ini.send(NopOut(ttt=ping.ttt, cmd_sn=ini.cmd_sn, immediate=True))
    ini.clock.now += 1
    assert ini.tick() == [] and not ini.conn.closed
    # Unanswered: dropped after the timeout.
    ini.clock.now += limits.nop_interval_s + 1
    assert isinstance(ini.tick()[0], NopIn)
    ini.clock.now += limits.nop_timeout_s + 1
    ini.tick()
    assert ini.conn.closed
    assert "NOP-In" in (ini.conn.close_reason or "")


def test_login_timeout_closes() -> None:
    ini = Initiator()
    ini.clock.now += 60
    ini.tick()
    assert ini.conn.closed


def test_send_targets_in_normal_and_discovery_sessions() -> None:
    ini = Initiator()
    ini.login()
    out = ini.send(
        TextRequest(itt=30, cmd_sn=ini.next_cmd_sn(), data=b"SendTargets=\x00", immediate=False)
    )
    assert isinstance(out[0], TextResponse) and out[0].final
    assert ("TargetName", TARGET) in parse_text(out[0].data)

    disc = Initiator(discovery=True)
    disc.login()
    out = disc.send(TextRequest(itt=31, cmd_sn=disc.next_cmd_sn(), data=b"SendTargets=All\x00"))
    pairs = parse_text(out[0].data)
    assert pairs[0] == ("TargetName", TARGET)
    assert pairs[1][0] == "TargetAddress"
    # A discovery session refuses SCSI commands with a Reject.
    out = disc.send(ScsiCommand(itt=32, cdb=tur(), cmd_sn=disc.next_cmd_sn()))
    assert out[0].opcode == 0x3F
