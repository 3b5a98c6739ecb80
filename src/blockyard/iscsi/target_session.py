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

The connection is assembled from one mixin per job: :mod:`~blockyard.iscsi.target_commands`
(SCSI commands, Data-Out, responses), :mod:`~blockyard.iscsi.target_fast_path` (plain
READ/WRITE answered inline), :mod:`~blockyard.iscsi.target_tmf` (task management, Logout)
and :mod:`~blockyard.iscsi.target_text` (Text); this module keeps the adapter API, the CmdSN
window and dispatch, login and NOP. The value types are in :mod:`~blockyard.iscsi.target_types`.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator

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
    TargetLogin,
    TargetLoginSettings,
)
from blockyard.iscsi.negotiation import SESSION_TYPE_DISCOVERY, NegotiatedParameters
from blockyard.iscsi.pdu import (
    BHS_LENGTH,
    IMMEDIATE_BIT,
    OPCODE_MASK,
    RESERVED_TAG,
    DataOut,
    LoginRequest,
    LogoutRequest,
    NopIn,
    NopOut,
    Opcode,
    Pdu,
    Reject,
    ScsiCommand,
    SnackRequest,
    TaskManagementRequest,
    TextRequest,
    encode_pdu_buffers,
)
from blockyard.iscsi.reader import NEED_DATA, PduReader, PeerRole
from blockyard.iscsi.target_commands import CommandPath
from blockyard.iscsi.target_fast_path import WRITE_RUN_BYTES_MAX, FastPath
from blockyard.iscsi.target_text import TextRequests
from blockyard.iscsi.target_tmf import TaskManagement
from blockyard.iscsi.target_types import (
    _SN_MASK,
    LOGIN_TIMEOUT_S,
    AwaitWrite,
    CloseConnection,
    CommandInspector,
    ConnectionState,
    Event,
    ExecuteCommand,
    FastCommandUnit,
    LoggedIn,
    ResetRequested,
    SessionLimits,
    TargetPortal,
    _Deferred,
    _Task,
    serial_le,
    serial_lt,
)
from blockyard.iscsi.text import TextAssembler
from blockyard.scsi.nexus import Nexus
from blockyard.scsi.sense import ScsiResult

log = logging.getLogger("blockyard.iscsi.target")

#: ``output_room_bytes`` until the adapter sets it: no bound of the connection's own.
OUTPUT_ROOM_UNBOUNDED = 1 << 62


class TargetConnection(CommandPath, FastPath, TaskManagement, TextRequests):
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
        self._init_fast_path()

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


def _encodable(pdu: Pdu) -> bool:
    try:
        encode_pdu_buffers(pdu)
    except LocalProtocolError:
        return False
    return True


__all__ = [
    "LOGIN_TIMEOUT_S",
    "WRITE_RUN_BYTES_MAX",
    "AwaitWrite",
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
