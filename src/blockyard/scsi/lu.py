"""The logical unit: executes CDBs against a :class:`BlockDevice` (sans-IO).

One :class:`LogicalUnit` serves one volume to every I_T nexus that reaches it, so unit
attentions, reservations and mode pages live here and are shared by all sessions.

Thread-safety: ``execute`` may be called from several threads at once. A state lock guards
unit attentions, reservations and mode pages; a write lock is held around every device write,
so COMPARE AND WRITE (which holds it across its read, compare and write) is atomic with respect
to every other write on this logical unit. Reads do not take it.

Fast path: a transport may skip ``execute`` for plain READ/WRITE (10)/(16) while
:meth:`LogicalUnit.fast_gate` says no gate applies to its nexus (no pending unit attention, no
reservation, an accessible ALUA state), and call :meth:`~LogicalUnit.fast_read` /
:meth:`~LogicalUnit.fast_write` itself. Every change that could close a gate bumps
``state_generation`` under the state lock, so one integer compare per command tells the
transport whether its cached verdict still holds. The fast calls never wait: on a device with
``try_read``/``try_write`` (the engine's), anything that would (data not in the page cache, a
full WAL, a busy writer, a flush) answers :data:`WOULD_BLOCK`, having done nothing, and the
transport runs the command through ``execute`` where it may block. The state lock is never
held across device I/O, so the event loop may take it; the write lock is, and the fast path
only tries it.
"""

from __future__ import annotations

import enum
import logging
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from blockyard.blockdev import BlockDevice, BytesLike
from blockyard.errors import BlockyardError
from blockyard.scsi import commands as cmds
from blockyard.scsi.alua import AccessState, AluaProvider, encode_rtpg
from blockyard.scsi.commands import AluaClass, CommandInfo, CommandSpec, PrClass
from blockyard.scsi.constants import (
    ASYMMETRIC_ACCESS_STATE_CHANGED,
    BUS_DEVICE_RESET_OCCURRED,
    CAPACITY_DATA_HAS_CHANGED,
    INVALID_FIELD_IN_CDB,
    LBA_OUT_OF_RANGE,
    LU_NOT_ACCESSIBLE_STANDBY,
    LU_NOT_ACCESSIBLE_TRANSITION,
    LU_NOT_ACCESSIBLE_UNAVAILABLE,
    MISCOMPARE_DURING_VERIFY,
    MODE_PARAMETERS_CHANGED,
    NO_ADDITIONAL_SENSE,
    PARAMETER_LIST_LENGTH_ERROR,
    POWER_ON_OCCURRED,
    POWER_ON_RESET_OCCURRED,
    SCSI_BUS_RESET_OCCURRED,
    THIN_PROVISIONING_SOFT_THRESHOLD_REACHED,
    AscPair,
    Op,
    SenseKey,
    Status,
)
from blockyard.scsi.errmap import IoKind, error_to_result
from blockyard.scsi.identity import (
    MAX_UNMAP_DESCRIPTORS,
    MAX_UNMAP_LBA_COUNT,
    MAX_WRITE_SAME_BLOCKS,
    LuIdentity,
    standard_inquiry,
    vpd_page,
)
from blockyard.scsi.modepages import DEFAULT_PAGES, PAGE_CACHING, mode_select, mode_sense
from blockyard.scsi.modepages import parse_mode_sense as _parse_mode_sense
from blockyard.scsi.nexus import Nexus, UnitAttentionQueue
from blockyard.scsi.pr import PrOutOutcome, pr_in, pr_out
from blockyard.scsi.reservations import PrState, PrType, ReservationStore
from blockyard.scsi.sense import (
    GOOD,
    RESERVATION_CONFLICT,
    CommandError,
    ScsiResult,
    build_sense,
    cdb_error,
    check_condition,
    illegal,
    param_error,
)

log = logging.getLogger("blockyard.scsi")

#: I_T nexuses remembered per logical unit; the oldest is forgotten beyond this (it then sees
#: a fresh power-on unit attention, which is always a safe thing to tell an initiator).
NEXUSES_MAX: Final = 1024
#: SBC-4 §5.8: GET LBA STATUS descriptors returned per command.
LBA_STATUS_DESCRIPTORS_MAX: Final = 64
#: SPC-4 §6.36 Table 211/212: ATS, ATSS, CTSS, LURS, TRS (abort task/task set, clear task
#: set, LU reset, target reset), and ITNRS in byte 1. The transport may pass its own.
DEFAULT_TMF_SUPPORT: Final = (0x80 | 0x40 | 0x10 | 0x08 | 0x02, 0x01)

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_LBA10 = struct.Struct(">xxIxH")  # LBA at byte 2, group at 6, length at 7
_LBA12 = struct.Struct(">xxII")
_LBA16 = struct.Struct(">xxQI")
_RC10 = struct.Struct(">II")
_RC16 = struct.Struct(">QIBBH16x")
_LBA_STATUS = struct.Struct(">QIB3x")

_COMPARE_CHUNK_BYTES: Final = 4096
_PARAM_LIST_OPS: Final = frozenset(
    (Op.MODE_SELECT_6, Op.MODE_SELECT_10, Op.UNMAP, Op.PERSISTENT_RESERVE_OUT)
)
_EXACT_DATA_OPS: Final = frozenset((Op.COMPARE_AND_WRITE, Op.WRITE_SAME_10, Op.WRITE_SAME_16))

Handler = Callable[[Nexus, memoryview, memoryview], ScsiResult]


class WouldBlock(enum.Enum):
    """The answer of a fast call that could not complete without waiting (see the module
    docstring); its one member is :data:`WOULD_BLOCK`."""

    WOULD_BLOCK = "would block"


