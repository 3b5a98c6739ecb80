"""Target side of one iSCSI connection, login through logout (RFC 7143), sans-IO.

:class:`TargetConnection` follows the h11 model: the adapter feeds received bytes to
:meth:`~TargetConnection.receive_data`, collects :meth:`~TargetConnection.next_events`, sends
:meth:`~TargetConnection.data_to_send`, and reports each SCSI outcome back with
:meth:`~TargetConnection.command_done`. Nothing here blocks, reads a socket or touches a
volume; SCSI commands leave as :class:`ExecuteCommand` events once all their Data-Out is in.

Scope: one connection per session (we negotiate MaxConnections=1), so the session state
(CmdSN window, tasks) lives in the connection. ErrorRecoveryLevel 0: a digest or sequence
error is answered with a Reject (or terminates the task) and never recovered; SNACK is
rejected. LUN 0 is the only logical unit; other LUNs answer LOGICAL UNIT NOT SUPPORTED, and
REPORT LUNS and INQUIRY work through any LUN (SPC-4 §6.6.1, §6.33).

Bounds: non-immediate commands in flight are capped by the CmdSN window (MaxCmdSN), immediate
ones by ``immediate_commands_max``, buffered Data-Out bytes by ``data_out_bytes_max`` (further
writes get TASK SET FULL), text by the text assembler, and every timer is in
:class:`SessionLimits`. Output is bounded by :attr:`TargetConnection.output_room_bytes`: once
the output produced and promised (reads handed out as events) reaches it, no further command is
taken until the adapter has sent some and calls :meth:`~TargetConnection.next_events` again.
The time source is injected so tests never wait.
"""

from __future__ import annotations

import itertools
import logging
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol, runtime_checkable

from blockyard.blockdev import BytesLike
from blockyard.iscsi.errors import (
    LocalProtocolError,
    RejectReason,
    RemoteProtocolError,
)
from blockyard.iscsi.login import (
    LOGIN_MAX_DATA_SEGMENT_LENGTH,
    AdmitSession,
    LoginState,
    TargetConfig,
    TargetLogin,
    TargetLoginSettings,
)
from blockyard.iscsi.negotiation import (
    NOT_UNDERSTOOD,
    OPERATIONAL_KEYS,
    REJECT,
    SESSION_TYPE_DISCOVERY,
    NegotiatedParameters,
)
from blockyard.iscsi.pdu import (
    BHS_LENGTH,
    DATA_IN_BHS,
    IMMEDIATE_BIT,
    INITIATOR_OPCODES,
    OPCODE_MASK,
    R2T,
    RESERVED_TAG,
    SCSI_COMMAND_FIELDS,
    SCSI_RESPONSE_BHS,
    DataIn,
    DataOut,
    LoginRequest,
    LogoutReason,
    LogoutRequest,
    LogoutResponse,
    LogoutResponseCode,
    NopIn,
    NopOut,
    Opcode,
    Pdu,
    Reject,
    ScsiCommand,
    ScsiResponse,
    ScsiResponseCode,
    SnackRequest,
    TaskManagementFunction,
    TaskManagementRequest,
    TaskManagementResponse,
    TaskManagementResponseCode,
    TextRequest,
    TextResponse,
    decode_pdu,
    encode_pdu_buffers,
    sense_segment,
)
from blockyard.iscsi.reader import NEED_DATA, PduReader, PeerRole
from blockyard.iscsi.target_task import DataOutError, WriteTransfer, data_in_plan
from blockyard.iscsi.text import (
    TextAssembler,
    TextPairs,
    encode_text,
    parse_text,
    split_text,
)
from blockyard.scsi.commands import CommandInfo, Direction
from blockyard.scsi.constants import AscPair, Op, SenseKey, Status
from blockyard.scsi.lu import WOULD_BLOCK, FastGate, ResetKind, WouldBlock
from blockyard.scsi.nexus import Nexus
from blockyard.scsi.sense import ScsiResult, check_condition

log = logging.getLogger("blockyard.iscsi.target")

_SN_MASK = 0xFFFFFFFF  # RFC 7143 §4.2.2.1: 32-bit serial number arithmetic (RFC 1982)
_SN_HALF = 1 << 31

