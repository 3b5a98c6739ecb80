"""The payload rules of the replication wire spec, version 1, and their bounds.

One function, :func:`check_message`, holds every rule a message must follow beyond its byte
layout (counts, lengths, enum ranges, consecutive LSNs, history order, resync ids). The codec
runs it on both directions: before encoding, a violation is our caller's fault
(:class:`LocalProtocolError`); after decoding, the peer's (:class:`RemoteProtocolError`).
docs/replication.md lists the rules in a table.
"""

from __future__ import annotations

from typing import Any, Final, assert_never

from blockyard.blockdev import BytesLike
from blockyard.replication.errors import ErrorCode, LocalProtocolError
from blockyard.replication.messages import (
    Ack,
    Barrier,
    BlockRun,
    BlockRunFlags,
    Blocks,
    Error,
    Hello,
    HistorySegment,
    Keepalive,
    Message,
    NeedBlocks,
    Plan,
    PlanKind,
    Progress,
    RecordKind,
    Records,
    ReplicaDataState,
    ReplicaHello,
    ReplRecord,
    ResyncDone,
)

# --- bounds (replication wire spec v1) -------------------------------------------------------

#: Unit of ``block`` and ``block_count`` on the wire. Fixed by the protocol version, not taken
#: from the engine: a test pins it equal to ``engine.limits.BLOCK_SIZE``.
WIRE_BLOCK_BYTES: Final = 4096
#: Largest WRITE record payload; equal to ``engine.limits.MAX_RECORD_PAYLOAD_BYTES`` (pinned by a
#: test), since a replica stores each shipped record as one WAL record.
MAX_RECORD_DATA_BYTES: Final = 1 << 20

#: ``last_lsn`` of a history segment still being written; ``Plan.diverged_after_lsn`` "none".
OPEN_LSN: Final = 2**64 - 1
MAX_HISTORY_SEGMENTS: Final = 64
MAX_RECORDS_PER_BATCH: Final = 4096
MAX_BLOCK_RUNS_PER_BATCH: Final = 4096
MAX_NEED_BLOCKS_EXTENTS: Final = 4096
#: engine.limits.NAME_MAX_CHARS; names are ASCII, so characters and bytes agree.
MAX_VOLUME_NAME_BYTES: Final = 128
MAX_PRIMARY_ID_BYTES: Final = 255
MAX_ERROR_REASON_BYTES: Final = 1024

U64_LIMIT: Final = 2**64
#: The only ``BlockRunFlags`` bits protocol version 1 defines.
KNOWN_RUN_FLAGS: Final = int(BlockRunFlags.HOLE)


# --- validation shared by both directions ----------------------------------------------------


class Violation(Exception):
    """A message breaks a rule; the caller turns it into a Local- or RemoteProtocolError
    depending on whose message it is. Internal to the replication package."""

    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def nbytes(data: BytesLike) -> int:
    return data.nbytes if isinstance(data, memoryview) else len(data)


def _check_extent(what: str, block: int, block_count: int) -> None:
    if block_count < 1:
        raise Violation(ErrorCode.PROTOCOL, f"{what} has block_count {block_count}; must be >= 1")
    if block + block_count > U64_LIMIT:
        raise Violation(
            ErrorCode.PROTOCOL,
            f"{what} block {block} + block_count {block_count} runs past block 2**64",
        )


def _check_history(history: tuple[HistorySegment, ...]) -> None:
    if len(history) > MAX_HISTORY_SEGMENTS:
        raise Violation(
            ErrorCode.TOO_LARGE,
            f"history has {len(history)} segments; at most {MAX_HISTORY_SEGMENTS} are allowed",
        )
    previous: HistorySegment | None = None
    for index, segment in enumerate(history):
        is_open = segment.last_lsn == OPEN_LSN
        if is_open and index != len(history) - 1:
            raise Violation(
                ErrorCode.PROTOCOL,
                f"history segment {index} is open (last_lsn OPEN_LSN) but is not the newest",
            )
        if not is_open and segment.first_lsn > segment.last_lsn + 1:
            raise Violation(
                ErrorCode.PROTOCOL,
                f"history segment {index} has first_lsn {segment.first_lsn} > last_lsn "
                f"{segment.last_lsn} + 1",
            )
        if previous is not None:
            # Generations are random, so only the epoch is ordered; a segment must differ
            # from the one before it (else it would be the same segment).
            if segment.epoch < previous.epoch or (segment.epoch, segment.generation) == (
                previous.epoch,
                previous.generation,
            ):
                raise Violation(
                    ErrorCode.PROTOCOL,
                    f"history segment {index} (epoch {segment.epoch}, generation "
                    f"{segment.generation}) does not follow (epoch {previous.epoch}, "
                    f"generation {previous.generation}); epochs must not decrease and "
                    "neighbouring segments must differ",
                )
            if segment.first_lsn <= previous.last_lsn:
                raise Violation(
                    ErrorCode.PROTOCOL,
                    f"history segment {index} starts at LSN {segment.first_lsn}, inside the "
                    f"previous segment (last_lsn {previous.last_lsn})",
                )
        previous = segment