WOULD_BLOCK: Final = WouldBlock.WOULD_BLOCK


class _WouldWait(Exception):
    """Raised inside :meth:`LogicalUnit.try_execute` when the device would have to wait."""


@dataclass(frozen=True, slots=True)
class FastGate:
    """The verdict of :meth:`LogicalUnit.fast_gate` for one nexus, valid while
    ``state_generation`` still equals ``generation``: with ``reads`` it may bypass ``execute``
    for plain reads, with ``writes`` also for plain writes.

    The geometry is a snapshot: a transport sends anything past ``block_count`` down the slow
    path, so a volume that grew is served correctly before the next gate check.
    """

    generation: int
    reads: bool
    writes: bool
    block_count: int
    logical_block_size: int
    max_transfer_blocks: int


class ResetKind:
    """Which reset happened (SAM-5 §6.3, §6.6), and the unit attention it leaves behind."""

    LOGICAL_UNIT: Final[AscPair] = BUS_DEVICE_RESET_OCCURRED
    TARGET_WARM: Final[AscPair] = SCSI_BUS_RESET_OCCURRED
    TARGET_COLD: Final[AscPair] = POWER_ON_OCCURRED


def _cdb6_span(cdb: memoryview) -> tuple[int, int]:
    return ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3], cdb[4] or 256


def _span10(cdb: memoryview) -> tuple[int, int]:
    lba, blocks = _LBA10.unpack_from(cdb)
    return lba, blocks


def _span12(cdb: memoryview) -> tuple[int, int]:
    lba, blocks = _LBA12.unpack_from(cdb)
    return lba, blocks


def _span16(cdb: memoryview) -> tuple[int, int]:
    lba, blocks = _LBA16.unpack_from(cdb)
    return lba, blocks


#: The plain READ and WRITE CDBs (SBC-4 §5): how to find their blocks, whether they write, and
#: their FUA bit in CDB byte 1 (none in WRITE (6), whose byte 1 holds LBA bits).
_FUA: Final = 0x08
_PLAIN_RW: Final[dict[int, tuple[Callable[[memoryview], tuple[int, int]], bool, int]]] = {
    Op.READ_6: (_cdb6_span, False, 0),
    Op.WRITE_6: (_cdb6_span, True, 0),
    Op.READ_10: (_span10, False, 0),
    Op.WRITE_10: (_span10, True, _FUA),
    Op.READ_12: (_span12, False, 0),
    Op.WRITE_12: (_span12, True, _FUA),
    Op.READ_16: (_span16, False, 0),
    Op.WRITE_16: (_span16, True, _FUA),
}


def _first_difference(a: memoryview, b: memoryview) -> int:
    """Byte offset of the first difference of two equal-length buffers, or -1."""
    for start in range(0, len(a), _COMPARE_CHUNK_BYTES):
        end = start + _COMPARE_CHUNK_BYTES
        if a[start:end] != b[start:end]:
            for i in range(start, min(end, len(a))):
                if a[i] != b[i]:
                    return i
    return -1


def _miscompare(offset: int) -> CommandError:
    # SBC-4 §5.3 / §5.33: INFORMATION holds the offset of the first miscompared byte.
    return CommandError(
        check_condition(SenseKey.MISCOMPARE, MISCOMPARE_DURING_VERIFY, information=offset)
    )


def _cdb_lba(cdb: memoryview) -> int | None:
    size = len(cdb)
    op = cdb[0]
    if op < 0x20 and size >= 4:
        return ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3]
    if op >= 0x80 and op < 0xA0 and size >= 10:
        return int(_U64.unpack_from(cdb, 2)[0])
    if size >= 6:
        return int(_U32.unpack_from(cdb, 2)[0])
    return None


