"""The logical unit's primary commands (a mixin of :class:`~blockyard.scsi.lu.LogicalUnit`,
SPC-4): TEST UNIT READY, REQUEST SENSE, INQUIRY, REPORT LUNS, MODE SENSE/SELECT, REPORT TARGET
PORT GROUPS, REPORT SUPPORTED OPERATION CODES / TASK MANAGEMENT FUNCTIONS, RESERVE/RELEASE and
PERSISTENT RESERVE IN/OUT."""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from blockyard.blockdev import BlockDevice
from blockyard.scsi import commands as cmds
from blockyard.scsi.alua import AluaProvider, encode_rtpg
from blockyard.scsi.constants import (
    MODE_PARAMETERS_CHANGED,
    NO_ADDITIONAL_SENSE,
    AscPair,
    SenseKey,
    Status,
)
from blockyard.scsi.identity import LuIdentity, standard_inquiry, vpd_page
from blockyard.scsi.modepages import PAGE_CACHING, mode_select, mode_sense
from blockyard.scsi.modepages import parse_mode_sense as _parse_mode_sense
from blockyard.scsi.nexus import Nexus, UnitAttentionQueue
from blockyard.scsi.pr import PrOutOutcome, pr_in, pr_out
from blockyard.scsi.reservations import PrState, ReservationStore
from blockyard.scsi.sense import (
    GOOD,
    RESERVATION_CONFLICT,
    ScsiResult,
    build_sense,
    cdb_error,
)

_U32 = struct.Struct(">I")  # this module's own, not imported (see lu_io)


class PrimaryCommands:
    """The SPC-4 commands of the logical unit; uses its state (declared below)."""

    if TYPE_CHECKING:
        state_generation: int
        _device: BlockDevice
        _identity: LuIdentity
        _alua: AluaProvider
        _store: ReservationStore
        _report_luns: Callable[[], Sequence[int]]
        _tmf_support: tuple[int, int]
        _state_lock: threading.Lock
        _pr_lock: threading.Lock
        _nexuses: dict[Nexus, UnitAttentionQueue]
        _pr: PrState
        _spc2_holder: Nexus | None
        _mode_pages: dict[int, bytes]
        _write_through: bool

        def _queue_locked(self, nexus: Nexus) -> UnitAttentionQueue: ...
        def _broadcast_locked(self, asc: AscPair, except_nexus: Nexus | None) -> None: ...
        def _update_reserved(self) -> None: ...

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
