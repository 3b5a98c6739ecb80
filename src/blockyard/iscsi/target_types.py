"""The target connection's vocabulary (see :mod:`blockyard.iscsi.target_session`): serial
number arithmetic, the protocols it reaches the server and the logical unit through, its
limits, the events it hands the adapter, and its task records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol, runtime_checkable

from blockyard.blockdev import BytesLike
from blockyard.iscsi.login import TargetConfig
from blockyard.iscsi.pdu import LogoutResponse, ScsiCommand, TaskManagementResponse
from blockyard.iscsi.target_task import WriteTransfer
from blockyard.iscsi.text import TextPairs
from blockyard.scsi.commands import CommandInfo
from blockyard.scsi.constants import AscPair
from blockyard.scsi.lu import FastGate, PendingWrite, WouldBlock
from blockyard.scsi.nexus import Nexus
from blockyard.scsi.sense import ScsiResult

_SN_MASK = 0xFFFFFFFF  # RFC 7143 §4.2.2.1: 32-bit serial number arithmetic (RFC 1982)
_SN_HALF = 1 << 31
#: Time allowed from TCP connect to the end of login. A real initiator needs a few round trips
#: (well under a second, CHAP included); a connection that has not logged in holds a pre-login
#: slot that unauthenticated peers compete for, so it must not hold it long.
LOGIN_TIMEOUT_S = 10.0


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
    ) -> ScsiResult | WouldBlock | PendingWrite | None: ...

    def fast_write_outcome(self, opcode: int, lba: int, pending: PendingWrite) -> ScsiResult: ...


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


@dataclass(frozen=True, slots=True)
class AwaitWrite:
    """Fast-path writes already done on the logical unit whose acknowledgement waits for
    ``pending`` (a replicated volume's receipt). When its future is done, the server calls
    ``command_done(task_id, unit.fast_write_outcome(opcode, lba, pending))`` for each task id
    (in order); until then they are executing tasks like any other."""

    task_ids: tuple[int, ...]
    opcode: int
    lba: int
    pending: PendingWrite


Event = LoggedIn | ExecuteCommand | ResetRequested | CloseConnection | AwaitWrite


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