def _check_str(what: str, value: str, max_bytes: int) -> bytes:
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise Violation(ErrorCode.PROTOCOL, f"{what} is not encodable as UTF-8: {exc}") from exc
    if len(raw) > max_bytes:
        raise Violation(
            ErrorCode.TOO_LARGE, f"{what} is {len(raw)} bytes of UTF-8; at most {max_bytes}"
        )
    return raw


def _check_enum(what: str, value: object, enum: type[Any]) -> None:
    if not isinstance(value, enum):
        raise Violation(ErrorCode.PROTOCOL, f"{what} {value!r} is not a {enum.__name__}")


def _check_records(records: tuple[ReplRecord, ...]) -> None:
    if not 1 <= len(records) <= MAX_RECORDS_PER_BATCH:
        raise Violation(
            ErrorCode.TOO_LARGE if records else ErrorCode.PROTOCOL,
            f"a Records batch holds {len(records)} records; 1..{MAX_RECORDS_PER_BATCH} allowed",
        )
    # One cheap combined test per record (a batch may hold 4096); the slow path names the rule.
    write, zero = RecordKind.WRITE, RecordKind.ZERO
    expected_lsn = records[0].lsn
    for record in records:
        kind, block_count, data = record.kind, record.block_count, record.data
        data_len = data.nbytes if type(data) is memoryview else len(data)
        if (
            record.lsn != expected_lsn
            or block_count < 1
            or record.block + block_count > U64_LIMIT
            or (
                data_len != block_count * WIRE_BLOCK_BYTES or data_len > MAX_RECORD_DATA_BYTES
                if kind is write
                else kind is not zero or data_len != 0
            )
        ):
            _explain_record(record, expected_lsn)
        expected_lsn += 1


def _explain_record(record: ReplRecord, expected_lsn: int) -> None:
    """Raise the Violation that names the rule ``record`` breaks."""
    if record.lsn != expected_lsn:
        raise Violation(
            ErrorCode.PROTOCOL,
            f"record LSN {record.lsn} follows {expected_lsn - 1} in one batch; LSNs in a "
            "batch must be consecutive",
        )
    _check_enum(f"record {record.lsn} kind", record.kind, RecordKind)
    _check_extent(f"record {record.lsn}", record.block, record.block_count)
    data_len = nbytes(record.data)
    if record.kind is RecordKind.WRITE:
        if data_len != record.block_count * WIRE_BLOCK_BYTES:
            raise Violation(
                ErrorCode.PROTOCOL,
                f"WRITE record {record.lsn} carries {data_len} bytes for "
                f"{record.block_count} blocks; must be block_count * {WIRE_BLOCK_BYTES}",
            )
        raise Violation(
            ErrorCode.TOO_LARGE,
            f"WRITE record {record.lsn} carries {data_len} bytes; at most "
            f"{MAX_RECORD_DATA_BYTES} per record",
        )
    raise Violation(
        ErrorCode.PROTOCOL, f"ZERO record {record.lsn} carries {data_len} bytes of data"
    )


