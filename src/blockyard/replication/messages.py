"""Messages and events of the replication wire protocol, version 1.

Every message is a frozen, slotted dataclass whose fields are the wire fields of
docs/replication.md in wire order; ``message_type`` is its type code in the frame header.
Encoding, decoding and the bounds checks live in :mod:`blockyard.replication.wire`; which side
may send what, when, lives in :mod:`blockyard.replication.connection`.

Byte fields (``ReplRecord.data``, ``BlockRun.data``) are whatever buffer the caller passed, or on
the receiving side a read-only ``memoryview`` into the frame's own buffer: the codec never copies
block data. Such a view stays valid for as long as the caller holds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import ClassVar, TypeAlias
from uuid import UUID

from blockyard.blockdev import BytesLike
from blockyard.replication.errors import ErrorCode

__all__ = [
    "NO_RECORD",
    "Ack",
    "Barrier",
    "BlockRun",
    "BlockRunFlags",
    "Blocks",
    "ConnectionClosed",
    "Error",
    "Event",
    "Extent",
    "Hello",
    "HistorySegment",
    "Keepalive",
    "Message",
    "MessageType",
    "NeedBlocks",
    "NeedData",
    "Plan",
    "PlanKind",
    "Progress",
    "RecordId",
    "RecordKind",
    "Records",
    "ReplRecord",
    "ReplicaDataState",
    "ReplicaHello",
    "ResyncDone",
]


class MessageType(IntEnum):
    """The ``type`` byte of a frame header."""

    HELLO = 1
    REPLICA_HELLO = 2
    PLAN = 3
    RECORDS = 4
    BLOCKS = 5
    RESYNC_DONE = 6
    BARRIER = 7
    ACK = 8
    PROGRESS = 9
    NEED_BLOCKS = 10
    KEEPALIVE = 11
    ERROR = 12


class ReplicaDataState(IntEnum):
    """What a replica's copy holds, as it reports in ``ReplicaHello``."""

    #: Never had data.
    EMPTY = 0
    #: Holds a prefix of some history (possibly diverged from the primary's after some LSN).
    CONSISTENT = 1
    #: In the middle of a resync: the content is not consistent until it completes.
    RESYNCING = 2


class PlanKind(IntEnum):
    """How the primary brings a replica up to date."""

    #: WAL records only, from ``Plan.start_lsn``.
    CATCH_UP = 1
    #: Changed blocks (missed-write bitmap, divergence), then records.
    DELTA = 2
    #: Every allocated extent (holes sent as holes), then records.
    FULL = 3


class RecordKind(IntEnum):
    """Kind of a shipped WAL record."""

    #: Whole 4 KiB blocks of data follow.
    WRITE = 1
    #: The blocks read as zeros and are deallocated; no data.
    ZERO = 2


class BlockRunFlags(IntFlag):
    """Flags of a ``BlockRun``; no flag set (``DATA``) means the run carries its data."""

    #: The run's data follows: ``block_count * 4096`` bytes.
    DATA = 0
    #: Reads as zeros; deallocate. No data follows.
    HOLE = 1


@dataclass(frozen=True, slots=True)
class RecordId:
    """A record's identity: its LSN, the epoch and generation it was written in.

    ``lsn == 0`` with ``epoch == 0`` (``NO_RECORD``) means "no record".
    """

    lsn: int
    epoch: int
    generation: int


NO_RECORD = RecordId(lsn=0, epoch=0, generation=0)


@dataclass(frozen=True, slots=True)
class HistorySegment:
    """The LSNs ``first_lsn..last_lsn`` were written in this epoch and generation.

    ``last_lsn`` is ``OPEN_LSN`` for the segment still being written (only the newest may be).
    An empty segment has ``first_lsn == last_lsn + 1``.
    """

    epoch: int
    generation: int
    first_lsn: int
    last_lsn: int


@dataclass(frozen=True, slots=True)
class Extent:
    """``block_count`` (>= 1) 4 KiB blocks starting at ``block``."""

    block: int
    block_count: int


@dataclass(frozen=True, slots=True)
class ReplRecord:
    """One WAL record as shipped: WRITE carries ``block_count * 4096`` bytes, ZERO none."""

    lsn: int
    epoch: int
    generation: int
    kind: RecordKind
    block: int
    block_count: int
    data: BytesLike = b""


@dataclass(frozen=True, slots=True)
class BlockRun:
    """``block_count`` blocks from ``block``: a hole (``flags`` has HOLE, no data) or their data
    (``block_count * 4096`` bytes)."""

    block: int
    block_count: int
    flags: BlockRunFlags = BlockRunFlags.DATA
    data: BytesLike = b""


