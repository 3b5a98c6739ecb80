"""The fast path (a mixin of :class:`~blockyard.iscsi.target_session.TargetConnection`):
plain READ/WRITE (10)/(16) decoded from the raw BHS, run on the logical unit at once and
answered with headers packed directly; adjacent writes merged into one device write. What it
declines goes back to the general path through the decoder.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import TYPE_CHECKING

from blockyard.blockdev import BytesLike
from blockyard.iscsi.errors import RemoteProtocolError
from blockyard.iscsi.pdu import (
    BHS_LENGTH,
    DATA_IN_BHS,
    INITIATOR_OPCODES,
    RESERVED_TAG,
    SCSI_COMMAND_FIELDS,
    SCSI_RESPONSE_BHS,
    Opcode,
    Pdu,
    ScsiCommand,
    decode_pdu,
)
from blockyard.iscsi.target_cdb import _overlaps, _span_of
from blockyard.iscsi.target_types import (
    _SN_HALF,
    _SN_MASK,
    AwaitWrite,
    Event,
    FastCommandUnit,
    _Deferred,
    _Task,
)
from blockyard.scsi.constants import Op
from blockyard.scsi.lu import WOULD_BLOCK, PendingWrite
from blockyard.scsi.nexus import Nexus
from blockyard.scsi.sense import ScsiResult

#: Adjacent fast-path writes that arrived together are merged into one device write of at most
#: this many bytes: the engine's largest single WAL record, so a run stays one record.
WRITE_RUN_BYTES_MAX = 1 << 20

# Fast path (see TargetConnection._fast_command): raw layouts and the values it compares.
_CDB10 = struct.Struct(">BBIBHB")  # SBC-4 §5.16/§5.39: opcode, flags, LBA, group, length, control
_CDB16 = struct.Struct(">BBQIBB")  # SBC-4 §5.18/§5.41: opcode, flags, LBA, length, group, control
_CDB_OFFSET = 32  # RFC 7143 §11.3: the CDB starts at BHS byte 32
_FAST_READ_FLAGS = 0xC0  # F and R, not W (RFC 7143 §11.3.1); ATTR is not looked at
_FAST_WRITE_FLAGS = 0xA0  # F and W, not R: all data is immediate
_FAST_FLAG_MASK = 0xE0
_FAST_READ_CDB_BITS = 0x18  # DPO, FUA: the only byte-1 bits READ accepts (usage bitmap)
_FAST_WRITE_CDB_BITS = 0x10  # DPO; FUA makes a write flush, which must not run on the loop
_GROUP_NUMBER_MASK = 0x1F
_DATA_IN_FINAL = 0x80  # F
_DATA_IN_FINAL_STATUS = 0x81  # F and S (RFC 7143 §11.7.1, §11.7.4)
_RESPONSE_FINAL = 0x80
_SCSI_COMMAND_OP = int(Opcode.SCSI_COMMAND)
_SCSI_RESPONSE_OP = int(Opcode.SCSI_RESPONSE)
_DATA_IN_OP = int(Opcode.SCSI_DATA_IN)
_FAST_CDB10_OPS = frozenset({int(Op.READ_10), int(Op.WRITE_10)})
_FAST_CDB16_OPS = frozenset({int(Op.READ_16), int(Op.WRITE_16)})
_FAST_READ_OPS = frozenset({int(Op.READ_10), int(Op.READ_16)})
_pack_data_in = DATA_IN_BHS.pack
_pack_response = SCSI_RESPONSE_BHS.pack
_unpack_command = SCSI_COMMAND_FIELDS.unpack_from
_unpack_cdb10 = _CDB10.unpack_from
_unpack_cdb16 = _CDB16.unpack_from


class FastPath:
    """Fast READ/WRITE commands; uses the connection's state (declared below)."""

    if TYPE_CHECKING:
        _by_itt: dict[int, int]
        _deferred: list[_Deferred]
        _exp_cmd_sn: int
        _fences: int
        _max_cmd_sn: int
        _nexus: Nexus | None
        _out: list[BytesLike]
        _out_bytes: int
        _queued: dict[int, Pdu]
        _spans: dict[int, tuple[int, int]]
        _stat_sn: int
        _tasks: dict[int, _Task]
        _task_ids: Iterator[int]
        _nonimmediate_in_flight: int
        _events: list[Event]

        def _dispatch(self, pdu: Pdu) -> None: ...
        def _on_bad_pdu(self, exc: RemoteProtocolError) -> None: ...
        def _on_command(self, cmd: ScsiCommand) -> None: ...
        def _respond(self, task: _Task, result: ScsiResult) -> None: ...
        def _window(self) -> int: ...

    def _init_fast_path(self) -> None:
        # Fast path state: the unit, the gate verdict and the generation it was read at, and
        # the negotiated sizes the path needs (see _fast_command).
        self._fast_unit: FastCommandUnit | None = None
        self._fast_gen = -1
        self._fast_reads = False
        self._fast_writes = False
        self._fast_block_count = 0
        self._fast_block_size = 0
        self._fast_max_blocks = 0
        self._fast_segment = 0
        self._fast_burst = 0
        self._fast_immediate_max = 0
        # Adjacent fast writes taken in this next_events call, executed as one device write
        # before anything else happens (see _flush_write_run).
        self._run_opcode = 0
        self._run_lba = 0
        self._run_blocks = 0
        self._run_data: list[memoryview] = []
        self._run_replies: list[tuple[int, int, int, bytearray]] = []
        #: MaxCmdSN before the run was taken, restored if the run has to wait (see
        #: _flush_write_run): its answers, which advanced it, are then never sent.
        self._run_max_cmd_sn = 0

    # ---- fast path ------------------------------------------------------------------------
    #
    # Plain READ/WRITE (10)/(16) in CmdSN order, reads of whole blocks within one segment or
    # more, writes whose data all came as immediate data, while the logical unit's fast gate is
    # open: decoded from the raw BHS with two precompiled structs, executed at once and
    # answered with headers packed directly. No dataclass, task, event or dispatch layer per
    # command. Anything else, or any doubt, returns False before changing state and the PDU
    # takes the general path, which gives byte-identical answers for the commands taken here
    # (tests/unit/iscsi_target/test_fast_path.py holds the two against each other). So does a
    # command the logical unit cannot run without waiting (WOULD_BLOCK): a read before it is
    # taken, a write run after (each of its commands becomes a task).
    #
    # Ordering: a fast command never overtakes an earlier command still with the general path
    # (executing, waiting for Data-Out or for the transport) that touches any of its blocks,
    # nor one that may change what it sees (anything but READ, WRITE, VERIFY, WRITE AND VERIFY
    # and SYNCHRONIZE CACHE: a fence). Commands on other blocks may finish first, as SAM-5
    # allows for SIMPLE tasks; without that, one command that had to wait would send every
    # later one of a busy connection down the general path for as long as its queue stays
    # full.

    def _fast_command(self, chunk: bytearray) -> bool:
        op, flags, data_length, lun, itt, edtl, cmd_sn, _exp_stat_sn = _unpack_command(chunk)
        if (
            op != _SCSI_COMMAND_OP  # immediate commands bypass CmdSN order: general path
            or lun
            or cmd_sn != self._exp_cmd_sn
            or ((self._max_cmd_sn - cmd_sn) & _SN_MASK) >= _SN_HALF
            or self._queued
            or self._deferred
            or self._fences  # see "Ordering" above
            or itt == RESERVED_TAG
            or itt in self._by_itt
        ):
            return False
        code = chunk[_CDB_OFFSET]
        if code in _FAST_CDB10_OPS:
            _op, cdb_flags, lba, group, blocks, control = _unpack_cdb10(chunk, _CDB_OFFSET)
        elif code in _FAST_CDB16_OPS:
            _op, cdb_flags, lba, blocks, group, control = _unpack_cdb16(chunk, _CDB_OFFSET)
        else:
            return False
        unit = self._fast_unit
        assert unit is not None
        if unit.state_generation != self._fast_gen:
            self._fast_regate(unit)
        if (
            not self._fast_reads
            or group & ~_GROUP_NUMBER_MASK
            or control
            or not 0 < blocks <= self._fast_max_blocks
            or lba + blocks > self._fast_block_count
            or edtl != blocks * self._fast_block_size
        ):
            return False
        spans = self._spans
        if spans and _overlaps(spans, lba, lba + blocks):
            return False  # an earlier command on these blocks is still with the general path
        if code not in _FAST_READ_OPS:
            if (
                flags & _FAST_FLAG_MASK != _FAST_WRITE_FLAGS
                or data_length != edtl
                or data_length > self._fast_immediate_max
                or cdb_flags & ~_FAST_WRITE_CDB_BITS
                or not self._fast_writes
            ):
                return False
            # It joins the pending run when it continues it, else the run is written first (and
            # if the run had to wait, a write on its blocks follows it down the general path).
            if self._run_replies and (
                lba != self._run_lba + self._run_blocks
                or (self._run_blocks + blocks) * self._fast_block_size > WRITE_RUN_BYTES_MAX
            ):
                self._flush_write_run()
                if self._spans and _overlaps(self._spans, lba, lba + blocks):
                    return False
            # Taken: this is now the command with CmdSN cmd_sn (RFC 7143 §4.2.2.1).
            exp_cmd_sn = self._exp_cmd_sn = (cmd_sn + 1) & _SN_MASK
            replies = self._run_replies
            if not replies:
                self._run_opcode = code
                self._run_lba = lba
                self._run_blocks = 0
                self._run_max_cmd_sn = self._max_cmd_sn
            self._run_blocks += blocks
            self._run_data.append(memoryview(chunk)[BHS_LENGTH : BHS_LENGTH + edtl])
            # The answer's ExpCmdSN/MaxCmdSN are those of now, as if written at once.
            replies.append((itt, exp_cmd_sn, self._window(), chunk))
            return True
        if flags & _FAST_FLAG_MASK != _FAST_READ_FLAGS or data_length:
            return False
        if cdb_flags & ~_FAST_READ_CDB_BITS:
            return False
        if self._run_replies:
            self._flush_write_run()  # the read must see them
            if self._spans and _overlaps(self._spans, lba, lba + blocks):
                return False  # they had to wait: the read goes after them
        data = unit.fast_read(code, lba, blocks)
        if data is WOULD_BLOCK:
            return False
        exp_cmd_sn = self._exp_cmd_sn = (cmd_sn + 1) & _SN_MASK
        if isinstance(data, ScsiResult):
            self._fast_failed(chunk, data)
            return True
        stat_sn = self._stat_sn
        self._stat_sn = (stat_sn + 1) & _SN_MASK
        max_cmd_sn = self._window()
        length = len(data)
        if length <= self._fast_segment and length <= self._fast_burst:
            # One Data-In carrying GOOD status (RFC 7143 §11.7.4, "phase collapse").
            header = _pack_data_in(
                _DATA_IN_OP, _DATA_IN_FINAL_STATUS, 0, length, 0, itt, RESERVED_TAG, stat_sn,
                exp_cmd_sn, max_cmd_sn, 0, 0, 0,
            )  # fmt: skip
            out = self._out
            out.append(header)
            out.append(data)
            self._out_bytes += BHS_LENGTH + length
            return True
        self._fast_data_in(itt, data, stat_sn, exp_cmd_sn, max_cmd_sn)
        return True

    def _flush_write_run(self) -> None:
        """Write the pending run of adjacent fast writes with one device call, then answer
        each in arrival order. The run is all SIMPLE commands that arrived together with nothing
        in between, so one write of their concatenation is one of the orders SAM-5 allows;
        StatSNs are assigned here, so the answers are byte for byte those of separate writes.
        On a device error every command of the run gets that error's CHECK CONDITION.

        When the logical unit cannot write without waiting, nothing was written or answered:
        each command of the run becomes a task of the general path, in CmdSN order (their
        CmdSNs are consumed already; from now on they count against the command window)."""
        unit = self._fast_unit
        assert unit is not None
        data, replies = self._run_data, self._run_replies
        self._run_data, self._run_replies = [], []
        payload: BytesLike = data[0] if len(data) == 1 else b"".join(data)
        failed = unit.fast_write(self._run_opcode, self._run_lba, payload)
        if failed is WOULD_BLOCK:
            self._max_cmd_sn = self._run_max_cmd_sn
            for _itt, _exp, _max, chunk in replies:
                self._defer_taken(chunk)
            return
        if isinstance(failed, PendingWrite):
            # Written, but answered only when the replicas confirm receipt: each command
            # becomes an executing task (it counts against the command window, a later command
            # on its blocks waits behind it, an abort drops its answer), completed by the
            # server through AwaitWrite. Its answers were never sent, as above.
            self._max_cmd_sn = self._run_max_cmd_sn
            ids = tuple(self._adopt_written(chunk) for _itt, _exp, _max, chunk in replies)
            self._events.append(AwaitWrite(ids, self._run_opcode, self._run_lba, failed))
            return
        if failed is not None:
            for _itt, _exp, _max, chunk in replies:
                self._fast_failed(chunk, failed)
            return
        out = self._out
        stat_sn = self._stat_sn
        for itt, exp_cmd_sn, max_cmd_sn, _chunk in replies:
            # RFC 7143 §11.4: GOOD, no residual, ExpDataSN 0 (no R2T was sent).
            header = _pack_response(
                _SCSI_RESPONSE_OP, _RESPONSE_FINAL, 0, 0, 0, itt, 0, stat_sn, exp_cmd_sn,
                max_cmd_sn, 0, 0, 0,
            )  # fmt: skip
            out.append(header)
            stat_sn = (stat_sn + 1) & _SN_MASK
        self._stat_sn = stat_sn
        self._out_bytes += BHS_LENGTH * len(replies)

    def _fast_data_in(
        self, itt: int, data: BytesLike, stat_sn: int, exp_cmd_sn: int, max_cmd_sn: int
    ) -> None:
        """Data-In PDUs of at most MaxRecvDataSegmentLength, F at the end of each
        MaxBurstLength sequence, status in the last (RFC 7143 §13.12, §13.13); as data_in_plan
        cuts them."""
        view = data if isinstance(data, memoryview) else memoryview(data)
        total = len(view)
        segment, burst = self._fast_segment, self._fast_burst
        out = self._out
        data_sn = offset = 0
        while offset < total:
            burst_end = min(total, offset + burst)
            while offset < burst_end:
                end = min(offset + segment, burst_end)
                if end == total:
                    flags, sn = _DATA_IN_FINAL_STATUS, stat_sn
                else:
                    flags, sn = (_DATA_IN_FINAL if end == burst_end else 0), 0
                header = _pack_data_in(
                    _DATA_IN_OP, flags, 0, end - offset, 0, itt, RESERVED_TAG, sn, exp_cmd_sn,
                    max_cmd_sn, data_sn, offset, 0,
                )  # fmt: skip
                out.append(header)
                out.append(view[offset:end])
                data_sn += 1
                offset = end
        self._out_bytes += total + BHS_LENGTH * data_sn

    def _defer_taken(self, chunk: bytearray) -> None:
        """A command the fast path took (its CmdSN consumed) but could not run: hand it to the
        general path as a task, as _handle_numbered would have."""
        try:
            cmd = self._decode_raw(chunk)
        except RemoteProtocolError as exc:
            self._on_bad_pdu(exc)
            return
        assert isinstance(cmd, ScsiCommand), "the fast path takes SCSI Commands only"
        self._on_command(cmd)

    def _adopt_written(self, chunk: bytearray) -> int:
        """A fast write already done whose answer waits: an executing task of the general
        path, as _on_command would have made it (the fast path took only commands that need
        nothing else: no R2T, no residual, a READ/WRITE span)."""
        cmd = self._decode_raw(chunk)
        assert isinstance(cmd, ScsiCommand), "the fast path takes SCSI Commands only"
        cdb = bytes(cmd.cdb)
        task = _Task(
            task_id=next(self._task_ids),
            cmd=cmd,
            immediate=False,
            transfer=None,
            local_result=None,
            executing=True,
            cdb=cdb,
            span=_span_of(cdb),
        )
        self._tasks[task.task_id] = task
        self._by_itt[cmd.itt] = task.task_id
        if task.span is not None:
            self._spans[task.task_id] = task.span
        else:
            task.fence = True  # never: a fast WRITE always has a span
            self._fences += 1
        self._nonimmediate_in_flight += 1
        return task.task_id

    def _fast_regate(self, unit: FastCommandUnit) -> None:
        nexus = self._nexus
        assert nexus is not None
        gate = unit.fast_gate(nexus)
        self._fast_gen = gate.generation
        # Whole blocks of a size that needs no padding, or the general path pads for us.
        self._fast_reads = gate.reads and gate.logical_block_size & 3 == 0
        self._fast_writes = self._fast_reads and gate.writes
        self._fast_block_count = gate.block_count
        self._fast_block_size = gate.logical_block_size
        self._fast_max_blocks = gate.max_transfer_blocks

    def _fast_failed(self, chunk: bytearray, result: ScsiResult) -> None:
        """A device error on the fast path: the general path's answer for the same result."""
        cmd = self._decode_raw(chunk)
        assert isinstance(cmd, ScsiCommand), "the fast path takes SCSI Commands only"
        task = _Task(task_id=0, cmd=cmd, immediate=False, transfer=None, local_result=None)
        self._respond(task, result)

    def _decode_raw(self, chunk: bytearray) -> Pdu:
        view = memoryview(chunk).toreadonly()
        data_length = int.from_bytes(chunk[5:8], "big")
        return decode_pdu(
            chunk,
            view[BHS_LENGTH:BHS_LENGTH],
            view[BHS_LENGTH : BHS_LENGTH + data_length],
            allowed_opcodes=INITIATOR_OPCODES,
        )

    def _dispatch_raw(self, chunk: bytearray) -> None:
        """A PDU the fast path declined, through the general decoder and dispatcher."""
        try:
            pdu = self._decode_raw(chunk)
        except RemoteProtocolError as exc:
            self._on_bad_pdu(exc)
            return
        self._dispatch(pdu)
