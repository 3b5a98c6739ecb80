"""SCSI commands on an initiator connection (a mixin of
:class:`~blockyard.attach.initiator.connection.IscsiConnection`): queue slots and the CmdSN
window, the slow path (:meth:`CommandPath.execute`) and the synchronous fast path
(:meth:`CommandPath.start_command`) with its deadline sweep, immediate and unsolicited data and
Data-Out answering R2Ts (RFC 7143 §11.7, §11.8), and the receive side: Data-In reassembly into
the caller's buffer and the SCSI Response that completes a task.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from blockyard.attach.initiator.connection_types import (
    _SN_MASK,
    CommandOutcome,
    _broadcast,
    _retrieve,
    _Task,
)
from blockyard.attach.initiator.errors import CommandTimeoutError, PathFailedError
from blockyard.attach.initiator.scsi import Sense, parse_sense
from blockyard.blockdev import BytesLike
from blockyard.iscsi.errors import RemoteProtocolError
from blockyard.iscsi.negotiation import NegotiatedParameters
from blockyard.iscsi.pdu import (
    R2T,
    RESERVED_TAG,
    DataIn,
    DataOut,
    ScsiCommand,
    ScsiResponse,
    ScsiResponseCode,
    parse_sense_segment,
)
from blockyard.iscsi.target_session import serial_le

if TYPE_CHECKING:
    from blockyard.attach.initiator.connection_types import _ConnectionParts
else:
    _ConnectionParts = object


class CommandPath(_ConnectionParts):
    """SCSI commands of the connection; uses the connection's state
    (declared in ``_ConnectionParts`` and below)."""

    if TYPE_CHECKING:
        _params: NegotiatedParameters
        _lun_field: int
        _writable: bool
        _writable_changed: asyncio.Event
        _free_slots: int
        _slot_waiters: int
        _slot_freed: asyncio.Event
        _fast: dict[int, _Task]
        _sweeper: asyncio.TimerHandle | None

        async def _abort_quietly(self, task: _Task) -> None: ...
        async def _abort_task(self, task: _Task, timeout: float) -> CommandOutcome: ...

    async def execute(
        self,
        cdb: bytes,
        *,
        data_out: BytesLike | None = None,
        read_length: int = 0,
        read_into: memoryview | None = None,
        timeout_s: float | None = None,
    ) -> CommandOutcome:
        """Run one SCSI command and return the target's status, sense and Data-In.

        Data-In lands in ``read_into`` when given (its length is the expected length), else in
        a fresh buffer of ``read_length`` bytes returned as ``data``. Waits for a queue slot
        and the CmdSN window within the same ``timeout_s`` (default ``command_timeout_s``).
        Raises :class:`CommandTimeoutError` after aborting the task on timeout, and
        :class:`PathFailedError` when the connection is or becomes unusable.
        """
        timeout = self.settings.command_timeout_s if timeout_s is None else timeout_s
        deadline = self._loop.time() + timeout
        self._check_alive()
        if self._free_slots <= 0 or self._slot_waiters:
            self._slot_waiters += 1
            try:
                async with asyncio.timeout_at(deadline):
                    while self._free_slots <= 0:
                        self._check_alive()
                        await self._slot_freed.wait()
            except TimeoutError as exc:
                raise CommandTimeoutError(
                    f"no command slot free on {self._where()} within {timeout} s"
                ) from exc
            finally:
                self._slot_waiters -= 1
        self._free_slots -= 1
        try:
            return await self._execute(cdb, data_out, read_length, read_into, deadline, timeout)
        finally:
            self._release_slot()

    def _release_slot(self) -> None:
        self._free_slots += 1
        if self._slot_waiters:
            self._slot_freed = _broadcast(self._slot_freed)

    def start_command(
        self,
        cdb: bytes,
        data_out: memoryview | None,
        read_length: int,
        read_into: memoryview | None,
        on_done: Callable[[_Task], None],
        on_timeout: Callable[[_Task], None],
    ) -> _Task | None:
        """The synchronous fast path of :meth:`execute`: send the command now if a queue slot
        is free, the CmdSN window is open and the transport takes data; else return None (the
        caller then uses :meth:`execute`, which waits for those). Raises PathFailedError when
        the connection is unusable.

        When the task ends, its slot and ITT are released and ``on_done(task)`` is called on
        the loop, synchronously, with ``task.future`` done (outcome, or PathFailedError /
        CommandRejectedError / cancelled). After ``command_timeout_s`` without an answer,
        ``on_timeout(task)`` is called instead and ``on_done`` never: the caller must then
        :meth:`abort_timed_out` the task. ``data_out`` must be a flat byte view.
        """
        self._check_alive()
        if (
            self._free_slots <= 0
            or self._slot_waiters
            or not self._writable
            or not serial_le(self._cmd_sn, self._max_cmd_sn)
        ):
            return None
        self._free_slots -= 1
        out = data_out if data_out is not None and data_out.nbytes else None
        owns = False
        buffer = read_into
        if buffer is None and read_length:
            buffer = memoryview(bytearray(read_length))
            owns = True
        loop = self._loop
        task = _Task(
            self._next_itt(), self._cmd_sn, self._lun_field, buffer, out, loop.create_future(),
            owns, 0, False, on_done, on_timeout, loop.time() + self.settings.command_timeout_s,
        )  # fmt: skip
        self._cmd_sn = (self._cmd_sn + 1) & _SN_MASK
        self._tasks[task.itt] = task
        self._fast[task.itt] = task
        if self._sweeper is None:
            self._sweeper = loop.call_at(task.deadline, self._sweep)
        try:
            self._send_command(task, cdb)
        except PathFailedError:
            # The transport is going away (a failure is being reported): undo, the caller
            # takes the slow path, which sees the failed connection.
            task.on_done = None
            task.future.cancel()
            self._fast.pop(task.itt, None)
            self._tasks.pop(task.itt, None)
            self._release_slot()
            raise
        return task

    def _settled(self, task: _Task) -> None:
        """``task.future`` was just resolved: finish a fast-path task (release its slot and
        ITT unless an abort owns them, then tell its owner)."""
        on_done = task.on_done
        if on_done is None:
            return
        task.on_done = None
        _retrieve(task.future)
        if task.aborting:
            return  # the abort releases the ITT and the slot
        self._fast.pop(task.itt, None)
        self._tasks.pop(task.itt, None)
        self._release_slot()
        on_done(task)

    def _sweep(self) -> None:
        """Fire the timeouts of fast-path tasks whose deadline passed; re-arm for the next."""
        self._sweeper = None
        now = self._loop.time()
        expired: list[_Task] = []
        for task in self._fast.values():
            if task.deadline > now:
                self._sweeper = self._loop.call_at(task.deadline, self._sweep)
                break
            expired.append(task)
        for task in expired:
            del self._fast[task.itt]
            on_timeout = task.on_timeout
            if task.future.done() or task.aborting or on_timeout is None:
                continue
            # From here on the ITT stays reserved until the target has let go of the task.
            task.aborting = True
            on_timeout(task)

    async def abort_timed_out(self, task: _Task) -> CommandOutcome:
        """ABORT TASK for a fast-path task whose timer fired; always raises
        (CommandTimeoutError, or PathFailedError when the abort is not answered)."""
        try:
            return await self._abort_task(task, self.settings.command_timeout_s)
        finally:
            self._release_slot()

    def cancel_command(self, task: _Task) -> None:
        """The caller gave up on a fast-path task: abort it in the background; its ITT and
        buffer are released only once the target has let go of it."""
        if task.future.done() or task.aborting:
            return
        task.aborting = True
        self._fast.pop(task.itt, None)
        self._spawn(self._abort_fast_quietly(task))

    async def _abort_fast_quietly(self, task: _Task) -> None:
        try:
            await self._abort_quietly(task)
        finally:
            self._release_slot()

    async def _execute(
        self,
        cdb: bytes,
        data_out: BytesLike | None,
        read_length: int,
        read_into: memoryview | None,
        deadline: float,
        timeout: float,
    ) -> CommandOutcome:
        try:
            async with asyncio.timeout_at(deadline):
                while True:
                    self._check_alive()
                    if self._writable and serial_le(self._cmd_sn, self._max_cmd_sn):
                        break
                    wait_for = self._window_event() if self._writable else self._writable_changed
                    await wait_for.wait()
        except TimeoutError as exc:
            raise CommandTimeoutError(
                f"the CmdSN window of {self._where()} stayed closed for {timeout} s"
            ) from exc
        out = None
        if data_out is not None and len(data_out):
            out = data_out if isinstance(data_out, memoryview) else memoryview(data_out)
            out = out.cast("B") if out.format != "B" or out.ndim != 1 else out
        owns = False
        buffer = read_into
        if buffer is None and read_length:
            buffer = memoryview(bytearray(read_length))
            owns = True
        task = _Task(
            itt=self._next_itt(),
            cmd_sn=self._cmd_sn,
            lun=self._lun_field,
            buffer=buffer,
            data_out=out,
            future=self._new_future(),
            owns_buffer=owns,
        )
        self._cmd_sn = (self._cmd_sn + 1) & _SN_MASK
        self._tasks[task.itt] = task
        self._send_command(task, cdb)
        try:
            async with asyncio.timeout_at(deadline):
                return await asyncio.shield(task.future)
        except TimeoutError:
            return await self._abort_task(task, timeout)
        except asyncio.CancelledError:
            if not task.future.done():
                # The caller gave up: abort in the background so the ITT (and the caller's
                # buffer) is released only once the target has let go of the task.
                task.aborting = True
                self._spawn(self._abort_quietly(task))
            raise
        finally:
            if task.future.done() and not task.aborting:
                self._tasks.pop(task.itt, None)

    def _send_command(self, task: _Task, cdb: bytes) -> None:
        params = self._params
        out = task.data_out
        edtl = task.buffer.nbytes if task.buffer is not None else (out.nbytes if out else 0)
        immediate: BytesLike = b""
        unsolicited_end = 0
        if out is not None:
            first_burst = min(params.first_burst_length, out.nbytes)
            if params.immediate_data:
                immediate_len = min(first_burst, params.max_xmit_data_segment_length)
                immediate = out[:immediate_len]
                unsolicited_end = immediate_len
            if not params.initial_r2t:
                unsolicited_end = first_burst
        immediate_len = len(immediate)
        more_unsolicited = unsolicited_end > immediate_len
        self._send(
            ScsiCommand(
                itt=task.itt,
                cdb=cdb,
                lun=task.lun,
                expected_data_transfer_length=edtl,
                cmd_sn=task.cmd_sn,
                exp_stat_sn=self._exp_stat_sn,
                final=not more_unsolicited,
                read=task.buffer is not None,
                write=out is not None,
                data=immediate,
            )
        )
        if out is not None and more_unsolicited:
            # RFC 7143 §11.7: unsolicited Data-Out uses TTT 0xffffffff, up to FirstBurstLength.
            self._send_data_out(task, out, RESERVED_TAG, immediate_len, unsolicited_end)

    def _send_data_out(self, task: _Task, out: memoryview, ttt: int, start: int, end: int) -> None:
        step = self._params.max_xmit_data_segment_length
        data_sn = 0
        offset = start
        while offset < end:
            length = min(step, end - offset)
            self._send(
                DataOut(
                    itt=task.itt,
                    ttt=ttt,
                    lun=task.lun,
                    exp_stat_sn=self._exp_stat_sn,
                    data_sn=data_sn,
                    buffer_offset=offset,
                    final=offset + length >= end,
                    data=out[offset : offset + length],
                )
            )
            data_sn += 1
            offset += length

    # ---- receive side -------------------------------------------------------------------

    def _on_data_in(self, pdu: DataIn) -> None:
        task = self._tasks.get(pdu.itt)
        if task is None or task.aborting:
            return  # an aborted task's straggler: its buffer may already be the caller's again
        data = pdu.data
        length = len(data)
        buffer = task.buffer
        offset = pdu.buffer_offset
        if length:
            if buffer is None or offset + length > buffer.nbytes:
                raise RemoteProtocolError(
                    f"Data-In for ITT {pdu.itt:#x} at offset {offset} (+{length}) overruns the "
                    "expected transfer length (RFC 7143 §11.7.2)",
                    fatal=True,
                )
            buffer[offset : offset + length] = data
            task.received += length
        if pdu.status_present:
            self._status_sn(pdu.stat_sn)
            self._complete(task, pdu.status, None)

    def _on_response(self, pdu: ScsiResponse) -> None:
        task = self._tasks.get(pdu.itt)
        if task is None:
            return
        if pdu.response != ScsiResponseCode.COMMAND_COMPLETED_AT_TARGET:
            # RFC 7143 §11.4.3: the target failed the command as a transport; re-issue.
            if not task.future.done():
                task.future.set_exception(
                    PathFailedError(f"target failure response {pdu.response:#x} on a command")
                )
                self._settled(task)
            return
        sense = parse_sense(parse_sense_segment(pdu.data)) if len(pdu.data) else None
        self._complete(task, pdu.status, sense)

    def _complete(self, task: _Task, status: int, sense: Sense | None) -> None:
        if task.future.done():
            return
        data = b""
        if task.owns_buffer and task.buffer is not None:
            data = bytes(task.buffer[: task.received])
        task.future.set_result(CommandOutcome(status, sense, data, task.received))
        self._settled(task)

    def _on_r2t(self, pdu: R2T) -> None:
        task = self._tasks.get(pdu.itt)
        if task is None or task.aborting:
            return
        out = task.data_out
        end = pdu.buffer_offset + pdu.desired_data_transfer_length
        if out is None or end > out.nbytes or pdu.desired_data_transfer_length == 0:
            raise RemoteProtocolError(
                f"R2T for ITT {pdu.itt:#x} asks for bytes {pdu.buffer_offset}..{end} the "
                "command does not have (RFC 7143 §11.8.4)",
                fatal=True,
            )
        self._send_data_out(task, out, pdu.ttt, pdu.buffer_offset, end)