#: SAM-5 / SPC-4 additional sense codes the transport itself reports.
LOGICAL_UNIT_NOT_SUPPORTED: AscPair = (0x25, 0x00)  # SPC-4 Annex D
INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT: AscPair = (0x0E, 0x03)  # SPC-4 Annex D
DATA_PHASE_ERROR: AscPair = (0x4B, 0x00)  # SPC-4 Annex D
#: SPC-4 §6.6.2: peripheral qualifier 011b + device type 1Fh = "no logical unit here".
_NO_LU_INQUIRY = bytes([0x7F, 0, 0x06, 0x12, 31]) + bytes(31)
#: Logout Response Time2Retain at ErrorRecoveryLevel 0: nothing is kept for reinstatement.
LOGOUT_TIME2RETAIN_ERL0 = 0
#: Data-Out collected beyond what the CDB needs, so the logical unit sees an over-long buffer
#: for commands that require an exact one; the excess is dropped.
DATA_OUT_SLACK_BYTES = 4096
#: WRITE / WRITE AND VERIFY TRANSFER LENGTH field (offset, width) per opcode (SBC-4 §5).
_TRANSFER_LENGTH_FIELDS: dict[int, tuple[int, int]] = {
    Op.WRITE_10: (7, 2),
    Op.WRITE_12: (6, 4),
    Op.WRITE_16: (10, 4),
    Op.WRITE_AND_VERIFY_10: (7, 2),
    Op.WRITE_AND_VERIFY_12: (6, 4),
    Op.WRITE_AND_VERIFY_16: (10, 4),
}
#: ITTs of dropped tasks remembered so their straggling Data-Out is ignored, not rejected.
RECENT_DROPPED_ITTS_MAX = 256
#: Adjacent fast-path writes that arrived together are merged into one device write of at most
#: this many bytes: the engine's largest single WAL record, so a run stays one record.
WRITE_RUN_BYTES_MAX = 1 << 20
#: Time allowed from TCP connect to the end of login. A real initiator needs a few round trips
#: (well under a second, CHAP included); a connection that has not logged in holds a pre-login
#: slot that unauthenticated peers compete for, so it must not hold it long.
LOGIN_TIMEOUT_S = 10.0
#: ``output_room_bytes`` until the adapter sets it: no bound of the connection's own.
OUTPUT_ROOM_UNBOUNDED = 1 << 62

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
#: Where an outstanding command's blocks are, for the fast path's overlap rule (see
#: _fast_command): (struct, LBA offset, length offset) of the READ, WRITE, VERIFY and WRITE AND
#: VERIFY CDBs (SBC-4 §5); 6-byte CDBs are decoded by hand (21-bit LBA, 0 means 256 blocks).
_SPAN_FIELDS: dict[int, tuple[struct.Struct, struct.Struct]] = {
    int(op): fields
    for ops, fields in (
        (
            (Op.READ_10, Op.WRITE_10, Op.VERIFY_10, Op.WRITE_AND_VERIFY_10),
            (struct.Struct(">xxI"), struct.Struct(">7xH")),
        ),
        (
            (Op.READ_12, Op.WRITE_12, Op.VERIFY_12, Op.WRITE_AND_VERIFY_12),
            (struct.Struct(">xxI"), struct.Struct(">6xI")),
        ),
        (
            (Op.READ_16, Op.WRITE_16, Op.VERIFY_16, Op.WRITE_AND_VERIFY_16),
            (struct.Struct(">xxQ"), struct.Struct(">10xI")),
        ),
    )
    for op in ops
}
_SPAN_CDB6_OPS = frozenset({int(Op.READ_6), int(Op.WRITE_6)})
#: Outstanding commands that neither read nor change the blocks a fast command touches.
_TRANSPARENT_OPS = frozenset({int(Op.SYNCHRONIZE_CACHE_10), int(Op.SYNCHRONIZE_CACHE_16)})
_pack_data_in = DATA_IN_BHS.pack
_pack_response = SCSI_RESPONSE_BHS.pack
_unpack_command = SCSI_COMMAND_FIELDS.unpack_from
_unpack_cdb10 = _CDB10.unpack_from
_unpack_cdb16 = _CDB16.unpack_from


def serial_lt(a: int, b: int) -> bool:
    """``a < b`` in 32-bit serial number arithmetic (RFC 1982 via RFC 7143 §4.2.2.1)."""
    return a != b and ((b - a) & _SN_MASK) < _SN_HALF


def serial_le(a: int, b: int) -> bool:
    return a == b or serial_lt(a, b)


class CommandInspector(Protocol):
    """What the connection needs from a logical unit before execution (its CDB look-up)."""

    def inspect(self, cdb: bytes | memoryview) -> CommandInfo: ...


@runtime_checkable
class FastCommandUnit(CommandInspector, Protocol):
    """A logical unit that lets the connection run plain READ/WRITE (10)/(16) itself, without
    events (see :meth:`blockyard.scsi.lu.LogicalUnit.fast_gate`). ``fast_read`` and
    ``fast_write`` run inside the event loop and must never wait: what cannot be done at once
    answers ``WOULD_BLOCK`` having changed nothing, and the command takes the general path."""

    state_generation: int

    def fast_gate(self, nexus: Nexus) -> FastGate: ...

    def fast_read(
        self, opcode: int, lba: int, blocks: int
    ) -> BytesLike | ScsiResult | WouldBlock: ...

    def fast_write(
        self, opcode: int, lba: int, data: BytesLike
    ) -> ScsiResult | WouldBlock | None: ...