def _check_runs(runs: tuple[BlockRun, ...]) -> None:
    if not 1 <= len(runs) <= MAX_BLOCK_RUNS_PER_BATCH:
        raise Violation(
            ErrorCode.TOO_LARGE if runs else ErrorCode.PROTOCOL,
            f"a Blocks batch holds {len(runs)} runs; 1..{MAX_BLOCK_RUNS_PER_BATCH} allowed",
        )
    for index, run in enumerate(runs):
        _check_enum(f"block run {index} flags", run.flags, BlockRunFlags)
        if int(run.flags) & ~KNOWN_RUN_FLAGS:
            raise Violation(
                ErrorCode.PROTOCOL, f"block run {index} has unknown flags {int(run.flags):#x}"
            )
        _check_extent(f"block run {index}", run.block, run.block_count)
        data_len = nbytes(run.data)
        if run.flags & BlockRunFlags.HOLE:
            if data_len:
                raise Violation(
                    ErrorCode.PROTOCOL, f"HOLE block run {index} carries {data_len} bytes"
                )
        elif data_len != run.block_count * WIRE_BLOCK_BYTES:
            raise Violation(
                ErrorCode.PROTOCOL,
                f"block run {index} carries {data_len} bytes for {run.block_count} blocks; "
                f"must be block_count * {WIRE_BLOCK_BYTES}",
            )


def _check_resync_id(what: str, resync_id: int) -> None:
    if resync_id == 0:
        raise Violation(ErrorCode.PROTOCOL, f"{what} has resync_id 0; a resync's id is >= 1")


def check_message(message: Message) -> None:
    """Raise :class:`LocalProtocolError` if ``message`` breaks a rule of the wire spec.

    These are the rules :func:`decode_message` enforces on received messages (where a violation
    is a :class:`RemoteProtocolError`); integer ranges are checked when encoding.
    """
    try:
        check(message)
    except Violation as violation:
        raise LocalProtocolError(violation.code, violation.reason) from None


def check(message: Message) -> None:
    """Raise :class:`Violation` if ``message`` breaks a rule (the codec's entry point)."""
    match message:
        case Hello():
            if message.protocol_version < 1:
                raise Violation(
                    ErrorCode.UNSUPPORTED_VERSION,
                    f"Hello offers protocol_version {message.protocol_version}; must be >= 1",
                )
            _check_str("volume_name", message.volume_name, MAX_VOLUME_NAME_BYTES)
            _check_str("primary_id", message.primary_id, MAX_PRIMARY_ID_BYTES)
            _check_history(message.history)
        case ReplicaHello():
            _check_enum("ReplicaHello state", message.state, ReplicaDataState)
            _check_history(message.history)
            resyncing = message.state is ReplicaDataState.RESYNCING
            if resyncing != (message.resync_id != 0):
                raise Violation(
                    ErrorCode.PROTOCOL,
                    f"ReplicaHello state {message.state.name} with resync_id "
                    f"{message.resync_id}: a resync id is given exactly when RESYNCING",
                )
            if message.resync_id == 0 and message.resync_cursor != 0:
                raise Violation(
                    ErrorCode.PROTOCOL,
                    f"ReplicaHello has resync_cursor {message.resync_cursor} without a resync",
                )
        case Plan():
            _check_enum("Plan kind", message.kind, PlanKind)
            if (message.kind is PlanKind.CATCH_UP) != (message.resync_id == 0):
                raise Violation(
                    ErrorCode.PROTOCOL,
                    f"Plan {message.kind.name} with resync_id {message.resync_id}: CATCH_UP has "
                    "resync_id 0, DELTA and FULL a non-zero one",
                )
        case Records():
            _check_records(message.records)
        case Blocks():
            _check_resync_id("Blocks", message.resync_id)
            _check_runs(message.runs)
        case ResyncDone():
            _check_resync_id("ResyncDone", message.resync_id)
        case Barrier():
            if message.barrier_id < 1:
                raise Violation(
                    ErrorCode.PROTOCOL, f"Barrier has barrier_id {message.barrier_id}; must be >= 1"
                )
        case Progress():
            _check_resync_id("Progress", message.resync_id)
        case NeedBlocks():
            if len(message.extents) > MAX_NEED_BLOCKS_EXTENTS:
                raise Violation(
                    ErrorCode.TOO_LARGE,
                    f"NeedBlocks holds {len(message.extents)} extents; at most "
                    f"{MAX_NEED_BLOCKS_EXTENTS}",
                )
            for index, extent in enumerate(message.extents):
                _check_extent(f"NeedBlocks extent {index}", extent.block, extent.block_count)
        case Error():
            _check_enum("Error code", message.code, ErrorCode)
            _check_str("Error reason", message.reason, MAX_ERROR_REASON_BYTES)
        case Ack() | Keepalive():
            pass
        case _:
            assert_never(message)
