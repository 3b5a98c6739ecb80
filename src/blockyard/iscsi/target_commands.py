"""SCSI Command PDUs on the general path (a mixin of
:class:`~blockyard.iscsi.target_session.TargetConnection`): admission and the transport's own
answers (unsupported LUN, overflow, TASK SET FULL), Data-Out collection with R2Ts, immediate
and unsolicited data (:class:`~blockyard.iscsi.target_task.WriteTransfer`), the
:class:`~blockyard.iscsi.target_session.ExecuteCommand` event, and the Data-In or SCSI
Response that reports the outcome.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator
from typing import TYPE_CHECKING

from blockyard.blockdev import BytesLike
from blockyard.iscsi.errors import RejectReason
from blockyard.iscsi.negotiation import NegotiatedParameters
from blockyard.iscsi.pdu import (
    R2T,
    RESERVED_TAG,
    DataIn,
    DataOut,
    Pdu,
    ScsiCommand,
    ScsiResponse,
    ScsiResponseCode,
    sense_segment,
)
from blockyard.iscsi.target_cdb import _TRANSPARENT_OPS, _decode_lun, _span_of, _truncate_write
from blockyard.iscsi.target_task import DataOutError, WriteTransfer, data_in_plan
from blockyard.iscsi.target_types import (
    CommandInspector,
    ConnectionState,
    Event,
    ExecuteCommand,
    SessionLimits,
    _Task,
)
from blockyard.scsi.commands import CommandInfo, Direction
from blockyard.scsi.constants import AscPair, Op, SenseKey, Status
from blockyard.scsi.nexus import Nexus
from blockyard.scsi.sense import ScsiResult, check_condition

log = logging.getLogger("blockyard.iscsi.target")

#: SAM-5 / SPC-4 additional sense codes the transport itself reports.
LOGICAL_UNIT_NOT_SUPPORTED: AscPair = (0x25, 0x00)  # SPC-4 Annex D
INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT: AscPair = (0x0E, 0x03)  # SPC-4 Annex D
DATA_PHASE_ERROR: AscPair = (0x4B, 0x00)  # SPC-4 Annex D
#: SPC-4 §6.6.2: peripheral qualifier 011b + device type 1Fh = "no logical unit here".
_NO_LU_INQUIRY = bytes([0x7F, 0, 0x06, 0x12, 31]) + bytes(31)
#: Data-Out collected beyond what the CDB needs, so the logical unit sees an over-long buffer
#: for commands that require an exact one; the excess is dropped.
DATA_OUT_SLACK_BYTES = 4096
#: ITTs of dropped tasks remembered so their straggling Data-Out is ignored, not rejected.
RECENT_DROPPED_ITTS_MAX = 256
#: Commands any LUN may receive: REPORT LUNS (SPC-4 §6.33) and INQUIRY (SPC-4 §6.6.1).
_ANY_LUN_OPS = frozenset({Op.REPORT_LUNS, Op.INQUIRY})


class CommandPath:
    """SCSI commands through tasks and events; uses the connection's state (declared below)."""

    if TYPE_CHECKING:
        _buffered_bytes: int
        _by_itt: dict[int, int]
        _discovery: bool
        _dropped_itts: OrderedDict[int, None]
        _events: list[Event]
        _exp_cmd_sn: int
        _fences: int
        _immediate_in_flight: int
        _inspector: CommandInspector | None
        _limits: SessionLimits
        _nexus: Nexus | None
        _nonimmediate_in_flight: int
        _params: NegotiatedParameters
        _promised_bytes: int
        _spans: dict[int, tuple[int, int]]
        _stat_sn: int
        _state: ConnectionState
        _task_ids: Iterator[int]
        _tasks: dict[int, _Task]
        _ttts: Iterator[int]

        def _next_stat_sn(self) -> int: ...
        def _reject_pdu(self, reason: RejectReason, pdu: Pdu) -> None: ...
        def _send(self, pdu: Pdu) -> None: ...
        def _window(self) -> int: ...

    def _on_command(self, cmd: ScsiCommand) -> None:
        if self._discovery:
            # RFC 7143 §4.3: a Discovery session carries only Text and Logout requests.
            self._reject_pdu(RejectReason.PROTOCOL_ERROR, cmd)
            return
        if cmd.itt in self._by_itt or cmd.itt == RESERVED_TAG:
            self._reject_pdu(RejectReason.TASK_IN_PROGRESS, cmd)
            return
        if cmd.immediate and self._immediate_in_flight >= self._limits.immediate_commands_max:
            self._reject_pdu(RejectReason.IMMEDIATE_COMMAND_REJECTED, cmd)
            return
        params = self._params
        immediate_data = cmd.data
        if len(immediate_data) and (not params.immediate_data or not cmd.write):
            # RFC 7143 §13.11: immediate data only with ImmediateData=Yes, and only for writes.
            self._reject_pdu(RejectReason.PROTOCOL_ERROR, cmd)
            return
        unsolicited_pending = cmd.write and not cmd.final and not params.initial_r2t
        edtl = cmd.expected_data_transfer_length
        local: ScsiResult | None = None
        needed = 0
        info: CommandInfo | None = None
        lun = _decode_lun(cmd.lun)
        opcode = cmd.cdb[0]
        if (
            self._inspector is None
            or lun is None
            or (lun != 0 and (opcode not in _ANY_LUN_OPS or cmd.cdb[1] & 0x01))
        ):
            local = check_condition(SenseKey.ILLEGAL_REQUEST, LOGICAL_UNIT_NOT_SUPPORTED)
        elif lun != 0 and opcode == Op.INQUIRY:
            local = ScsiResult(Status.GOOD, None, _NO_LU_INQUIRY)
        elif cmd.read and cmd.write and cmd.bidi_read_expected_length is not None:
            local = check_condition(
                SenseKey.ILLEGAL_REQUEST, INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT
            )
        else:
            info = self._inspector.inspect(cmd.cdb)
            if info.error is not None:
                info = None  # refused as is: nothing is solicited (see CommandInfo)
            elif info.direction is Direction.WRITE:
                needed = info.data_out_bytes
        overflow = underflow = 0
        cdb = bytes(cmd.cdb)
        wanted = 0
        if needed and not cmd.write:
            # RFC 7143 §11.3.1: data-out needs the W bit; without it nothing can move.
            local = check_condition(
                SenseKey.ILLEGAL_REQUEST, INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT
            )
        elif needed > edtl:
            # FCP-4 §9.4.2 a), which libiscsi and Linux expect of iSCSI targets too: process
            # the command but transfer nothing past EDTL; O reports the shortfall.
            overflow = needed - edtl
            truncated = _truncate_write(cdb, edtl, needed)
            if truncated is not None:
                cdb, wanted = truncated
            else:
                wanted = edtl  # the logical unit refuses a short parameter list itself
        elif cmd.write:
            underflow = edtl - needed
            # Collect a little past the need so the logical unit can refuse commands whose
            # data must match exactly (WRITE SAME, COMPARE AND WRITE).
            wanted = min(edtl, needed + DATA_OUT_SLACK_BYTES) if info is not None else 0
        solicit = local is None and wanted > 0
        if solicit and self._buffered_bytes + wanted > self._limits.data_out_bytes_max:
            local = ScsiResult(Status.TASK_SET_FULL)
            solicit = False
        if not solicit:
            wanted = 0
        transfer: WriteTransfer | None = None
        if cmd.write:
            try:
                transfer = WriteTransfer.start(
                    edtl=edtl,
                    wanted=wanted,
                    solicit=solicit,
                    immediate=immediate_data,
                    unsolicited_pending=unsolicited_pending,
                    first_burst=params.first_burst_length,
                    max_burst=params.max_burst_length,
                    max_outstanding_r2t=params.max_outstanding_r2t,
                )
            except DataOutError:
                self._reject_pdu(RejectReason.PROTOCOL_ERROR, cmd)
                return
        task = _Task(
            task_id=next(self._task_ids),
            cmd=cmd,
            immediate=cmd.immediate,
            transfer=transfer,
            local_result=local,
            residual_overflow=overflow,
            residual_underflow=underflow,
            buffered_bytes=wanted,
            cdb=cdb,
        )
        self._tasks[task.task_id] = task
        self._by_itt[cmd.itt] = task.task_id
        span = _span_of(cdb)
        if span is not None:
            task.span = span
            self._spans[task.task_id] = span
        elif opcode not in _TRANSPARENT_OPS:
            task.fence = True
            self._fences += 1
        self._buffered_bytes += wanted
        if task.immediate:
            self._immediate_in_flight += 1
        else:
            self._nonimmediate_in_flight += 1
        self._advance(task)

    def _advance(self, task: _Task) -> None:
        """Send the R2Ts the task may have open, or start it once all its data is in."""
        transfer = task.transfer
        if transfer is not None:
            for r2t in transfer.next_r2ts(self._ttts):
                self._send(
                    R2T(
                        itt=task.cmd.itt,
                        ttt=r2t.ttt,
                        lun=task.cmd.lun,
                        stat_sn=self._stat_sn,
                        exp_cmd_sn=self._exp_cmd_sn,
                        max_cmd_sn=self._window(),
                        r2t_sn=r2t.r2t_sn,
                        buffer_offset=r2t.offset,
                        desired_data_transfer_length=r2t.length,
                    )
                )
            if not transfer.complete:
                return
        if task.local_result is not None:
            self._respond(task, task.local_result)
            return
        nexus = self._nexus
        assert nexus is not None
        data_out: BytesLike | None = None
        if transfer is not None and transfer.wanted:
            data_out = transfer.buffer
        task.executing = True
        if task.cmd.read:
            task.promised_bytes = task.cmd.expected_data_transfer_length
            self._promised_bytes += task.promised_bytes
        self._events.append(ExecuteCommand(task.task_id, task.cdb, data_out, nexus))

    def _on_data_out(self, pdu: DataOut) -> None:
        task_id = self._by_itt.get(pdu.itt)
        task = self._tasks.get(task_id) if task_id is not None else None
        if task is None or task.transfer is None or task.executing:
            if pdu.itt in self._dropped_itts:
                return  # stragglers of a task we aborted or failed
            self._reject_pdu(RejectReason.INVALID_PDU_FIELD, pdu)
            return
        transfer = task.transfer
        try:
            if pdu.ttt == RESERVED_TAG:
                transfer.unsolicited(pdu.buffer_offset, pdu.data_sn, pdu.final, pdu.data)
            else:
                transfer.solicited(pdu.ttt, pdu.buffer_offset, pdu.data_sn, pdu.final, pdu.data)
        except DataOutError as exc:
            # ERL 0 cannot ask for the data again: reject the PDU and end the task with
            # DATA PHASE ERROR, ignoring the rest of its Data-Out.
            log.info("failing task ITT %#x: %s", pdu.itt, exc)
            self._reject_pdu(exc.reject_reason or RejectReason.PROTOCOL_ERROR, pdu)
            self._respond(task, check_condition(SenseKey.ABORTED_COMMAND, DATA_PHASE_ERROR))
            self._remember_dropped(pdu.itt)
            return
        self._advance(task)

    def _remember_dropped(self, itt: int) -> None:
        self._dropped_itts[itt] = None
        self._dropped_itts.move_to_end(itt)
        while len(self._dropped_itts) > RECENT_DROPPED_ITTS_MAX:
            self._dropped_itts.popitem(last=False)

    def _forget(self, task: _Task) -> None:
        if self._tasks.pop(task.task_id, None) is None:
            return
        if task.span is not None:
            del self._spans[task.task_id]
        elif task.fence:
            self._fences -= 1
        if self._by_itt.get(task.cmd.itt) == task.task_id:
            del self._by_itt[task.cmd.itt]
        self._buffered_bytes -= task.buffered_bytes
        self._promised_bytes -= task.promised_bytes
        task.transfer = None
        if task.immediate:
            self._immediate_in_flight -= 1
        else:
            self._nonimmediate_in_flight -= 1

    def _respond(self, task: _Task, result: ScsiResult) -> None:
        """Data-In (status in the last PDU when there is no sense) or a SCSI Response."""
        cmd = task.cmd
        transfer = task.transfer
        r2t_count = transfer.r2t_sn if transfer is not None else 0
        self._forget(task)
        if self._state is not ConnectionState.FULL_FEATURE:
            return
        edtl = cmd.expected_data_transfer_length
        data = result.data_in
        overflow, underflow = task.residual_overflow, task.residual_underflow
        payload: memoryview | None = None
        if data is not None and len(data) and not cmd.write:
            view = data if isinstance(data, memoryview) else memoryview(data)
            length = view.nbytes
            send = min(length, edtl) if cmd.read else 0
            overflow, underflow = max(0, length - send), max(0, edtl - length)
            payload = view[:send] if send else None
        elif cmd.read and not cmd.write:
            underflow = edtl
        status = result.status
        sense = result.sense
        status_in_data = sense is None and status in (Status.GOOD, Status.CONDITION_MET)
        data_sn = 0
        if payload is not None:
            p = self._params
            plan = data_in_plan(payload.nbytes, p.max_xmit_data_segment_length, p.max_burst_length)
            for item in plan:
                with_status = item.last and status_in_data
                self._send(
                    DataIn(
                        itt=cmd.itt,
                        ttt=RESERVED_TAG,
                        lun=cmd.lun,
                        stat_sn=self._next_stat_sn() if with_status else 0,
                        exp_cmd_sn=self._exp_cmd_sn,
                        max_cmd_sn=self._window(),
                        data_sn=data_sn,
                        buffer_offset=item.offset,
                        residual_count=(overflow or underflow) if with_status else 0,
                        status=int(status) if with_status else 0,
                        final=item.final,
                        status_present=with_status,
                        residual_overflow=with_status and overflow > 0,
                        residual_underflow=with_status and overflow == 0 and underflow > 0,
                        data=payload[item.offset : item.offset + item.length],
                    )
                )
                data_sn += 1
            if status_in_data:
                return
        self._send(
            ScsiResponse(
                itt=cmd.itt,
                status=int(status),
                response=ScsiResponseCode.COMMAND_COMPLETED_AT_TARGET,
                stat_sn=self._next_stat_sn(),
                exp_cmd_sn=self._exp_cmd_sn,
                max_cmd_sn=self._window(),
                # RFC 7143 §11.4.6: the number of R2T and Data-In PDUs sent for the command.
                exp_data_sn=data_sn if payload is not None else r2t_count,
                residual_overflow=overflow > 0,
                residual_underflow=overflow == 0 and underflow > 0,
                residual_count=overflow or underflow,
                data=sense_segment(sense) if sense is not None else b"",
            )
        )