class TargetPortal(Protocol):
    """The connection's view of the server: target look-up, TSIHs, discovery answers.

    Implementations must be quick and must not block (they run inside the event loop).
    """

    def lookup(self, target_name: str) -> TargetConfig | None: ...

    def allocate_tsih(self) -> int: ...

    def inspector(self, target_name: str) -> CommandInspector | None: ...

    def send_targets(
        self, value: str, *, initiator_name: str, session_target: str | None
    ) -> TextPairs: ...


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """Per-session bounds and timers (seconds).

    ``command_window`` non-immediate commands may be in flight (RFC 7143 §4.2.2.1 MaxCmdSN);
    ``nop_interval_s`` of silence triggers a NOP-In ping and ``nop_timeout_s`` without its
    answer drops the connection; ``login_timeout_s`` bounds the whole login phase.
    """

    command_window: int = 64
    immediate_commands_max: int = 8
    data_out_bytes_max: int = 64 << 20
    nop_interval_s: float = 10.0
    nop_timeout_s: float = 15.0
    login_timeout_s: float = LOGIN_TIMEOUT_S
    text_response_bytes_max: int = 65536

    def __post_init__(self) -> None:
        if not 1 <= self.command_window <= 1 << 16:
            raise ValueError("command_window must be in 1..65536")
        if self.immediate_commands_max < 1 or self.data_out_bytes_max < 1:
            raise ValueError("immediate_commands_max and data_out_bytes_max must be positive")
        if min(self.nop_interval_s, self.nop_timeout_s, self.login_timeout_s) <= 0:
            raise ValueError("timers must be positive")


# --- events ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoggedIn:
    """Login finished; the connection is in the Full Feature Phase. ``nexus`` is None for a
    Discovery session."""

    session_type: str
    initiator_name: str
    target_name: str
    isid: int
    tsih: int
    nexus: Nexus | None


@dataclass(frozen=True, slots=True)
class ExecuteCommand:
    """Run ``cdb`` on the session's logical unit and call ``command_done(task_id, result)``.

    ``data_out`` is the complete Data-Out buffer (None when the command moves no data out).
    """

    task_id: int
    cdb: bytes
    data_out: BytesLike | None
    nexus: Nexus


@dataclass(frozen=True, slots=True)
class ResetRequested:
    """A task management reset: the server calls ``LogicalUnit.reset(kind)``; with ``cold``
    it also drops every session of the target once this response is sent
    (RFC 7143 §11.5.1 TARGET COLD RESET)."""

    kind: AscPair
    cold: bool = False


@dataclass(frozen=True, slots=True)
class CloseConnection:
    """Close the transport after sending what :meth:`data_to_send` holds."""

    reason: str


Event = LoggedIn | ExecuteCommand | ResetRequested | CloseConnection


class ConnectionState(Enum):
    LOGIN = "login"
    FULL_FEATURE = "full_feature"
    CLOSED = "closed"


# --- tasks -----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Task:
    task_id: int
    cmd: ScsiCommand
    immediate: bool
    transfer: WriteTransfer | None
    local_result: ScsiResult | None
    residual_overflow: int = 0
    residual_underflow: int = 0
    executing: bool = False
    aborted: bool = False
    buffered_bytes: int = 0
    cdb: bytes = b""
    #: Data-In this task may produce once executed (counted against output_room_bytes).
    promised_bytes: int = 0
    #: Its blocks [start, end) when it is a READ/WRITE-like command; see _fast_command.
    span: tuple[int, int] | None = None
    #: While it is outstanding no fast command runs (it may change what they see).
    fence: bool = False


@dataclass(slots=True)
class _Deferred:
    """A TMF or Logout response held until the tasks it waits for are gone."""

    waiting: set[int]
    pdu: TaskManagementResponse | LogoutResponse
    close_after: str | None = None
    events: list[Event] = field(default_factory=list)


def _decode_lun(lun: int) -> int | None:
    """SAM-5 §4.7: the first level of a peripheral (00b) or flat (01b) LUN; None otherwise."""
    if lun & 0x0000FFFFFFFFFFFF:
        return None
    first = lun >> 48
    method = first >> 14
    if method == 0:
        return first & 0xFF if not first & 0x3F00 else None
    if method == 1:
        return first & 0x3FFF
    return None


