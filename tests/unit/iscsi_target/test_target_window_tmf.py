"""CmdSN window, task management and Reject handling of the sans-IO target connection."""

from __future__ import annotations

import struct

from target_support import Initiator, read10, tur, write10

from blockyard.iscsi.errors import RejectReason
from blockyard.iscsi.pdu import (
    R2T,
    DataIn,
    DataOut,
    NopIn,
    NopOut,
    Reject,
    ScsiCommand,
    ScsiResponse,
    SnackRequest,
    TaskManagementRequest,
    TaskManagementResponse,
    encode_pdu,
)
from blockyard.iscsi.target_session import (
    ExecuteCommand,
    ResetRequested,
    SessionLimits,
    serial_le,
    serial_lt,
)
from blockyard.scsi.lu import ResetKind


def ready(limits: SessionLimits | None = None) -> Initiator:
    ini = Initiator(limits=limits)
    ini.login()
    ini.send(ScsiCommand(itt=1, cdb=tur(), cmd_sn=ini.next_cmd_sn()))  # eat POWER ON UA
    return ini


def test_serial_arithmetic_wraps() -> None:
    assert serial_lt(0xFFFFFFFF, 0)
    assert not serial_lt(0, 0xFFFFFFFF)
    assert serial_le(5, 5) and serial_lt(5, 6)


def test_window_bounds_commands_in_flight() -> None:
    ini = ready(SessionLimits(command_window=4))
    ini.auto_execute = False
    out: list[object] = []
    for i in range(4):
        out += ini.send(
            ScsiCommand(
                itt=100 + i,
                cdb=read10(i, 1),
                expected_data_transfer_length=512,
                cmd_sn=ini.next_cmd_sn(),
                read=True,
            )
        )
    assert len(ini.held) == 4
    # The window is now closed: MaxCmdSN = ExpCmdSN - 1.
    assert ini.conn.max_cmd_sn == (ini.conn.exp_cmd_sn - 1) & 0xFFFFFFFF
    # A fifth command beyond MaxCmdSN is silently ignored (RFC 7143 §4.2.2.1).
    assert ini.send(ScsiCommand(itt=200, cdb=tur(), cmd_sn=ini.cmd_sn)) == []
    assert len(ini.held) == 4
    done = ini.finish_held()
    assert len([p for p in done if isinstance(p, DataIn) and p.status_present]) == 4
    # Completion reopened the window; the same CmdSN is now accepted.
    ini.auto_execute = True
    out = ini.send(ScsiCommand(itt=201, cdb=tur(), cmd_sn=ini.next_cmd_sn()))
    assert isinstance(out[0], ScsiResponse) and out[0].status == 0
    assert serial_lt(ini.conn.exp_cmd_sn, ini.conn.max_cmd_sn)


def test_out_of_order_cmd_sn_waits_for_the_gap() -> None:
    ini = ready()
    first = ini.next_cmd_sn()
    second = ini.next_cmd_sn()
    assert ini.send(ScsiCommand(itt=300, cdb=tur(), cmd_sn=second)) == []
    out = ini.send(ScsiCommand(itt=301, cdb=tur(), cmd_sn=first))
    assert [p.itt for p in out if isinstance(p, ScsiResponse)] == [301, 300]


def test_immediate_commands_are_bounded() -> None:
    ini = ready(SessionLimits(immediate_commands_max=1))
    ini.auto_execute = False
    sn = ini.cmd_sn
    ini.send(ScsiCommand(itt=400, cdb=tur(), cmd_sn=sn, immediate=True))
    out = ini.send(ScsiCommand(itt=401, cdb=tur(), cmd_sn=sn, immediate=True))
    assert isinstance(out[0], Reject)
    assert out[0].reason == RejectReason.IMMEDIATE_COMMAND_REJECTED


def test_abort_task_waiting_for_data() -> None:
    ini = ready()
    out = ini.send(
        ScsiCommand(
            itt=500,
            cdb=write10(0, 8),
            expected_data_transfer_length=4096,
            cmd_sn=ini.next_cmd_sn(),
            write=True,
        )
    )
    assert isinstance(out[0], R2T)
    out = ini.send(
        TaskManagementRequest(
            itt=501,
            function=1,
            referenced_task_tag=500,
            cmd_sn=ini.cmd_sn,
            ref_cmd_sn=ini.cmd_sn - 1,
            immediate=True,
        )
    )
    assert isinstance(out[0], TaskManagementResponse) and out[0].response == 0
    assert ini.conn.tasks_in_flight == 0
    # Late Data-Out for the aborted task is ignored, not rejected.
    assert ini.send(DataOut(itt=500, ttt=out[0].itt, final=True, data=bytes(4096))) in ([],)


