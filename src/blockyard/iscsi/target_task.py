"""One SCSI task on the target side: Data-Out collection, R2T planning, Data-In splitting.

Sans-IO helpers used by :class:`blockyard.iscsi.target_session.TargetConnection`. A
:class:`WriteTransfer` tracks the data an initiator owes for one command (immediate data,
unsolicited Data-Out, solicited Data-Out per R2T) and says which R2Ts to send next;
:func:`data_in_pdus` cuts a read payload into Data-In PDUs.

Bounds (RFC 7143 §13.12 - §13.17): a Data-Out segment may not run past the Expected Data
Transfer Length; unsolicited data may not exceed FirstBurstLength; each R2T asks for at most
MaxBurstLength; at most MaxOutstandingR2T R2Ts are open per task.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from blockyard.blockdev import BytesLike
from blockyard.iscsi.errors import PduFormatError, RejectReason

_SN_MASK = 0xFFFFFFFF  # RFC 7143 §4.2.2.1: 32-bit serial number arithmetic


class DataOutError(PduFormatError):
    """A Data-Out broke the transfer rules; the task cannot complete (ERL 0 has no recovery)."""


@dataclass(slots=True)
class OpenR2T:
    """An R2T we sent and whose data has not all arrived (RFC 7143 §11.8)."""

    ttt: int
    r2t_sn: int
    offset: int
    length: int
    received: int = 0
    next_data_sn: int = 0


@dataclass(slots=True)
class WriteTransfer:
    """Collects the Data-Out buffer of one write command.

    ``wanted`` bytes are kept (the SCSI transfer length, capped by EDTL); anything the
    initiator sends past it but within EDTL is accepted and dropped, because an initiator
    may send unsolicited data up to min(EDTL, FirstBurstLength) whatever the CDB says.
    ``solicit_limit`` is how far R2Ts go (0 when the command fails without data).
    """

    edtl: int
    wanted: int
    solicit_limit: int
    unsolicited_limit: int
    unsolicited_pending: bool
    max_burst: int
    max_outstanding_r2t: int
    buffer: bytearray = field(default_factory=bytearray)
    received: int = 0
    unsolicited_received: int = 0
    unsolicited_data_sn: int = 0
    next_r2t_offset: int = 0
    r2t_sn: int = 0
    open_r2ts: dict[int, OpenR2T] = field(default_factory=dict)

    @classmethod
    def start(
        cls,
        *,
        edtl: int,
        wanted: int,
        solicit: bool,
        immediate: BytesLike,
        unsolicited_pending: bool,
        first_burst: int,
        max_burst: int,
        max_outstanding_r2t: int,
    ) -> WriteTransfer:
        if len(immediate) > min(edtl, first_burst):
            raise DataOutError(
                f"{len(immediate)} bytes of immediate data exceed min(EDTL {edtl}, "
                f"FirstBurstLength {first_burst}) (RFC 7143 §13.14)",
                reject_reason=RejectReason.PROTOCOL_ERROR,
            )
        transfer = cls(
            edtl=edtl,
            wanted=wanted,
            solicit_limit=wanted if solicit else 0,
            unsolicited_limit=min(edtl, first_burst),
            unsolicited_pending=unsolicited_pending,
            max_burst=max_burst,
            max_outstanding_r2t=max_outstanding_r2t,
            buffer=bytearray(wanted),
        )
        transfer._store(0, immediate)
        transfer.unsolicited_received = len(immediate)
        transfer.next_r2t_offset = len(immediate)
        return transfer

    def _store(self, offset: int, data: BytesLike) -> None:
        end = min(offset + len(data), self.wanted)
        if end > offset:
            self.buffer[offset:end] = data[: end - offset]
        self.received += len(data)

    def unsolicited(self, offset: int, data_sn: int, final: bool, data: BytesLike) -> None:
        """Take one unsolicited Data-Out (TTT 0xffffffff)."""
        if not self.unsolicited_pending:
            raise DataOutError(
                "unsolicited Data-Out after the F bit ended the unsolicited burst "
                "(RFC 7143 §11.3.4)",
                reject_reason=RejectReason.PROTOCOL_ERROR,
            )
        if data_sn != self.unsolicited_data_sn:
            raise DataOutError(
                f"unsolicited Data-Out DataSN {data_sn}, expected {self.unsolicited_data_sn} "
                "(RFC 7143 §11.7.3)",
                reject_reason=RejectReason.PROTOCOL_ERROR,
            )
        if offset != self.unsolicited_received:
            raise DataOutError(
                f"Data-Out buffer offset {offset}, expected {self.unsolicited_received} "
                "(DataPDUInOrder=Yes, RFC 7143 §13.18)",
                reject_reason=RejectReason.PROTOCOL_ERROR,
            )
        if offset + len(data) > self.unsolicited_limit:
            raise DataOutError(
                f"unsolicited data to {offset + len(data)} exceeds min(EDTL, FirstBurstLength)"
                f" = {self.unsolicited_limit} (RFC 7143 §13.14)",
                reject_reason=RejectReason.PROTOCOL_ERROR,
            )
        self._store(offset, data)
        self.unsolicited_received += len(data)
        self.unsolicited_data_sn = (data_sn + 1) & _SN_MASK
        self.next_r2t_offset = max(self.next_r2t_offset, self.unsolicited_received)
        if final:
            self.unsolicited_pending = False

    def solicited(self, ttt: int, offset: int, data_sn: int, final: bool, data: BytesLike) -> None:
        """Take one Data-Out answering the R2T with ``ttt``."""
        r2t = self.open_r2ts.get(ttt)
        if r2t is None:
            raise DataOutError(
                f"Data-Out with TTT {ttt:#x} matches no open R2T (RFC 7143 §11.7.2)",
                reject_reason=RejectReason.INVALID_PDU_FIELD,
            )
        if data_sn != r2t.next_data_sn:
            raise DataOutError(
                f"Data-Out DataSN {data_sn}, expected {r2t.next_data_sn} (RFC 7143 §11.7.3)",
                reject_reason=RejectReason.PROTOCOL_ERROR,
            )
        expected_offset = r2t.offset + r2t.received
        if offset != expected_offset:
            raise DataOutError(
                f"Data-Out buffer offset {offset}, expected {expected_offset} "
                "(DataPDUInOrder=Yes, RFC 7143 §13.18)",
                reject_reason=RejectReason.PROTOCOL_ERROR,
            )
        if r2t.received + len(data) > r2t.length:
            raise DataOutError(
                f"Data-Out runs past the {r2t.length} bytes the R2T asked for (RFC 7143 §11.8)",
                reject_reason=RejectReason.PROTOCOL_ERROR,
            )
        self._store(offset, data)
        r2t.received += len(data)
        r2t.next_data_sn = (data_sn + 1) & _SN_MASK
        done = r2t.received == r2t.length
        if final != done:
            raise DataOutError(
                "Data-Out F bit does not match the end of the R2T's burst (RFC 7143 §11.7.1)",
                reject_reason=RejectReason.PROTOCOL_ERROR,
            )
        if done:
            del self.open_r2ts[ttt]

    def next_r2ts(self, allocate_ttt: Iterator[int]) -> list[OpenR2T]:
        """R2Ts to send now: none while unsolicited data is still owed (RFC 7143 §13.10
        lets us solicit only after the unsolicited burst), then bursts of MaxBurstLength
        until MaxOutstandingR2T are open."""
        if self.unsolicited_pending:
            return []
        out: list[OpenR2T] = []
        while (
            self.next_r2t_offset < self.solicit_limit
            and len(self.open_r2ts) < self.max_outstanding_r2t
        ):
            length = min(self.max_burst, self.solicit_limit - self.next_r2t_offset)
            r2t = OpenR2T(next(allocate_ttt), self.r2t_sn, self.next_r2t_offset, length)
            self.open_r2ts[r2t.ttt] = r2t
            self.r2t_sn = (self.r2t_sn + 1) & _SN_MASK
            self.next_r2t_offset += length
            out.append(r2t)
        return out

    @property
    def complete(self) -> bool:
        return (
            not self.unsolicited_pending
            and not self.open_r2ts
            and self.next_r2t_offset >= self.solicit_limit
        )


@dataclass(frozen=True, slots=True)
class DataInPlan:
    """One Data-In PDU: where its bytes start and whether it ends a sequence or the command."""

    offset: int
    length: int
    final: bool
    last: bool


def data_in_plan(total: int, max_segment: int, max_burst: int) -> list[DataInPlan]:
    """Cut ``total`` bytes into Data-In PDUs of at most ``max_segment`` bytes, with F set at
    the end of each MaxBurstLength sequence (RFC 7143 §13.13) and on the last PDU."""
    plan: list[DataInPlan] = []
    offset = 0
    while offset < total:
        burst_end = min(total, offset + max_burst)
        while offset < burst_end:
            length = min(max_segment, burst_end - offset)
            end = offset + length
            plan.append(DataInPlan(offset, length, end == burst_end, end == total))
            offset = end
    return plan