class TargetConnection:
    """One target-side iSCSI connection (and its single-connection session). Not thread-safe:
    every method runs on the connection's event loop."""

    def __init__(
        self,
        portal: TargetPortal,
        settings: TargetLoginSettings | None = None,
        *,
        limits: SessionLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
        relative_target_port_id: int = 1,
        target_port_group_id: int = 1,
        initial_stat_sn: int | None = None,
        fast_path: bool = True,
        admit_session: AdmitSession | None = None,
    ) -> None:
        #: Run plain READ/WRITE (10)/(16) inline when the logical unit is a FastCommandUnit
        #: and its gate is open; False sends every command out as an ExecuteCommand event.
        #: May be changed at any time; it applies from the next PDU.
        self.fast_path = fast_path
        #: How many bytes of output (produced since the last data_to_send, plus the Data-In
        #: promised by reads handed out as events) this connection may hold before it stops
        #: taking commands. The adapter sets it before each next_events from what its transport
        #: still buffers; a connection that stopped reports output_blocked.
        self.output_room_bytes = OUTPUT_ROOM_UNBOUNDED
        self._limits = limits or SessionLimits()
        base = settings or TargetLoginSettings()
        # The login's MaxCmdSN must describe the same window the session enforces.
        self._settings = TargetLoginSettings(
            operational=base.operational,
            discovery_chap=base.discovery_chap,
            discovery_mutual_chap=base.discovery_mutual_chap,
            command_window=self._limits.command_window,
            max_text_length=base.max_text_length,
        )
        self._portal = portal
        self._clock = clock
        self._port_id = relative_target_port_id
        self._group_id = target_port_group_id
        self._reader = PduReader(
            peer=PeerRole.INITIATOR, max_data_segment_length=LOGIN_MAX_DATA_SEGMENT_LENGTH
        )
        self._login = TargetLogin(
            portal,
            self._settings,
            allocate_tsih=portal.allocate_tsih,
            admit_session=admit_session,
            initial_stat_sn=initial_stat_sn,
        )
        self._login_requests = 0
        self._state = ConnectionState.LOGIN
        self._out: list[BytesLike] = []
        self._out_bytes = 0
        self._promised_bytes = 0
        self._output_blocked = False
        self._events: list[Event] = []
        self._started = clock()
        self._last_rx = self._started
        self._ping_ttt: int | None = None
        self._ping_sent = 0.0
        self._params = NegotiatedParameters()
        self._header_digest = False
        self._data_digest = False
        self._discovery = False
        self._initiator_name = ""
        self._target_name = ""
        self._inspector: CommandInspector | None = None
        self._nexus: Nexus | None = None
        self._isid = 0
        self._tsih = 0
        self._cid = 0
        self._stat_sn = 0
        self._exp_cmd_sn = 0
        self._max_cmd_sn = 0
        self._queued: dict[int, Pdu] = {}
        self._tasks: dict[int, _Task] = {}
        #: Of those: the blocks of the READ/WRITE-like ones, and how many fence the fast path.
        self._spans: dict[int, tuple[int, int]] = {}
        self._fences = 0
        self._by_itt: dict[int, int] = {}
        self._task_ids = itertools.count(1)
        self._ttts: Iterator[int] = (t for t in itertools.cycle(range(1, RESERVED_TAG)))
        self._nonimmediate_in_flight = 0
        self._immediate_in_flight = 0
        self._buffered_bytes = 0
        self._dropped_itts: OrderedDict[int, None] = OrderedDict()
        self._deferred: list[_Deferred] = []
        self._logging_out = False
        self._text = TextAssembler(self._settings.max_text_length)
        self._text_pending: tuple[int, int, list[bytes]] | None = None
        self._close_reason: str | None = None
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

    # ---- properties -----------------------------------------------------------------------

    @property
    def state(self) -> ConnectionState:
        return self._state

    @property
    def closed(self) -> bool:
        return self._state is ConnectionState.CLOSED

    @property
    def close_reason(self) -> str | None:
        return self._close_reason

    @property
    def params(self) -> NegotiatedParameters:
        return self._params

    @property
    def target_name(self) -> str:
        """The Normal session's target, "" before login and for Discovery sessions."""
        return self._target_name

    @property
    def nexus(self) -> Nexus | None:
        return self._nexus

    @property
    def exp_cmd_sn(self) -> int:
        return self._exp_cmd_sn

    @property
    def max_cmd_sn(self) -> int:
        return self._max_cmd_sn

    @property
    def stat_sn(self) -> int:
        """The StatSN the next response will carry."""
        return self._stat_sn

    @property
    def tasks_in_flight(self) -> int:
        return len(self._tasks)

    @property
    def executing_task_ids(self) -> tuple[int, ...]:
        return tuple(t.task_id for t in self._tasks.values() if t.executing)

    @property
    def pending_output_bytes(self) -> int:
        return self._out_bytes

    @property
    def promised_output_bytes(self) -> int:
        """Data-In that commands handed out as events may still produce."""
        return self._promised_bytes

    @property
    def output_blocked(self) -> bool:
        """The last next_events stopped taking commands because output_room_bytes was used
        up while input (or commands waiting for their CmdSN) remained: call next_events again
        once there is room."""
        return self._output_blocked

    @property
    def login_requests(self) -> int:
        """Complete PDUs received during login (0: the peer has not sent a whole one yet)."""
        return self._login_requests

    # ---- adapter API ----------------------------------------------------------------------

    def receive_data(self, data: BytesLike) -> None:
        """Buffer bytes from the initiator. Ignored once the connection is closed."""
        if self._state is ConnectionState.CLOSED or not len(data):
            return
        self._last_rx = self._clock()
        self._reader.receive_data(data)

    def next_events(self) -> list[Event]:
        """Decode and handle every complete PDU buffered so far; return what the server must
        do. Never raises for anything the initiator sent."""
        reader = self._reader
        self._output_blocked = False
        if self._queued:
            self._drain_queue()
        while self._state is not ConnectionState.CLOSED:
            if self._out_bytes + self._promised_bytes >= self.output_room_bytes:
                # Over the output bound: leave the rest buffered until there is room.
                if self._run_replies:
                    self._flush_write_run()
                self._output_blocked = bool(reader.buffered_bytes or self._queued)
                break
            if self._fast_unit is not None and self.fast_path and not self._logging_out:
                chunk = reader.next_scsi_command()
                if chunk is not None:
                    if not self._fast_command(chunk):
                        if self._run_replies:
                            self._flush_write_run()
                        self._dispatch_raw(chunk)
                    continue
            if self._run_replies:
                self._flush_write_run()
            try:
                pdu = reader.next_pdu()
            except RemoteProtocolError as exc:
                self._on_bad_pdu(exc)
                continue
            if pdu is NEED_DATA:
                break
            self._dispatch(pdu)
        return self._take_events()

    def data_to_send(self) -> list[BytesLike]:
        """Buffers to write, in order (header, data, padding, digest of each PDU)."""
        out = self._out
        self._out = []
        self._out_bytes = 0
        return out

    def command_done(self, task_id: int, result: ScsiResult) -> list[Event]:
        """Report the outcome of an :class:`ExecuteCommand`. Unknown ids are ignored (the
        connection may have closed in between)."""
        task = self._tasks.get(task_id)
        if task is None or not task.executing:
            return self._take_events()
        task.executing = False
        if task.aborted or self._state is ConnectionState.CLOSED:
            self._forget(task)
        else:
            self._respond(task, result)
        self._settle_deferred()
        return self._take_events()

    def clear_to_run(self, task_id: int) -> bool:
        """Whether the READ/WRITE-like command of :class:`ExecuteCommand` ``task_id`` may run
        now, before the commands received earlier are done: none of them still outstanding
        touches its blocks or fences (the rule of the fast path, see _fast_command). False for
        any other command. A transport that runs some commands at once and others later uses
        it to keep the order where it matters."""
        task = self._tasks.get(task_id)
        if task is None or task.span is None or self._fences:
            return False
        start, end = task.span
        for other_id, (first, stop) in self._spans.items():
            if other_id < task_id and first < end and start < stop:
                return False
        return True

    def tick(self) -> list[Event]:
        """Run the timers: login timeout, NOP-In pings and their timeout."""
        if self._state is ConnectionState.CLOSED:
            return []
        now = self._clock()
        if self._state is ConnectionState.LOGIN:
            if now - self._started > self._limits.login_timeout_s:
                self._close(f"login did not finish within {self._limits.login_timeout_s} s")
            return self._take_events()
        if self._ping_ttt is not None:
            if now - self._ping_sent > self._limits.nop_timeout_s:
                self._close(
                    f"no answer to a NOP-In ping within {self._limits.nop_timeout_s} s; "
                    "the initiator is gone"
                )
        elif now - self._last_rx > self._limits.nop_interval_s:
            self._ping_ttt = self._next_ttt()
            self._ping_sent = now
            # RFC 7143 §11.19: a target ping has ITT 0xffffffff and does not advance StatSN.
            self._send(
                NopIn(
                    itt=RESERVED_TAG,
                    ttt=self._ping_ttt,
                    stat_sn=self._stat_sn,
                    exp_cmd_sn=self._exp_cmd_sn,
                    max_cmd_sn=self._window(),
                )
            )
        return self._take_events()

    def abort(self, reason: str) -> list[Event]:
        """Close from our side (target removed, server shutting down). Executing commands
        may still report; their results are dropped."""
        self._close(reason)
        return self._take_events()

    # ---- plumbing -------------------------------------------------------------------------

    def _take_events(self) -> list[Event]:
        events = self._events
        self._events = []
        return events

    def _send(self, pdu: Pdu) -> None:
        try:
            buffers = encode_pdu_buffers(
                pdu, header_digest=self._header_digest, data_digest=self._data_digest
            )
        except LocalProtocolError:
            # A bug on our side must not take the server down; the connection cannot go on.
            log.exception("cannot encode %s; closing the connection", type(pdu).__name__)
            self._close("internal error while encoding a PDU")
            return
        self._out.extend(buffers)
        self._out_bytes += sum(len(b) for b in buffers)

    def _close(self, reason: str) -> None:
        if self._state is ConnectionState.CLOSED:
            return
        self._state = ConnectionState.CLOSED
        self._close_reason = reason
        for task in self._tasks.values():
            task.aborted = True
        for task in [t for t in self._tasks.values() if not t.executing]:
            self._forget(task)
        self._deferred.clear()
        self._queued.clear()
        self._events.append(CloseConnection(reason))

    def _next_ttt(self) -> int:
        return next(self._ttts)

    def _window(self) -> int:
        """MaxCmdSN: ExpCmdSN - 1 plus the free command slots, never decreasing
        (RFC 7143 §4.2.2.1: MaxCmdSN - ExpCmdSN + 1 is the window the initiator may use)."""
        free = max(0, self._limits.command_window - self._nonimmediate_in_flight)
        candidate = (self._exp_cmd_sn + free - 1) & _SN_MASK
        if serial_lt(self._max_cmd_sn, candidate):
            self._max_cmd_sn = candidate
        return self._max_cmd_sn

    def _next_stat_sn(self) -> int:
        stat_sn = self._stat_sn
        self._stat_sn = (stat_sn + 1) & _SN_MASK
        return stat_sn

    def _reject(self, reason: RejectReason, header: bytes) -> None:
        self._send(
            Reject(
                reason=reason,
                stat_sn=self._next_stat_sn(),
                exp_cmd_sn=self._exp_cmd_sn,
                max_cmd_sn=self._window(),
                data=header[:BHS_LENGTH].ljust(BHS_LENGTH, b"\x00"),
            )
        )

    def _reject_pdu(self, reason: RejectReason, pdu: Pdu) -> None:
        header = bytes(encode_pdu_buffers(pdu)[0][:BHS_LENGTH]) if _encodable(pdu) else b""
        self._reject(reason, header)

    # ---- input dispatch -------------------------------------------------------------------

    def _on_bad_pdu(self, exc: RemoteProtocolError) -> None:
        if self._state is ConnectionState.LOGIN or exc.fatal or exc.reject_reason is None:
            # During login there is no Reject (RFC 7143 §6.3); a fatal framing error leaves
            # no way to find the next PDU (RFC 7143 §7.8).
            log.info("closing iSCSI connection: %s", exc)
            self._close(f"protocol error: {exc}")
            return
        log.info("rejecting a PDU from %s: %s", self._initiator_name, exc)
        self._consume_rejected_cmd_sn(exc.header)
        self._reject(exc.reject_reason, exc.header)

    def _consume_rejected_cmd_sn(self, header: bytes) -> None:
        """A rejected non-immediate command still uses its CmdSN, or the window would stall
        on the hole forever (RFC 7143 §11.17.1: the command is not executed)."""
        if len(header) < BHS_LENGTH or header[0] & IMMEDIATE_BIT:
            return
        opcode = header[0] & OPCODE_MASK
        if opcode not in _NUMBERED_OPCODES:
            return
        cmd_sn = int.from_bytes(header[24:28], "big")
        if cmd_sn == self._exp_cmd_sn:
            self._exp_cmd_sn = (cmd_sn + 1) & _SN_MASK
            self._drain_queue()

    def _dispatch(self, pdu: Pdu) -> None:
        if self._state is ConnectionState.LOGIN:
            self._on_login_pdu(pdu)
            return
        if self._logging_out:
            return  # RFC 7143 §11.14: nothing more is accepted after a Logout
        if isinstance(pdu, DataOut):
            self._on_data_out(pdu)
        elif isinstance(pdu, SnackRequest):
            # ErrorRecoveryLevel 0 supports no SNACK (RFC 7143 §11.16, §13.20).
            self._reject_pdu(RejectReason.SNACK_REJECT, pdu)
        elif isinstance(pdu, LoginRequest):
            self._reject_pdu(RejectReason.PROTOCOL_ERROR, pdu)
        elif isinstance(pdu, NopOut) and pdu.ttt != RESERVED_TAG:
            self._on_ping_answer(pdu)
        elif isinstance(pdu, ScsiCommand | TaskManagementRequest | TextRequest | LogoutRequest):
            self._gate(pdu, pdu.cmd_sn, pdu.immediate)
        elif isinstance(pdu, NopOut):
            if pdu.itt == RESERVED_TAG and not pdu.immediate:
                # RFC 7143 §11.18: a NOP-Out with ITT 0xffffffff must be immediate.
                self._reject_pdu(RejectReason.PROTOCOL_ERROR, pdu)
                return
            self._gate(pdu, pdu.cmd_sn, pdu.immediate)
        else:
            self._reject_pdu(RejectReason.PROTOCOL_ERROR, pdu)

    def _gate(self, pdu: Pdu, cmd_sn: int, immediate: bool) -> None:
        """CmdSN ordering (RFC 7143 §4.2.2.1): immediate PDUs go at once; the expected CmdSN
        goes and releases its queued successors; in-window ones wait; the rest are dropped
        silently as the spec requires."""
        if immediate:
            self._handle_numbered(pdu)
            return
        max_cmd_sn = self._window()
        if cmd_sn == self._exp_cmd_sn and serial_le(cmd_sn, max_cmd_sn):
            self._exp_cmd_sn = (cmd_sn + 1) & _SN_MASK
            self._handle_numbered(pdu)
            self._drain_queue()
            return
        if serial_lt(self._exp_cmd_sn, cmd_sn) and serial_le(cmd_sn, max_cmd_sn):
            if cmd_sn not in self._queued:
                self._queued[cmd_sn] = pdu
            return
        log.debug("dropping PDU with CmdSN %d outside [%d, %d]", cmd_sn, self._exp_cmd_sn,
                  self._max_cmd_sn)  # fmt: skip

    def _drain_queue(self) -> None:
        while self._queued and self._state is ConnectionState.FULL_FEATURE:
            if self._out_bytes + self._promised_bytes >= self.output_room_bytes:
                self._output_blocked = True  # next_events drains the rest when there is room
                return
            pdu = self._queued.pop(self._exp_cmd_sn, None)
            if pdu is None:
                return
            self._exp_cmd_sn = (self._exp_cmd_sn + 1) & _SN_MASK
            self._handle_numbered(pdu)

    def _handle_numbered(self, pdu: Pdu) -> None:
        if isinstance(pdu, ScsiCommand):
            self._on_command(pdu)
        elif isinstance(pdu, TaskManagementRequest):
            self._on_tmf(pdu)
        elif isinstance(pdu, TextRequest):
            self._on_text(pdu)
        elif isinstance(pdu, LogoutRequest):
            self._on_logout(pdu)
        elif isinstance(pdu, NopOut):
            self._on_nop_out(pdu)

    # ---- login ----------------------------------------------------------------------------

    def _on_login_pdu(self, pdu: Pdu) -> None:
        self._login_requests += 1
        response = self._login.receive(pdu)
        self._send(response)
        if self._login.state is LoginState.FAILED:
            failure = self._login.failure
            self._close(f"login failed: {failure}")
            return
        result = self._login.result
        if self._login.state is not LoginState.COMPLETE or result is None:
            return
        params = result.params
        self._params = params
        self._isid, self._tsih, self._cid = result.isid, result.tsih, result.cid
        self._exp_cmd_sn = result.exp_cmd_sn
        self._max_cmd_sn = (result.exp_cmd_sn + self._limits.command_window - 1) & _SN_MASK
        self._stat_sn = result.stat_sn
        self._initiator_name = params.initiator_name
        self._discovery = params.session_type == SESSION_TYPE_DISCOVERY
        # RFC 7143 §13.1: digests start with the first PDU after the final Login Response.
        self._header_digest = params.header_digest
        self._data_digest = params.data_digest
        self._reader.configure(
            max_data_segment_length=params.max_recv_data_segment_length,
            header_digest=params.header_digest,
            data_digest=params.data_digest,
        )
        self._state = ConnectionState.FULL_FEATURE
        self._last_rx = self._clock()
        if not self._discovery and result.target is not None:
            target = result.target
            self._target_name = target.name
            self._inspector = self._portal.inspector(target.name)
            self._nexus = Nexus(
                initiator_port_name=f"{params.initiator_name},i,0x{result.isid:012x}",
                target_port_name=f"{target.name},t,0x{target.portal_group_tag:04x}",
                relative_target_port_id=self._port_id,
                target_port_group_id=self._group_id,
            )
            if isinstance(self._inspector, FastCommandUnit):
                self._fast_unit = self._inspector
                self._fast_segment = params.max_xmit_data_segment_length
                self._fast_burst = params.max_burst_length
                self._fast_immediate_max = (
                    min(params.first_burst_length, params.max_recv_data_segment_length)
                    if params.immediate_data
                    else 0
                )
        self._events.append(
            LoggedIn(
                session_type=params.session_type,
                initiator_name=params.initiator_name,
                target_name=self._target_name,
                isid=result.isid,
                tsih=result.tsih,
                nexus=self._nexus,
            )
        )

    # ---- NOP ------------------------------------------------------------------------------

    def _on_ping_answer(self, pdu: NopOut) -> None:
        if pdu.itt != RESERVED_TAG:
            # RFC 7143 §11.18.2: an answer to our ping carries ITT 0xffffffff.
            self._reject_pdu(RejectReason.PROTOCOL_ERROR, pdu)
            return
        if pdu.ttt == self._ping_ttt:
            self._ping_ttt = None
        # An answer to an older ping is harmless: it still proves the initiator is alive.

    def _on_nop_out(self, pdu: NopOut) -> None:
        if pdu.itt == RESERVED_TAG:
            return  # RFC 7143 §11.18: no response to ITT 0xffffffff
        echo = pdu.data[: self._params.max_xmit_data_segment_length]
        self._send(
            NopIn(
                itt=pdu.itt,
                ttt=RESERVED_TAG,
                stat_sn=self._next_stat_sn(),
                exp_cmd_sn=self._exp_cmd_sn,
                max_cmd_sn=self._window(),
                lun=pdu.lun,
                data=bytes(echo),
            )
        )

    # ---- SCSI commands --------------------------------------------------------------------

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

    # ---- text -----------------------------------------------------------------------------

    def _on_text(self, req: TextRequest) -> None:
        pending = self._text_pending
        if req.ttt != RESERVED_TAG:
            if pending is None or pending[0] != req.itt or pending[1] != req.ttt:
                self._reject_pdu(RejectReason.INVALID_PDU_FIELD, req)
                return
            self._send_text_chunk(req.itt, pending[2])
            return
        self._text_pending = None
        try:
            text = self._text.add(req.data, cont=req.cont)
            if text is None:
                # RFC 7143 §11.10.2: each C=1 request is answered with an empty response.
                self._send(self._text_response(req.itt, self._next_ttt(), b"", final=False))
                return
            pairs = parse_text(text)
        except RemoteProtocolError:
            self._reject_pdu(RejectReason.PROTOCOL_ERROR, req)
            return
        answers: TextPairs = []
        for key, value in pairs:
            if key == "SendTargets":
                answers += self._portal.send_targets(
                    value,
                    initiator_name=self._initiator_name,
                    session_target=None if self._discovery else self._target_name,
                )
            elif key in OPERATIONAL_KEYS:
                # Renegotiation in the Full Feature Phase is not supported (RFC 7143 §6.2).
                answers.append((key, REJECT))
            else:
                answers.append((key, NOT_UNDERSTOOD))
        encoded = encode_text(answers)[: self._limits.text_response_bytes_max]
        chunks = split_text(encoded, self._params.max_xmit_data_segment_length)
        self._send_text_chunk(req.itt, chunks)

    def _send_text_chunk(self, itt: int, chunks: list[bytes]) -> None:
        first, rest = chunks[0], chunks[1:]
        if rest:
            ttt = self._next_ttt()
            self._text_pending = (itt, ttt, rest)
            self._send(self._text_response(itt, ttt, first, final=False, cont=True))
        else:
            self._text_pending = None
            self._send(self._text_response(itt, RESERVED_TAG, first, final=True))

    def _text_response(
        self, itt: int, ttt: int, data: bytes, *, final: bool, cont: bool = False
    ) -> TextResponse:
        return TextResponse(
            itt=itt,
            ttt=ttt,
            stat_sn=self._next_stat_sn(),
            exp_cmd_sn=self._exp_cmd_sn,
            max_cmd_sn=self._window(),
            final=final,
            cont=cont,
            data=data,
        )

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