class LogicalUnit:
    """One exported volume as a SCSI block device (SBC-4) behind any number of I_T nexuses."""

    def __init__(
        self,
        device: BlockDevice,
        identity: LuIdentity,
        alua: AluaProvider,
        reservations: ReservationStore,
        *,
        lun: int = 0,
        volume_name: str = "",
        report_luns: Callable[[], Sequence[int]] | None = None,
        tmf_support: tuple[int, int] = DEFAULT_TMF_SUPPORT,
    ) -> None:
        self._device = device
        self._identity = identity
        self._alua = alua
        self._store = reservations
        self._lun = lun
        self._volume = volume_name or identity.serial
        self._report_luns = report_luns or (lambda: (lun,))
        self._tmf_support = tmf_support
        self._state_lock = threading.Lock()
        self._write_lock = threading.Lock()
        #: Orders PERSISTENT RESERVE OUT, so its state is saved (fsync) outside the state lock.
        self._pr_lock = threading.Lock()
        #: The device's non-waiting calls, when it has them (the engine volume does).
        self._try_read: Callable[[int, int], BytesLike | None] | None = getattr(
            device, "try_read", None
        )
        self._try_write: Callable[[int, BytesLike], int | None] | None = getattr(
            device, "try_write", None
        )
        self._nexuses: dict[Nexus, UnitAttentionQueue] = {}
        self._pr: PrState = reservations.load()
        self._spc2_holder: Nexus | None = None
        self._reserved = self._pr.reservation is not None
        self._mode_pages: dict[int, bytes] = dict(DEFAULT_PAGES)
        self._write_through = False
        #: Bumped on every change of unit attentions, reservations, mode pages or ALUA state;
        #: see fast_gate. Read without the lock: a stale value only delays the slow path by the
        #: one command that was already racing the change.
        self.state_generation = 0
        self._zero_block = bytes(device.logical_block_size)
        self._plain_handlers: list[Handler | None] = [None] * 256
        #: try_execute's: plain READ/WRITE only, each failing with _WouldWait rather than wait.
        self._try_handlers: list[Handler | None] = [None] * 256
        self._sa_handlers: dict[tuple[int, int | None], Handler] = {}
        self._bind_handlers()

    # ---- the transport's API ------------------------------------------------------------------

    @property
    def lun(self) -> int:
        return self._lun

    @property
    def device(self) -> BlockDevice:
        return self._device

    @property
    def write_through(self) -> bool:
        """True while the caching mode page has WCE=0: every write then flushes the device,
        so a transport that must not block should run writes off its event loop."""
        return self._write_through

    def inspect(self, cdb: bytes | memoryview) -> CommandInfo:
        """Direction and Data-Out length of ``cdb``; never raises (see commands.inspect)."""
        return cmds.inspect(cdb, self._device.logical_block_size, self._device.max_transfer_blocks)

    def execute(
        self, nexus: Nexus, cdb: bytes | memoryview, data_out: BytesLike | None = None
    ) -> ScsiResult:
        """Run one command and return its status, sense and data-in. Never raises for any
        ``cdb`` or ``data_out``; data-in is trimmed to the CDB's allocation length.

        ``data_out`` is the Data-Out buffer the transport collected (``inspect`` says how much
        to solicit); shorter than required is refused, longer is cut to the required length
        except for COMPARE AND WRITE and WRITE SAME, which need it exact.
        """
        result = self._execute(nexus, cdb, data_out, self._plain_handlers)
        assert isinstance(result, ScsiResult), "only try_execute's handlers decline"
        return result

    def try_execute(
        self, nexus: Nexus, cdb: bytes | memoryview, data_out: BytesLike | None = None
    ) -> ScsiResult | WouldBlock:
        """:meth:`execute` for a plain READ or WRITE (6)/(10)/(12)/(16) that can finish without
        waiting, on a transport's event loop: the same answer, or :data:`WOULD_BLOCK` having
        done nothing — for any other command, a FUA write, write-through, a busy write lock,
        or when the device's ``try_read``/``try_write`` decline. (A pending unit attention is
        reported, as ``execute`` would: that answer needs no wait.)"""
        view = cdb if isinstance(cdb, memoryview) else memoryview(cdb)
        if not len(view) or self._try_handlers[view[0]] is None:
            return WOULD_BLOCK
        return self._execute(nexus, view, data_out, self._try_handlers)

    def _execute(
        self,
        nexus: Nexus,
        cdb: bytes | memoryview,
        data_out: BytesLike | None,
        plain_handlers: list[Handler | None],
    ) -> ScsiResult | WouldBlock:
        view = cdb if isinstance(cdb, memoryview) else memoryview(cdb)
        try:
            spec = cmds.lookup(view)
        except CommandError as err:
            pending = self._report_ua(nexus)
            return pending if pending is not None else err.result
        queue = self._nexuses.get(nexus)
        if queue is None or queue:
            if spec.reports_ua:
                pending = self._report_ua(nexus)
                if pending is not None:
                    return pending
            elif queue is None:
                self._queue_for(nexus)
        try:
            cmds.validate_cdb(spec, view)
            out_len, alloc_len = spec.xfer(
                view, self._device.logical_block_size, self._device.max_transfer_blocks
            )
            if spec.alua_class is not AluaClass.ANY:
                self._check_alua(nexus, spec)
            if (
                self._reserved
                and spec.pr_class is not PrClass.ALWAYS
                and self._conflicts(nexus, spec)
            ):
                return RESERVATION_CONFLICT
            data = self._take_data_out(spec, data_out, out_len)
            handler = plain_handlers[spec.opcode]
            if handler is None:
                handler = self._sa_handlers[(spec.opcode, spec.service_action)]
            result = handler(nexus, view, data)
        except _WouldWait:
            return WOULD_BLOCK
        except CommandError as err:
            return err.result
        except BlockyardError as exc:
            kind = IoKind.READ if spec.pr_class is PrClass.READ else IoKind.WRITE
            return error_to_result(
                exc, command=spec.name, lba=_cdb_lba(view), kind=kind, volume=self._volume
            )
        data_in = result.data_in
        if data_in is not None and len(data_in) > alloc_len:
            return ScsiResult(result.status, result.sense, memoryview(data_in)[:alloc_len])
        return result

    def fast_gate(self, nexus: Nexus) -> FastGate:
        """Whether ``nexus`` may use :meth:`fast_read` / :meth:`fast_write` for READ/WRITE
        (10)/(16) whose CDB sets nothing but DPO (and FUA for reads). Closed while a unit
        attention is pending for it (or it was never seen), any reservation exists, or its
        port group is not active; writes also while write-through is on (they would flush).
        The transport validates the CDB fields and range itself and must give exactly the
        outcome ``execute`` would."""
        device = self._device
        with self._state_lock:
            queue = self._nexuses.get(nexus)
            reads = not (queue is None or queue or self._reserved) and (
                self._alua.access_state(nexus.target_port_group_id)
                <= AccessState.ACTIVE_NON_OPTIMIZED
            )
            return FastGate(
                self.state_generation,
                reads,
                reads and not self._write_through,
                device.block_count,
                device.logical_block_size,
                device.max_transfer_blocks,
            )

    def fast_read(self, opcode: int, lba: int, blocks: int) -> BytesLike | ScsiResult | WouldBlock:
        """The data of a READ that passed the fast gate and its range check, the CHECK
        CONDITION the device error maps to, or :data:`WOULD_BLOCK` when the device cannot
        read it without waiting (not in the page cache): then run it through ``execute``."""
        try_read = self._try_read
        try:
            if try_read is None:
                return self._device.read(lba, blocks)
            data = try_read(lba, blocks)
        except BlockyardError as exc:
            return self._fast_error(exc, opcode, lba, IoKind.READ)
        return WOULD_BLOCK if data is None else data

    def fast_write(self, opcode: int, lba: int, data: BytesLike) -> ScsiResult | WouldBlock | None:
        """Write for a WRITE that passed the fast gate (write-back) and its range check: None
        when done, the CHECK CONDITION the device error maps to, or :data:`WOULD_BLOCK` with
        nothing written when it would have to wait — another write of this logical unit holds
        the write lock (COMPARE AND WRITE holds it across its read), a MODE SELECT turned
        write-through on since the gate was read (the write would flush), or the device
        declined (a full WAL, a busy or slow writer): then run it through ``execute``."""
        if self._write_through:
            return WOULD_BLOCK
        lock = self._write_lock
        if not lock.acquire(False):
            return WOULD_BLOCK
        try:
            try_write = self._try_write
            if try_write is None:
                self._device.write(lba, data)
            elif try_write(lba, data) is None:
                return WOULD_BLOCK
        except BlockyardError as exc:
            return self._fast_error(exc, opcode, lba, IoKind.WRITE)
        finally:
            lock.release()
        return None

    def _fast_error(self, exc: BlockyardError, opcode: int, lba: int, kind: IoKind) -> ScsiResult:
        spec = cmds.PLAIN_TABLE[opcode]
        name = spec.name if spec is not None else f"opcode {opcode:#04x}"
        return error_to_result(exc, command=name, lba=lba, kind=kind, volume=self._volume)

    def nexus_lost(self, nexus: Nexus) -> None:
        """The transport ended ``nexus`` (logout, connection loss, session reinstatement):
        its RESERVE(6) reservation is released and its unit attentions are dropped. Persistent
        reservations and registrations stay (SPC-4 §5.12.1)."""
        with self._state_lock:
            self.state_generation += 1
            self._nexuses.pop(nexus, None)
            if self._spc2_holder == nexus:
                self._spc2_holder = None
                self._update_reserved()

    def reset(self, kind: AscPair = ResetKind.LOGICAL_UNIT) -> None:
        """A LOGICAL UNIT RESET or target reset (SAM-5 §6.6): releases RESERVE(6)
        reservations, returns mode pages to defaults and raises ``kind`` on every nexus."""
        with self._state_lock:
            self.state_generation += 1
            self._spc2_holder = None
            self._update_reserved()
            self._mode_pages = dict(DEFAULT_PAGES)
            self._write_through = False
            for queue in self._nexuses.values():
                queue.push(kind)

    def notify_capacity_changed(self) -> None:
        """Call after the device grew: every nexus gets CAPACITY DATA HAS CHANGED (2A/09)."""
        self._broadcast(CAPACITY_DATA_HAS_CHANGED)

    def notify_soft_threshold(self) -> None:
        """Call when the space behind this thin-provisioned LU ran low: every nexus gets THIN
        PROVISIONING SOFT THRESHOLD REACHED (38/07, SBC-4 §4.7.3.7.3), before writes start
        failing with SPACE ALLOCATION FAILED."""
        self._broadcast(THIN_PROVISIONING_SOFT_THRESHOLD_REACHED)

    def notify_alua_changed(self) -> None:
        """Call after an ALUA state changed: ASYMMETRIC ACCESS STATE CHANGED (2A/06). Also
        what makes fast-path transports look at the new state (see :meth:`fast_gate`)."""
        self._broadcast(ASYMMETRIC_ACCESS_STATE_CHANGED)

    def pending_unit_attentions(self, nexus: Nexus) -> tuple[AscPair, ...]:
        with self._state_lock:
            queue = self._nexuses.get(nexus)
            return () if queue is None else queue.snapshot()

    @property
    def reservation_state(self) -> PrState:
        return self._pr

    # ---- unit attentions ----------------------------------------------------------------------

    def _queue_for(self, nexus: Nexus) -> UnitAttentionQueue:
        """The nexus's queue; a nexus seen for the first time starts with a power-on UA.
        Caller holds no lock."""
        with self._state_lock:
            return self._queue_locked(nexus)

    def _queue_locked(self, nexus: Nexus) -> UnitAttentionQueue:
        queue = self._nexuses.get(nexus)
        if queue is None:
            if len(self._nexuses) >= NEXUSES_MAX:
                self._nexuses.pop(next(iter(self._nexuses)))
            queue = UnitAttentionQueue()
            queue.push(POWER_ON_RESET_OCCURRED)
            self._nexuses[nexus] = queue
            self.state_generation += 1
        return queue

    def _report_ua(self, nexus: Nexus) -> ScsiResult | None:
        with self._state_lock:
            asc = self._queue_locked(nexus).pop()
            if asc is not None:
                self.state_generation += 1
        if asc is None:
            return None
        return check_condition(SenseKey.UNIT_ATTENTION, asc)

    def _broadcast(self, asc: AscPair, *, except_nexus: Nexus | None = None) -> None:
        with self._state_lock:
            self._broadcast_locked(asc, except_nexus)

    def _broadcast_locked(self, asc: AscPair, except_nexus: Nexus | None) -> None:
        self.state_generation += 1
        for nexus, queue in self._nexuses.items():
            if nexus != except_nexus:
                queue.push(asc)

    # ---- gates --------------------------------------------------------------------------------

    def _check_alua(self, nexus: Nexus, spec: CommandSpec) -> None:
        state = self._alua.access_state(nexus.target_port_group_id)
        if state <= AccessState.ACTIVE_NON_OPTIMIZED:
            return
        if state == AccessState.STANDBY:
            if spec.alua_class is AluaClass.STANDBY:
                return
            asc = LU_NOT_ACCESSIBLE_STANDBY
        elif state == AccessState.TRANSITIONING:
            asc = LU_NOT_ACCESSIBLE_TRANSITION
        else:
            asc = LU_NOT_ACCESSIBLE_UNAVAILABLE
        raise CommandError(check_condition(SenseKey.NOT_READY, asc))

    def _update_reserved(self) -> None:
        self.state_generation += 1
        self._reserved = self._spc2_holder is not None or self._pr.reservation is not None

    def _conflicts(self, nexus: Nexus, spec: CommandSpec) -> bool:
        """SPC-4 §5.12.1 Table 58 and SBC-4 Table 13, plus SPC-2 RESERVE(6) (§5.9.1)."""
        cls = spec.pr_class
        holder = self._spc2_holder
        if holder is not None and cls is not PrClass.SELF:
            return holder != nexus
        state = self._pr
        res = state.reservation
        if res is None or cls in (PrClass.NOT_SPC2, PrClass.SELF, PrClass.ALWAYS):
            return False
        name, port = nexus.initiator_port_name, nexus.relative_target_port_id
        if state.is_holder(name, port):
            return False
        if cls is PrClass.READ:
            if not res.type.exclusive_access:
                return False
            if res.type == PrType.EXCLUSIVE_ACCESS:
                return True
        elif res.type in (PrType.WRITE_EXCLUSIVE, PrType.EXCLUSIVE_ACCESS):
            return True
        return state.find(name, port) is None

    def _take_data_out(
        self, spec: CommandSpec, data_out: BytesLike | None, needed: int
    ) -> memoryview:
        have = 0 if data_out is None else len(data_out)
        exact = spec.opcode in _EXACT_DATA_OPS
        if needed == 0:
            # A zero-block COMPARE AND WRITE or an NDOB WRITE SAME takes no data; a buffer
            # offered anyway means the CDB and the transfer disagree (SBC-4 §5.3, §5.50).
            if exact and have:
                raise cdb_error(13 if spec.opcode == Op.COMPARE_AND_WRITE else 1)
            return memoryview(b"")
        if data_out is None or have < needed or (exact and have != needed):
            if spec.opcode in _PARAM_LIST_OPS:
                raise illegal(PARAMETER_LIST_LENGTH_ERROR)
            raise illegal(INVALID_FIELD_IN_CDB)
        view = data_out if isinstance(data_out, memoryview) else memoryview(data_out)
        return view[:needed] if have > needed else view

    def _check_range(self, lba: int, blocks: int) -> None:
        if lba + blocks > self._device.block_count:
            raise CommandError(check_condition(SenseKey.ILLEGAL_REQUEST, LBA_OUT_OF_RANGE))

    # ---- dispatch -----------------------------------------------------------------------------

    def _bind_handlers(self) -> None:
        by_op: dict[int, Handler] = {
            Op.TEST_UNIT_READY: self._test_unit_ready,
            Op.REQUEST_SENSE: self._request_sense,
            Op.READ_6: self._read6,
            Op.WRITE_6: self._write6,
            Op.INQUIRY: self._inquiry,
            Op.MODE_SELECT_6: self._mode_select,
            Op.RESERVE_6: self._reserve_spc2,
            Op.RELEASE_6: self._release_spc2,
            Op.MODE_SENSE_6: self._mode_sense,
            Op.START_STOP_UNIT: self._no_op,
            Op.PREVENT_ALLOW_MEDIUM_REMOVAL: self._no_op,
            Op.READ_CAPACITY_10: self._read_capacity10,
            Op.READ_10: self._read10,
            Op.WRITE_10: self._write10,
            Op.WRITE_AND_VERIFY_10: self._write10,
            Op.VERIFY_10: self._verify10,
            Op.PRE_FETCH_10: self._pre_fetch10,
            Op.SYNCHRONIZE_CACHE_10: self._sync10,
            Op.WRITE_SAME_10: self._write_same10,
            Op.UNMAP: self._unmap,
            Op.MODE_SELECT_10: self._mode_select,
            Op.RESERVE_10: self._reserve_spc2,
            Op.RELEASE_10: self._release_spc2,
            Op.MODE_SENSE_10: self._mode_sense,
            Op.PERSISTENT_RESERVE_IN: self._pr_in,
            Op.PERSISTENT_RESERVE_OUT: self._pr_out,
            Op.READ_16: self._read16,
            Op.COMPARE_AND_WRITE: self._compare_and_write,
            Op.WRITE_16: self._write16,
            Op.WRITE_AND_VERIFY_16: self._write16,
            Op.VERIFY_16: self._verify16,
            Op.PRE_FETCH_16: self._pre_fetch16,
            Op.SYNCHRONIZE_CACHE_16: self._sync16,
            Op.WRITE_SAME_16: self._write_same16,
            Op.REPORT_LUNS: self._report_luns_cmd,
            Op.READ_12: self._read12,
            Op.WRITE_12: self._write12,
            Op.WRITE_AND_VERIFY_12: self._write12,
            Op.VERIFY_12: self._verify12,
        }
        by_sa: dict[tuple[int, int], Handler] = {
            (Op.SERVICE_ACTION_IN_16, 0x10): self._read_capacity16,
            (Op.SERVICE_ACTION_IN_16, 0x12): self._get_lba_status,
            (Op.MAINTENANCE_IN, 0x0A): self._report_target_port_groups,
            (Op.MAINTENANCE_IN, 0x0C): self._report_supported_opcodes,
            (Op.MAINTENANCE_IN, 0x0D): self._report_supported_tmfs,
        }
        if self._try_read is not None and self._try_write is not None:
            for opcode, (decode, writes, fua_bit) in _PLAIN_RW.items():
                self._try_handlers[opcode] = self._try_handler(decode, writes, fua_bit)
        for spec in cmds.COMMANDS:
            if spec.opcode in by_op:
                self._plain_handlers[spec.opcode] = by_op[spec.opcode]
            else:
                self._sa_handlers[(spec.opcode, spec.service_action)] = by_sa[
                    (spec.opcode, spec.service_action or 0)
                ]

    # ---- block commands (SBC-4) ---------------------------------------------------------------

    def _try_handler(
        self, decode: Callable[[memoryview], tuple[int, int]], writes: bool, fua_bit: int
    ) -> Handler:
        if writes:
            return lambda nexus, cdb, data: self._try_do_write(*decode(cdb), data, cdb[1] & fua_bit)
        return lambda nexus, cdb, data: self._try_do_read(*decode(cdb))

    def _try_do_read(self, lba: int, blocks: int) -> ScsiResult:
        self._check_range(lba, blocks)
        if blocks == 0:
            return GOOD
        assert self._try_read is not None
        data = self._try_read(lba, blocks)
        if data is None:
            raise _WouldWait
        return ScsiResult(Status.GOOD, None, memoryview(data))

    def _try_do_write(self, lba: int, blocks: int, data: memoryview, fua: int) -> ScsiResult:
        self._check_range(lba, blocks)
        if blocks == 0:
            return GOOD
        if fua or self._write_through:
            raise _WouldWait  # it would flush
        assert self._try_write is not None
        lock = self._write_lock
        if not lock.acquire(False):
            raise _WouldWait
        try:
            if self._try_write(lba, data) is None:
                raise _WouldWait
        finally:
            lock.release()
        return GOOD

    def _do_read(self, lba: int, blocks: int) -> ScsiResult:
        self._check_range(lba, blocks)
        if blocks == 0:
            return GOOD
        return ScsiResult(Status.GOOD, None, memoryview(self._device.read(lba, blocks)))

    def _do_write(self, lba: int, blocks: int, data: memoryview, fua: bool) -> ScsiResult:
        self._check_range(lba, blocks)
        if blocks == 0:
            return GOOD
        with self._write_lock:
            self._device.write(lba, data)
        if fua or self._write_through:
            # Outside the write lock: a FUA write of a replicated volume waits for replicas
            # here, and other writers (some on the event loop) must not wait behind it. A flush
            # covers this write as FUA would (SBC-4 §5.40: FUA = durable before GOOD).
            self._device.flush()
        return GOOD

    def _read6(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        lba = ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3]
        return self._do_read(lba, cdb[4] or 256)

    def _write6(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        lba = ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3]
        return self._do_write(lba, cdb[4] or 256, data, False)

    def _read10(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        lba, blocks = _LBA10.unpack_from(cdb)
        return self._do_read(lba, blocks)

    def _write10(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        lba, blocks = _LBA10.unpack_from(cdb)
        return self._do_write(lba, blocks, data, bool(cdb[1] & 0x08))

    def _read12(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        lba, blocks = _LBA12.unpack_from(cdb)
        return self._do_read(lba, blocks)

    def _write12(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        lba, blocks = _LBA12.unpack_from(cdb)
        return self._do_write(lba, blocks, data, bool(cdb[1] & 0x08))

    def _read16(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        lba, blocks = _LBA16.unpack_from(cdb)
        return self._do_read(lba, blocks)

    def _write16(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        lba, blocks = _LBA16.unpack_from(cdb)
        return self._do_write(lba, blocks, data, bool(cdb[1] & 0x08))

    def _verify(self, cdb: memoryview, lba: int, blocks: int, data: memoryview) -> ScsiResult:
        self._check_range(lba, blocks)
        if blocks == 0:
            return GOOD
        stored = memoryview(self._device.read(lba, blocks))
        bytchk = (cdb[1] >> 1) & 0x03
        if bytchk == 0b01:
            offset = _first_difference(stored, data)
        elif bytchk == 0b11:
            lbs = self._device.logical_block_size
            offset = -1
            for i in range(blocks):
                diff = _first_difference(stored[i * lbs : (i + 1) * lbs], data)
                if diff >= 0:
                    offset = i * lbs + diff
                    break
        else:
            return GOOD
        if offset >= 0:
            raise _miscompare(offset)
        return GOOD

    def _verify10(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        lba, blocks = _LBA10.unpack_from(cdb)
        return self._verify(cdb, lba, blocks, data)

    def _verify12(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        lba, blocks = _LBA12.unpack_from(cdb)
        return self._verify(cdb, lba, blocks, data)

    def _verify16(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        lba, blocks = _LBA16.unpack_from(cdb)
        return self._verify(cdb, lba, blocks, data)

    def _pre_fetch10(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        lba, blocks = _LBA10.unpack_from(cdb)
        self._check_range(lba, blocks)
        return GOOD

    def _pre_fetch16(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        lba, blocks = _LBA16.unpack_from(cdb)
        self._check_range(lba, blocks)
        return GOOD

    def _sync10(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        lba, blocks = _LBA10.unpack_from(cdb)
        self._check_range(lba, blocks)
        self._device.flush()
        return GOOD

    def _sync16(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        lba, blocks = _LBA16.unpack_from(cdb)
        self._check_range(lba, blocks)
        self._device.flush()
        return GOOD

    def _write_same(
        self, cdb: memoryview, lba: int, blocks: int, count_byte: int, data: memoryview
    ) -> ScsiResult:
        self._check_range(lba, blocks)
        if blocks == 0:
            # WSNZ=1 in the Block Limits page: zero means nothing, and is refused.
            raise cdb_error(count_byte)
        if blocks > MAX_WRITE_SAME_BLOCKS:
            raise cdb_error(count_byte)
        unmap = bool(cdb[1] & 0x08)
        pattern = data if len(data) else memoryview(self._zero_block)
        device = self._device
        with self._write_lock:
            if pattern == self._zero_block:
                # LBPRZ=1: deallocated blocks read as zeros, so both paths give the same data.
                if unmap:
                    device.unmap(lba, blocks)
                else:
                    device.write_zeroes(lba, blocks)
            else:
                chunk_blocks = max(1, min(device.max_transfer_blocks, 256, blocks))
                chunk = bytes(pattern) * chunk_blocks
                done = 0
                while done < blocks:
                    n = min(chunk_blocks, blocks - done)
                    device.write(lba + done, memoryview(chunk)[: n * len(pattern)])
                    done += n
        if self._write_through:
            device.flush()  # outside the lock, as in _do_write
        return GOOD

    def _write_same10(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        lba, blocks = _LBA10.unpack_from(cdb)
        return self._write_same(cdb, lba, blocks, 7, data)

    def _write_same16(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        lba, blocks = _LBA16.unpack_from(cdb)
        return self._write_same(cdb, lba, blocks, 10, data)

    def _unmap(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        # SBC-4 §5.32: a zero-length parameter list is not an error.
        if len(data) == 0:
            return GOOD
        if len(data) < 8:
            raise illegal(PARAMETER_LIST_LENGTH_ERROR)
        desc_bytes = _U16.unpack_from(data, 2)[0]
        if desc_bytes > len(data) - 8:
            raise illegal(PARAMETER_LIST_LENGTH_ERROR)
        count = desc_bytes // 16
        if count > MAX_UNMAP_DESCRIPTORS:
            raise param_error(2)
        ranges: list[tuple[int, int]] = []
        capacity = self._device.block_count
        for i in range(count):
            off = 8 + 16 * i
            lba, blocks = struct.unpack_from(">QI", data, off)
            if blocks > MAX_UNMAP_LBA_COUNT:
                raise param_error(off + 8)
            if lba + blocks > capacity:
                raise CommandError(check_condition(SenseKey.ILLEGAL_REQUEST, LBA_OUT_OF_RANGE))
            if blocks:
                ranges.append((lba, blocks))
        with self._write_lock:
            for lba, blocks in ranges:
                self._device.unmap(lba, blocks)
        if self._write_through and ranges:
            self._device.flush()  # outside the lock, as in _do_write
        return GOOD

    def _compare_and_write(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        lba = _U64.unpack_from(cdb, 2)[0]
        blocks = cdb[13]
        self._check_range(lba, blocks)
        if blocks == 0:
            return GOOD
        half = blocks * self._device.logical_block_size
        with self._write_lock:
            stored = memoryview(self._device.read(lba, blocks))
            offset = _first_difference(stored, data[:half])
            if offset >= 0:
                raise _miscompare(offset)
            self._device.write(lba, data[half:])
        if cdb[1] & 0x08 or self._write_through:
            self._device.flush()  # outside the lock, as in _do_write
        return GOOD

    def _read_capacity10(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        if not cdb[8] & 0x01 and _U32.unpack_from(cdb, 2)[0]:
            # SBC-4 §5.20: with PMI=0 the LOGICAL BLOCK ADDRESS field must be zero.
            raise cdb_error(2)
        last = min(self._device.block_count - 1, 0xFFFFFFFF)
        return ScsiResult(Status.GOOD, None, _RC10.pack(last, self._device.logical_block_size))

    def _read_capacity16(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        if not cdb[14] & 0x01 and _U64.unpack_from(cdb, 2)[0]:
            raise cdb_error(2)
        dev = self._device
        per_physical = max(1, dev.physical_block_size // dev.logical_block_size)
        exponent = per_physical.bit_length() - 1
        # SBC-4 §5.21.2: LBPME=1 (thin provisioned), LBPRZ=1, lowest aligned LBA 0.
        payload = _RC16.pack(
            dev.block_count - 1, dev.logical_block_size, 0, exponent & 0x0F, 0x8000 | 0x4000
        )
        return ScsiResult(Status.GOOD, None, payload)

    def _get_lba_status(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        lba = _U64.unpack_from(cdb, 2)[0]
        alloc = _U32.unpack_from(cdb, 10)[0]
        capacity = self._device.block_count
        if lba >= capacity:
            raise CommandError(check_condition(SenseKey.ILLEGAL_REQUEST, LBA_OUT_OF_RANGE))
        wanted = max(1, min(LBA_STATUS_DESCRIPTORS_MAX, (alloc - 8) // 16 if alloc > 8 else 1))
        body = bytearray()
        cur = lba
        for _ in range(wanted):
            if cur >= capacity:
                break
            status = self._device.lba_status(cur)
            # SBC-4 §5.8.2: the first descriptor starts at the requested LBA even when the
            # device's extent began earlier; later ones start where the previous ended.
            start = max(status.lba, cur)
            blocks = min(status.lba + status.block_count - start, 0xFFFFFFFF, capacity - start)
            if blocks <= 0:
                break
            # SBC-4 §5.8.2 PROVISIONING STATUS: 0 mapped, 1 deallocated.
            body += _LBA_STATUS.pack(start, blocks, 0 if status.mapped else 1)
            cur = start + blocks
        return ScsiResult(Status.GOOD, None, _U32.pack(len(body) + 4) + bytes(4) + bytes(body))

    # ---- primary commands (SPC-4) -------------------------------------------------------------

    def _no_op(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        return GOOD

    def _test_unit_ready(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        return GOOD

    def _request_sense(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        with self._state_lock:
            asc = self._queue_locked(nexus).pop()
            if asc is not None:
                self.state_generation += 1
        # SPC-4 §6.39: a pending unit attention is returned as parameter data and cleared.
        if asc is not None:
            return ScsiResult(Status.GOOD, None, build_sense(SenseKey.UNIT_ATTENTION, asc))
        return ScsiResult(Status.GOOD, None, build_sense(SenseKey.NO_SENSE, NO_ADDITIONAL_SENSE))

    def _inquiry(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        page = cdb[2]
        if not cdb[1] & 0x01:
            if page:
                raise cdb_error(2)
            return ScsiResult(Status.GOOD, None, standard_inquiry(self._identity))
        payload = vpd_page(page, self._identity, self._device, nexus)
        if payload is None:
            raise cdb_error(2)
        return ScsiResult(Status.GOOD, None, payload)

    def _report_luns_cmd(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        select = cdb[2]
        if select not in (0x00, 0x01, 0x02):
            raise cdb_error(2)
        if _U32.unpack_from(cdb, 6)[0] < 16:
            # SPC-4 §6.33: an ALLOCATION LENGTH below 16 is an error.
            raise cdb_error(6)
        luns = [] if select == 0x01 else sorted(set(self._report_luns()))[:16384]
        body = b"".join(_encode_lun(lun) for lun in luns)
        return ScsiResult(Status.GOOD, None, _U32.pack(len(body)) + bytes(4) + body)

    def _mode_sense(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        req = _parse_mode_sense(cdb)
        with self._state_lock:
            current = self._mode_pages
        payload = mode_sense(
            req, current, self._device.block_count, self._device.logical_block_size
        )
        return ScsiResult(Status.GOOD, None, payload)

    def _mode_select(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        with self._state_lock:
            new = mode_select(cdb, data, self._mode_pages, self._device.logical_block_size)
            if new is None:
                return GOOD
            self.state_generation += 1
            self._mode_pages = new
            self._write_through = not new[PAGE_CACHING][2] & 0x04
            self._queue_locked(nexus)
            self._broadcast_locked(MODE_PARAMETERS_CHANGED, nexus)
        return GOOD

    def _report_target_port_groups(
        self, nexus: Nexus, cdb: memoryview, data: memoryview
    ) -> ScsiResult:
        fmt = cdb[1] >> 5
        if fmt > 1:
            raise cdb_error(1, 7)
        payload = encode_rtpg(self._alua.port_groups(), extended=fmt == 1)
        return ScsiResult(Status.GOOD, None, payload)

    def _report_supported_opcodes(
        self, nexus: Nexus, cdb: memoryview, data: memoryview
    ) -> ScsiResult:
        return ScsiResult(Status.GOOD, None, cmds.report_supported_opcodes(cdb))

    def _report_supported_tmfs(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        if _U32.unpack_from(cdb, 6)[0] < 4:
            raise cdb_error(6)
        first, second = self._tmf_support
        if cdb[2] & 0x80:
            # REPD=1: extended format with ADDITIONAL DATA LENGTH 0Ch (SPC-4 §6.36.2).
            return ScsiResult(Status.GOOD, None, bytes([first, second, 0, 0x0C]) + bytes(12))
        return ScsiResult(Status.GOOD, None, bytes([first, second, 0, 0]))

    def _reserve_spc2(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        with self._state_lock:
            # SPC-4 §5.12.3 (CRH=1): RESERVE conflicts with any persistent reservation.
            if self._pr.reservation is not None:
                return RESERVATION_CONFLICT
            if self._spc2_holder is not None and self._spc2_holder != nexus:
                return RESERVATION_CONFLICT
            self._spc2_holder = nexus
            self._update_reserved()
        return GOOD

    def _release_spc2(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        with self._state_lock:
            if self._pr.reservation is not None:
                return RESERVATION_CONFLICT
            if self._spc2_holder == nexus:
                self._spc2_holder = None
                self._update_reserved()
        return GOOD

    def _pr_in(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        return ScsiResult(Status.GOOD, None, pr_in(self._pr, cdb[1] & 0x1F))

    def _pr_out(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        # The new state is saved (fsynced) before it takes effect, under the lock that orders
        # every PERSISTENT RESERVE OUT (only it changes the state), not under the state lock:
        # the event loop takes that one (fast gate, unit attentions) and must not wait on disk.
        with self._pr_lock:
            outcome = pr_out(self._pr, nexus, cdb, data)
            if outcome.state is not None:
                self._store.save(outcome.state)
            self._apply_pr_outcome(nexus, outcome)
        return outcome.result

    def _apply_pr_outcome(self, nexus: Nexus, outcome: PrOutOutcome) -> None:
        with self._state_lock:
            if outcome.state is not None:
                self._pr = outcome.state
                self._update_reserved()
                if outcome.unit_attentions:
                    self.state_generation += 1
                for registration, asc in outcome.unit_attentions:
                    for other, queue in self._nexuses.items():
                        if other != nexus and registration.matches(
                            other.initiator_port_name, other.relative_target_port_id
                        ):
                            queue.push(asc)


def _encode_lun(lun: int) -> bytes:
    """SAM-5 §4.7.7: peripheral addressing below 256, flat space addressing up to 16383."""
    if lun < 256:
        return bytes([0, lun]) + bytes(6)
    return bytes([0x40 | ((lun >> 8) & 0x3F), lun & 0xFF]) + bytes(6)


__all__ = ["WOULD_BLOCK", "FastGate", "LogicalUnit", "ResetKind", "WouldBlock"]
