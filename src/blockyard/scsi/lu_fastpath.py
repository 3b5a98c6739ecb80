"""The logical unit's inline fast path (a mixin of :class:`~blockyard.scsi.lu.LogicalUnit`):
:meth:`~FastPath.fast_gate`, :meth:`~FastPath.fast_read` / :meth:`~FastPath.fast_write`, and
the non-waiting READ/WRITE handlers behind :meth:`~blockyard.scsi.lu.LogicalUnit.try_execute`.

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

import asyncio
import enum
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from blockyard.blockdev import BlockDevice, BytesLike
from blockyard.errors import BlockyardError
from blockyard.scsi import commands as cmds
from blockyard.scsi.alua import AccessState, AluaProvider
from blockyard.scsi.constants import Status
from blockyard.scsi.errmap import IoKind, error_to_result
from blockyard.scsi.lu_cdb import Handler
from blockyard.scsi.nexus import Nexus, UnitAttentionQueue
from blockyard.scsi.sense import GOOD, ScsiResult


class WouldBlock(enum.Enum):
    """The answer of a fast call that could not complete without waiting (see the module
    docstring); its one member is :data:`WOULD_BLOCK`."""

    WOULD_BLOCK = "would block"


WOULD_BLOCK: Final = WouldBlock.WOULD_BLOCK


class WouldWait(Exception):
    """Raised inside :meth:`LogicalUnit.try_execute` when the device would have to wait."""


@dataclass(frozen=True, slots=True)
class PendingWrite:
    """The answer of :meth:`FastPath.fast_write` for a write that is done here but may be
    acknowledged only once ``future`` completes (a replicated volume waits for its replicas'
    receipt). The transport answers the command later with :meth:`FastPath.fast_write_outcome`.
    ``future`` belongs to the transport's event loop and completes within the replication
    timeout (it never hangs)."""

    future: asyncio.Future[None]


#: A device's non-waiting write that may leave the acknowledgement pending: None when it
#: declined (nothing written), an LSN when done, a future when written but not yet
#: acknowledgeable (see ``ReplicatedDevice.try_write_pending``).
TryWritePending = Callable[[int, BytesLike], "int | asyncio.Future[None] | None"]


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


class FastPath:
    """The fast path of the logical unit; uses its state (declared below)."""

    if TYPE_CHECKING:
        state_generation: int
        _device: BlockDevice
        _alua: AluaProvider
        _volume: str
        _state_lock: threading.Lock
        _write_lock: threading.Lock
        _try_read: Callable[[int, int], BytesLike | None] | None
        _try_write: Callable[[int, BytesLike], int | None] | None
        _try_write_pending: TryWritePending | None
        _nexuses: dict[Nexus, UnitAttentionQueue]
        _reserved: bool
        _write_through: bool

        def _check_range(self, lba: int, blocks: int) -> None: ...

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

    def fast_write(
        self, opcode: int, lba: int, data: BytesLike
    ) -> ScsiResult | WouldBlock | PendingWrite | None:
        """Write for a WRITE that passed the fast gate (write-back) and its range check: None
        when done, the CHECK CONDITION the device error maps to, or :data:`WOULD_BLOCK` with
        nothing written when it would have to wait — another write of this logical unit holds
        the write lock (COMPARE AND WRITE holds it across its read), a MODE SELECT turned
        write-through on since the gate was read (the write would flush), or the device
        declined (a full WAL, a busy or slow writer): then run it through ``execute``. A
        :class:`PendingWrite` when it is written but its acknowledgement waits (replicas'
        receipt): answer it with :meth:`fast_write_outcome` once its future is done."""
        if self._write_through:
            return WOULD_BLOCK
        lock = self._write_lock
        if not lock.acquire(False):
            return WOULD_BLOCK
        try:
            pending_write = self._try_write_pending
            if pending_write is not None:
                got = pending_write(lba, data)
                if got is None:
                    return WOULD_BLOCK
                if not isinstance(got, int):
                    return PendingWrite(got)
            else:
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

    def fast_write_outcome(self, opcode: int, lba: int, pending: PendingWrite) -> ScsiResult:
        """The answer of a :class:`PendingWrite` whose future is done: GOOD, or the CHECK
        CONDITION its error maps to (the replicas could not confirm it, the lease lapsed
        meanwhile)."""
        finish: Callable[[asyncio.Future[None]], None] | None = getattr(
            self._device, "finish_pending_write", None
        )
        try:
            if finish is not None:
                finish(pending.future)
            else:
                pending.future.result()
        except BlockyardError as exc:
            return self._fast_error(exc, opcode, lba, IoKind.WRITE)
        return GOOD

    def _fast_error(self, exc: BlockyardError, opcode: int, lba: int, kind: IoKind) -> ScsiResult:
        spec = cmds.PLAIN_TABLE[opcode]
        name = spec.name if spec is not None else f"opcode {opcode:#04x}"
        return error_to_result(exc, command=name, lba=lba, kind=kind, volume=self._volume)

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
            raise WouldWait
        return ScsiResult(Status.GOOD, None, memoryview(data))

    def _try_do_write(self, lba: int, blocks: int, data: memoryview, fua: int) -> ScsiResult:
        self._check_range(lba, blocks)
        if blocks == 0:
            return GOOD
        if fua or self._write_through:
            raise WouldWait  # it would flush
        assert self._try_write is not None
        lock = self._write_lock
        if not lock.acquire(False):
            raise WouldWait
        try:
            if self._try_write(lba, data) is None:
                raise WouldWait
        finally:
            lock.release()
        return GOOD