#: Opcodes whose BHS carries a CmdSN at bytes 24..27 (RFC 7143 §11.3, §11.5, §11.10, §11.14,
#: §11.18).
_NUMBERED_OPCODES = frozenset(
    {
        Opcode.SCSI_COMMAND,
        Opcode.TASK_MGMT_REQUEST,
        Opcode.TEXT_REQUEST,
        Opcode.LOGOUT_REQUEST,
        Opcode.NOP_OUT,
    }
)
#: Commands any LUN may receive: REPORT LUNS (SPC-4 §6.33) and INQUIRY (SPC-4 §6.6.1).
_ANY_LUN_OPS = frozenset({Op.REPORT_LUNS, Op.INQUIRY})


def _overlaps(spans: dict[int, tuple[int, int]], start: int, end: int) -> bool:
    """Whether any span shares a block with [start, end)."""
    return any(first < end and start < stop for first, stop in spans.values())


def _span_of(cdb: bytes) -> tuple[int, int] | None:
    """The blocks [start, end) a READ, WRITE, VERIFY or WRITE AND VERIFY CDB touches; None for
    any other command (or a CDB too short to say)."""
    opcode = cdb[0] if cdb else -1
    fields = _SPAN_FIELDS.get(opcode)
    if fields is not None:
        lba_field, length_field = fields
        if len(cdb) < length_field.size:
            return None
        lba = int(lba_field.unpack_from(cdb)[0])
        return lba, lba + int(length_field.unpack_from(cdb)[0])
    if opcode in _SPAN_CDB6_OPS and len(cdb) >= 6:
        lba = ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3]
        return lba, lba + (cdb[4] or 256)
    return None