@dataclass(frozen=True, slots=True)
class Hello:
    """Primary -> replica, first message: who the primary is and what its history holds.

    ``protocol_version`` is the highest version the primary speaks; the frame itself is always
    sent at ``WIRE_VERSION``.
    """

    message_type: ClassVar[MessageType] = MessageType.HELLO

    protocol_version: int
    volume_uuid: UUID
    volume_name: str
    size_bytes: int
    primary_id: str
    head: RecordId
    durable_lsn: int
    history: tuple[HistorySegment, ...]


@dataclass(frozen=True, slots=True)
class ReplicaHello:
    """Replica -> primary, answer to ``Hello``: what the replica holds.

    ``resync_id`` is non-zero exactly when ``state`` is RESYNCING; ``resync_cursor`` is that
    resync's durable resume mark (0 when none is in progress).
    """

    message_type: ClassVar[MessageType] = MessageType.REPLICA_HELLO

    volume_uuid: UUID
    state: ReplicaDataState
    size_bytes: int
    last: RecordId
    durable_lsn: int
    history: tuple[HistorySegment, ...]
    resync_id: int
    resync_cursor: int


@dataclass(frozen=True, slots=True)
class Plan:
    """Primary -> replica, ends the handshake: how the replica will be brought up to date.

    ``resync_id`` is 0 for CATCH_UP and non-zero for DELTA/FULL. ``diverged_after_lsn`` is
    ``OPEN_LSN`` when the replica's records are all in the primary's history.
    """

    message_type: ClassVar[MessageType] = MessageType.PLAN

    kind: PlanKind
    start_lsn: int
    resync_id: int
    total_blocks: int
    resume_cursor: int
    diverged_after_lsn: int


@dataclass(frozen=True, slots=True)
class Records:
    """Primary -> replica: 1..MAX_RECORDS_PER_BATCH records with consecutive LSNs."""

    message_type: ClassVar[MessageType] = MessageType.RECORDS

    records: tuple[ReplRecord, ...]


@dataclass(frozen=True, slots=True)
class Blocks:
    """Primary -> replica: 1..MAX_BLOCK_RUNS_PER_BATCH runs of the resync ``resync_id``.

    ``cursor`` is the resume position once this batch is applied; ``read_lsn`` the primary's
    last LSN when it read these blocks.
    """

    message_type: ClassVar[MessageType] = MessageType.BLOCKS

    resync_id: int
    cursor: int
    read_lsn: int
    runs: tuple[BlockRun, ...]


@dataclass(frozen=True, slots=True)
class ResyncDone:
    """Primary -> replica: every block of resync ``resync_id`` was sent, as of ``final_lsn``."""

    message_type: ClassVar[MessageType] = MessageType.RESYNC_DONE

    resync_id: int
    final_lsn: int


@dataclass(frozen=True, slots=True)
class Barrier:
    """Primary -> replica: make everything up to ``lsn`` durable, then ``Ack`` ``barrier_id``."""

    message_type: ClassVar[MessageType] = MessageType.BARRIER

    barrier_id: int
    lsn: int


@dataclass(frozen=True, slots=True)
class Ack:
    """Replica -> primary: durable and applied LSNs; ``barrier_id`` 0 = unsolicited report."""

    message_type: ClassVar[MessageType] = MessageType.ACK

    barrier_id: int
    durable_lsn: int
    applied_lsn: int


@dataclass(frozen=True, slots=True)
class Progress:
    """Replica -> primary: resync ``resync_id`` is durably done below ``cursor``."""

    message_type: ClassVar[MessageType] = MessageType.PROGRESS

    resync_id: int
    cursor: int


@dataclass(frozen=True, slots=True)
class NeedBlocks:
    """Replica -> primary: extents the replica must get back; ``final`` marks the last chunk."""

    message_type: ClassVar[MessageType] = MessageType.NEED_BLOCKS

    final: bool
    extents: tuple[Extent, ...]


@dataclass(frozen=True, slots=True)
class Keepalive:
    """Both ways: the sender's durable LSN; ``commit_lsn`` is the primary's highest LSN covered by
    a completed barrier (always 0 from a replica)."""

    message_type: ClassVar[MessageType] = MessageType.KEEPALIVE

    durable_lsn: int
    commit_lsn: int


@dataclass(frozen=True, slots=True)
class Error:
    """Both ways, any time: the sender gives up on the connection; both sides then close it."""

    message_type: ClassVar[MessageType] = MessageType.ERROR

    code: ErrorCode
    reason: str


Message: TypeAlias = (
    Hello
    | ReplicaHello
    | Plan
    | Records
    | Blocks
    | ResyncDone
    | Barrier
    | Ack
    | Progress
    | NeedBlocks
    | Keepalive
    | Error
)


@dataclass(frozen=True, slots=True)
class NeedData:
    """Event: no complete message is buffered; pass more bytes to ``receive_data``."""


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """Event: the connection is over (the peer closed it cleanly, or an ``Error`` was sent or
    received). Returned again by every later ``next_event`` call."""


Event: TypeAlias = Message | NeedData | ConnectionClosed
