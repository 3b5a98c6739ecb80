"""Task management and Logout (a mixin of
:class:`~blockyard.iscsi.target_session.TargetConnection`): aborts, resets and logging out
end tasks, and their responses are held until the tasks still executing are gone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from blockyard.iscsi.errors import RejectReason
from blockyard.iscsi.negotiation import NegotiatedParameters
from blockyard.iscsi.pdu import (
    LogoutReason,
    LogoutRequest,
    LogoutResponse,
    LogoutResponseCode,
    Pdu,
    TaskManagementFunction,
    TaskManagementRequest,
    TaskManagementResponse,
    TaskManagementResponseCode,
)
from blockyard.iscsi.target_cdb import _decode_lun
from blockyard.iscsi.target_types import (
    ConnectionState,
    Event,
    ResetRequested,
    _Deferred,
    _Task,
    serial_le,
)
from blockyard.scsi.lu import ResetKind

#: Logout Response Time2Retain at ErrorRecoveryLevel 0: nothing is kept for reinstatement.
LOGOUT_TIME2RETAIN_ERL0 = 0


class TaskManagement:
    """TMF and Logout requests; uses the connection's state (declared below)."""

    if TYPE_CHECKING:
        _by_itt: dict[int, int]
        _cid: int
        _deferred: list[_Deferred]
        _discovery: bool
        _events: list[Event]
        _exp_cmd_sn: int
        _logging_out: bool
        _max_cmd_sn: int
        _params: NegotiatedParameters
        _queued: dict[int, Pdu]
        _state: ConnectionState
        _tasks: dict[int, _Task]

        def _close(self, reason: str) -> None: ...
        def _forget(self, task: _Task) -> None: ...
        def _next_stat_sn(self) -> int: ...
        def _reject_pdu(self, reason: RejectReason, pdu: Pdu) -> None: ...
        def _remember_dropped(self, itt: int) -> None: ...
        def _send(self, pdu: Pdu) -> None: ...
        def _window(self) -> int: ...

    # ---- task management ------------------------------------------------------------------

    def _on_tmf(self, req: TaskManagementRequest) -> None:
        if self._discovery:
            self._reject_pdu(RejectReason.PROTOCOL_ERROR, req)
            return
        fn = req.function
        lun = _decode_lun(req.lun)
        waiting: set[int] = set()
        events: list[Event] = []
        close_after: str | None = None
        response = TaskManagementResponseCode.FUNCTION_COMPLETE
        if fn == TaskManagementFunction.ABORT_TASK:
            task_id = self._by_itt.get(req.referenced_task_tag)
            task = self._tasks.get(task_id) if task_id is not None else None
            if task is not None and task.cmd.lun == req.lun:
                waiting = self._abort_tasks([task])
            elif serial_le(self._exp_cmd_sn, req.ref_cmd_sn) and serial_le(
                req.ref_cmd_sn, self._max_cmd_sn
            ):
                # RFC 7143 §11.6.1 (b): a CmdSN in the window that we have not run counts as
                # received and done; if it is queued it never runs.
                self._queued.pop(req.ref_cmd_sn, None)
            else:
                # RFC 7143 §11.6.1 (c): outside the window, the task does not exist (it
                # finished or never was).
                response = TaskManagementResponseCode.TASK_DOES_NOT_EXIST
        elif fn in (
            TaskManagementFunction.ABORT_TASK_SET,
            TaskManagementFunction.CLEAR_TASK_SET,
            TaskManagementFunction.LOGICAL_UNIT_RESET,
        ):
            if lun != 0:
                response = TaskManagementResponseCode.LUN_DOES_NOT_EXIST
            else:
                waiting = self._abort_tasks(list(self._tasks.values()))
                if fn == TaskManagementFunction.LOGICAL_UNIT_RESET:
                    events.append(ResetRequested(ResetKind.LOGICAL_UNIT))
        elif fn in (
            TaskManagementFunction.TARGET_WARM_RESET,
            TaskManagementFunction.TARGET_COLD_RESET,
        ):
            waiting = self._abort_tasks(list(self._tasks.values()))
            cold = fn == TaskManagementFunction.TARGET_COLD_RESET
            events.append(
                ResetRequested(ResetKind.TARGET_COLD if cold else ResetKind.TARGET_WARM, cold)
            )
            if cold:
                close_after = "TARGET COLD RESET (RFC 7143 §11.5.1)"
        elif fn == TaskManagementFunction.TASK_REASSIGN:
            # RFC 7143 §11.6.1: reassignment needs ErrorRecoveryLevel 2.
            response = TaskManagementResponseCode.REASSIGNMENT_NOT_SUPPORTED
        else:
            response = TaskManagementResponseCode.FUNCTION_NOT_SUPPORTED
        self._events.extend(events)
        pdu = TaskManagementResponse(itt=req.itt, response=response)
        self._deferred.append(_Deferred(waiting, pdu, close_after))
        self._settle_deferred()

    def _abort_tasks(self, tasks: Sequence[_Task]) -> set[int]:
        """Drop the tasks; return the ids still executing, whose end the response awaits
        (SAM-5 §7.2: an aborted task gets no response, and the TMF response comes last)."""
        waiting: set[int] = set()
        for task in tasks:
            task.aborted = True
            self._remember_dropped(task.cmd.itt)
            if task.executing:
                waiting.add(task.task_id)
            else:
                self._forget(task)
        return waiting

    def _settle_deferred(self) -> None:
        """Send held TMF/Logout responses, in order, once their tasks are gone."""
        while self._deferred and self._state is ConnectionState.FULL_FEATURE:
            head = self._deferred[0]
            head.waiting &= set(self._tasks)
            if head.waiting:
                return
            self._deferred.pop(0)
            pdu = head.pdu
            if isinstance(pdu, TaskManagementResponse):
                pdu = TaskManagementResponse(
                    itt=pdu.itt,
                    response=pdu.response,
                    stat_sn=self._next_stat_sn(),
                    exp_cmd_sn=self._exp_cmd_sn,
                    max_cmd_sn=self._window(),
                )
            else:
                pdu = LogoutResponse(
                    itt=pdu.itt,
                    response=pdu.response,
                    stat_sn=self._next_stat_sn(),
                    exp_cmd_sn=self._exp_cmd_sn,
                    max_cmd_sn=self._window(),
                    time2wait=pdu.time2wait,
                    time2retain=pdu.time2retain,
                )
            self._send(pdu)
            if head.close_after is not None:
                self._close(head.close_after)

    # ---- logout ---------------------------------------------------------------------------

    def _on_logout(self, req: LogoutRequest) -> None:
        reason = req.reason
        code = LogoutResponseCode.CLOSED_SUCCESSFULLY
        if reason == LogoutReason.REMOVE_CONNECTION_FOR_RECOVERY:
            code = LogoutResponseCode.RECOVERY_NOT_SUPPORTED
        elif reason == LogoutReason.CLOSE_CONNECTION and req.cid != self._cid:
            code = LogoutResponseCode.CID_NOT_FOUND
        elif reason not in (LogoutReason.CLOSE_SESSION, LogoutReason.CLOSE_CONNECTION):
            self._reject_pdu(RejectReason.INVALID_PDU_FIELD, req)
            return
        pdu = LogoutResponse(
            itt=req.itt,
            response=code,
            time2wait=self._params.default_time2wait,
            time2retain=LOGOUT_TIME2RETAIN_ERL0,
        )
        if code != LogoutResponseCode.CLOSED_SUCCESSFULLY:
            self._deferred.append(_Deferred(set(), pdu))
            self._settle_deferred()
            return
        # RFC 7143 §11.14: logging out ends every task of the (single-connection) session;
        # queued ones are dropped, running ones finish before the response goes out.
        self._logging_out = True
        self._queued.clear()
        waiting = self._abort_tasks(list(self._tasks.values()))
        self._deferred.append(_Deferred(waiting, pdu, close_after="logged out"))
        self._settle_deferred()
