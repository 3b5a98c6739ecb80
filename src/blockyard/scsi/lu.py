"""The logical unit: executes CDBs against a :class:`BlockDevice` (sans-IO).

One :class:`LogicalUnit` serves one volume to every I_T nexus that reaches it, so unit
attentions, reservations and mode pages live here and are shared by all sessions.

Thread-safety: ``execute`` may be called from several threads at once. A state lock guards
unit attentions, reservations and mode pages; a write lock is held around every device write,
so COMPARE AND WRITE (which holds it across its read, compare and write) is atomic with respect
to every other write on this logical unit. Reads do not take it.

The fast path and the command handlers are mixins :class:`LogicalUnit` inherits, one module
each: :mod:`~blockyard.scsi.lu_fastpath` (the fast gate and the non-waiting calls; its
docstring has the fast path's contract), :mod:`~blockyard.scsi.lu_io` (reads, writes, VERIFY,
COMPARE AND WRITE), :mod:`~blockyard.scsi.lu_provisioning` (READ CAPACITY, WRITE SAME, UNMAP,
GET LBA STATUS) and :mod:`~blockyard.scsi.lu_primary` (the SPC-4 commands); the CDB decoding
they share is in :mod:`~blockyard.scsi.lu_cdb`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Final

from blockyard.blockdev import BlockDevice, BytesLike
from blockyard.errors import BlockyardError
from blockyard.scsi import commands as cmds
from blockyard.scsi.alua import AccessState, AluaProvider
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
    PARAMETER_LIST_LENGTH_ERROR,
    POWER_ON_OCCURRED,
    POWER_ON_RESET_OCCURRED,
    SCSI_BUS_RESET_OCCURRED,
    THIN_PROVISIONING_SOFT_THRESHOLD_REACHED,
    AscPair,
    Op,
    SenseKey,
)
from blockyard.scsi.errmap import IoKind, error_to_result
from blockyard.scsi.identity import LuIdentity
from blockyard.scsi.lu_cdb import PLAIN_RW, Handler, cdb_lba
from blockyard.scsi.lu_fastpath import (
    WOULD_BLOCK,
    FastGate,
    FastPath,
    PendingWrite,
    TryWritePending,
    WouldBlock,
    WouldWait,
)
from blockyard.scsi.lu_io import IoCommands
from blockyard.scsi.lu_primary import PrimaryCommands
from blockyard.scsi.lu_provisioning import ProvisioningCommands
from blockyard.scsi.modepages import DEFAULT_PAGES
from blockyard.scsi.nexus import Nexus, UnitAttentionQueue
from blockyard.scsi.reservations import PrState, PrType, ReservationStore
from blockyard.scsi.sense import (
    RESERVATION_CONFLICT,
    CommandError,
    ScsiResult,
    cdb_error,
    check_condition,
    illegal,
)

log = logging.getLogger("blockyard.scsi")

#: I_T nexuses remembered per logical unit; the oldest is forgotten beyond this (it then sees
#: a fresh power-on unit attention, which is always a safe thing to tell an initiator).
NEXUSES_MAX: Final = 1024
#: SPC-4 §6.36 Table 211/212: ATS, ATSS, CTSS, LURS, TRS (abort task/task set, clear task
#: set, LU reset, target reset), and ITNRS in byte 1. The transport may pass its own.
DEFAULT_TMF_SUPPORT: Final = (0x80 | 0x40 | 0x10 | 0x08 | 0x02, 0x01)

_PARAM_LIST_OPS: Final = frozenset(
    (Op.MODE_SELECT_6, Op.MODE_SELECT_10, Op.UNMAP, Op.PERSISTENT_RESERVE_OUT)
)
_EXACT_DATA_OPS: Final = frozenset((Op.COMPARE_AND_WRITE, Op.WRITE_SAME_10, Op.WRITE_SAME_16))


class ResetKind:
    """Which reset happened (SAM-5 §6.3, §6.6), and the unit attention it leaves behind."""

    LOGICAL_UNIT: Final[AscPair] = BUS_DEVICE_RESET_OCCURRED
    TARGET_WARM: Final[AscPair] = SCSI_BUS_RESET_OCCURRED
    TARGET_COLD: Final[AscPair] = POWER_ON_OCCURRED


class LogicalUnit(FastPath, IoCommands, ProvisioningCommands, PrimaryCommands):
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
        #: A replicated device's: the write is done at once, its acknowledgement may wait.
        self._try_write_pending: TryWritePending | None = getattr(device, "try_write_pending", None)
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
        #: try_execute's: plain READ/WRITE only, each failing with WouldWait rather than wait.
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
        except WouldWait:
            return WOULD_BLOCK
        except CommandError as err:
            return err.result
        except BlockyardError as exc:
            kind = IoKind.READ if spec.pr_class is PrClass.READ else IoKind.WRITE
            return error_to_result(
                exc, command=spec.name, lba=cdb_lba(view), kind=kind, volume=self._volume
            )
        data_in = result.data_in
        if data_in is not None and len(data_in) > alloc_len:
            return ScsiResult(result.status, result.sense, memoryview(data_in)[:alloc_len])
        return result

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
            for opcode, (decode, writes, fua_bit) in PLAIN_RW.items():
                self._try_handlers[opcode] = self._try_handler(decode, writes, fua_bit)
        for spec in cmds.COMMANDS:
            if spec.opcode in by_op:
                self._plain_handlers[spec.opcode] = by_op[spec.opcode]
            else:
                self._sa_handlers[(spec.opcode, spec.service_action)] = by_sa[
                    (spec.opcode, spec.service_action or 0)
                ]


__all__ = ["WOULD_BLOCK", "FastGate", "LogicalUnit", "PendingWrite", "ResetKind", "WouldBlock"]