def _truncate_write(cdb: bytes, edtl: int, needed: int) -> tuple[bytes, int] | None:
    """Shorten a WRITE's TRANSFER LENGTH to the whole blocks that fit in EDTL; returns the new
    CDB and its Data-Out length, or None for commands that cannot be shortened."""
    place = _TRANSFER_LENGTH_FIELDS.get(cdb[0])
    if place is None:
        return None
    offset, width = place
    if len(cdb) < offset + width:
        return None
    blocks = int.from_bytes(cdb[offset : offset + width], "big")
    if blocks == 0 or needed % blocks:
        return None
    block_size = needed // blocks
    keep = edtl // block_size
    out = bytearray(cdb)
    out[offset : offset + width] = keep.to_bytes(width, "big")
    return bytes(out), keep * block_size


def _encodable(pdu: Pdu) -> bool:
    try:
        encode_pdu_buffers(pdu)
    except LocalProtocolError:
        return False
    return True


__all__ = [
    "CloseConnection",
    "CommandInspector",
    "ConnectionState",
    "Event",
    "ExecuteCommand",
    "FastCommandUnit",
    "LoggedIn",
    "ResetRequested",
    "SessionLimits",
    "TargetConnection",
    "TargetPortal",
    "serial_le",
    "serial_lt",
]