def test_abort_task_set_waits_for_running_commands() -> None:
    ini = ready()
    ini.auto_execute = False
    ini.send(
        ScsiCommand(
            itt=600,
            cdb=read10(0, 1),
            expected_data_transfer_length=512,
            cmd_sn=ini.next_cmd_sn(),
            read=True,
        )
    )
    assert len(ini.held) == 1
    out = ini.send(TaskManagementRequest(itt=601, function=2, cmd_sn=ini.cmd_sn, immediate=True))
    assert out == []  # the response waits for the running task
    out = ini.finish_held()
    # The aborted task sends nothing; then the TMF response.
    assert len(out) == 1 and isinstance(out[0], TaskManagementResponse)
    assert out[0].itt == 601


def test_lun_reset_calls_the_logical_unit_and_cold_reset_closes() -> None:
    ini = ready()
    out = ini.send(TaskManagementRequest(itt=700, function=5, cmd_sn=ini.cmd_sn, immediate=True))
    assert isinstance(out[0], TaskManagementResponse) and out[0].response == 0
    assert ini.resets == [ResetRequested(ResetKind.LOGICAL_UNIT)]
    assert ini.lu.pending_unit_attentions(ini.conn.nexus) == (ResetKind.LOGICAL_UNIT,)  # type: ignore[arg-type]
    out = ini.send(TaskManagementRequest(itt=701, function=7, cmd_sn=ini.cmd_sn, immediate=True))
    assert isinstance(out[0], TaskManagementResponse) and out[0].response == 0
    assert ini.resets[-1].cold and ini.conn.closed


def test_unsupported_task_management_functions() -> None:
    ini = ready()
    out = ini.send(TaskManagementRequest(itt=800, function=3, cmd_sn=ini.cmd_sn, immediate=True))
    assert isinstance(out[0], TaskManagementResponse) and out[0].response == 5
    out = ini.send(TaskManagementRequest(itt=801, function=8, cmd_sn=ini.cmd_sn, immediate=True))
    assert isinstance(out[0], TaskManagementResponse) and out[0].response == 4


def test_malformed_pdu_is_rejected_and_the_session_keeps_working() -> None:
    ini = ready()
    bad = bytearray(encode_pdu(ScsiCommand(itt=900, cdb=tur(), cmd_sn=ini.next_cmd_sn())))
    bad[4] = 1  # one AHS word, which is then a truncated AHS
    bad[48:48] = b"\x00\x01\x07\x00"  # AHS of reserved type 7
    out = ini.send_bytes(bytes(bad))
    assert isinstance(out[0], Reject) and out[0].reason == RejectReason.INVALID_PDU_FIELD
    assert bytes(out[0].data[:1]) == b"\x01"
    # The rejected command's CmdSN was consumed; the next one runs.
    out = ini.send(ScsiCommand(itt=901, cdb=tur(), cmd_sn=ini.next_cmd_sn()))
    assert isinstance(out[0], ScsiResponse) and out[0].status == 0


def test_snack_is_rejected_at_erl0_and_bad_data_out_fails_the_task() -> None:
    ini = ready()
    out = ini.send(SnackRequest(itt=1000))
    assert isinstance(out[0], Reject) and out[0].reason == RejectReason.SNACK_REJECT
    out = ini.send(
        ScsiCommand(
            itt=1001,
            cdb=write10(0, 2),
            expected_data_transfer_length=1024,
            cmd_sn=ini.next_cmd_sn(),
            write=True,
        )
    )
    r2t = out[0]
    assert isinstance(r2t, R2T)
    out = ini.send(DataOut(itt=1001, ttt=r2t.ttt, data_sn=3, final=True, data=bytes(1024)))
    assert isinstance(out[0], Reject)
    assert isinstance(out[1], ScsiResponse) and out[1].status == 2
    out = ini.send(NopOut(itt=1002, cmd_sn=ini.cmd_sn, immediate=True))
    assert isinstance(out[0], NopIn)


def test_data_out_bytes_bound_answers_task_set_full() -> None:
    ini = ready(SessionLimits(data_out_bytes_max=4096))
    ini.send(
        ScsiCommand(
            itt=1100,
            cdb=write10(0, 8),
            expected_data_transfer_length=4096,
            cmd_sn=ini.next_cmd_sn(),
            write=True,
        )
    )
    out = ini.send(
        ScsiCommand(
            itt=1101,
            cdb=write10(8, 1),
            expected_data_transfer_length=512,
            cmd_sn=ini.next_cmd_sn(),
            write=True,
        )
    )
    assert isinstance(out[0], ScsiResponse) and out[0].status == 0x28  # TASK SET FULL


def test_execute_events_carry_the_collected_data() -> None:
    ini = ready()
    ini.auto_execute = False
    payload = struct.pack(">I", 0xDEADBEEF) * 128
    ini.send(
        ScsiCommand(
            itt=1200,
            cdb=write10(0, 1),
            expected_data_transfer_length=512,
            cmd_sn=ini.next_cmd_sn(),
            write=True,
            data=payload,
        )
    )
    event = ini.held[0]
    assert isinstance(event, ExecuteCommand)
    assert bytes(event.data_out or b"") == payload
