"""Framing and message codec of the replication wire protocol, version 1 (sans-IO).

A frame is a 20-byte header and a payload; all integers are big-endian::

    offset size field
    0      2    magic      FRAME_MAGIC 0x4259 ("BY")
    2      1    version    WIRE_VERSION
    3      1    type       MessageType
    4      8    epoch      the sender's epoch for this volume
    12     4    length     payload bytes, <= MAX_PAYLOAD_BYTES[type] <= MAX_FRAME_PAYLOAD_BYTES
    16     4    crc32c     over bytes 0..15, then the payload
    20     ...  payload

:func:`encode_message` turns a message into buffers ready for ``writelines`` without copying
block data; :class:`FrameReader` frames a byte stream, checking every bound from the header
before buffering the payload; :func:`decode_message` parses and validates a payload. Anything
the peer got wrong raises :class:`~blockyard.replication.errors.RemoteProtocolError`, anything
our caller got wrong :class:`~blockyard.replication.errors.LocalProtocolError`: the same rules
(:func:`~blockyard.replication.rules.check_message`) apply to both directions. The payload bounds
are defined in :mod:`~blockyard.replication.rules` and re-exported here with the frame's own
constants. docs/replication.md has the message layouts.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar, assert_never
from uuid import UUID

import crc32c

from blockyard.blockdev import BytesLike
from blockyard.replication.errors import (
    ErrorCode,
    LocalProtocolError,
    RemoteProtocolError,
    ReplicationProtocolError,
)
from blockyard.replication.messages import (
    Ack,
    Barrier,
    BlockRun,
    BlockRunFlags,
    Blocks,
    ConnectionClosed,
    Error,
    Extent,
    Hello,
    HistorySegment,
    Keepalive,
    Message,
    MessageType,
    NeedBlocks,
    NeedData,
    Plan,
    PlanKind,
    Progress,
    RecordId,
    RecordKind,
    Records,
    ReplicaDataState,
    ReplicaHello,
    ReplRecord,
    ResyncDone,
)
from blockyard.replication.rules import (
    KNOWN_RUN_FLAGS,
    MAX_BLOCK_RUNS_PER_BATCH,
    MAX_ERROR_REASON_BYTES,
    MAX_HISTORY_SEGMENTS,
    MAX_NEED_BLOCKS_EXTENTS,
    MAX_PRIMARY_ID_BYTES,
    MAX_RECORD_DATA_BYTES,
    MAX_RECORDS_PER_BATCH,
    MAX_VOLUME_NAME_BYTES,
    OPEN_LSN,
    U64_LIMIT,
    WIRE_BLOCK_BYTES,
    Violation,
    check,
    check_message,
    nbytes,
)

# --- constants (replication wire spec v1) ----------------------------------------------------

FRAME_MAGIC: Final = 0x4259  # "BY"
WIRE_VERSION: Final = 1
FRAME_HEADER_BYTES: Final = 20
#: A 4 MiB block batch plus its headers.
MAX_FRAME_PAYLOAD_BYTES: Final = 5 << 20
MAX_FRAME_BYTES: Final = FRAME_HEADER_BYTES + MAX_FRAME_PAYLOAD_BYTES

# --- structs ---------------------------------------------------------------------------------

_HEADER = struct.Struct(">HBBQII")
_HEADER_PREFIX = struct.Struct(">HBBQI")  # the bytes the CRC covers before the payload
_CRC = struct.Struct(">I")
_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")
_RECORD_ID = struct.Struct(">QQI")
_SEGMENT = struct.Struct(">QIQQ")
_EXTENT = struct.Struct(">QI")
_RECORD = struct.Struct(">QQIBQII")  # lsn epoch generation kind block block_count data_len
_RUN = struct.Struct(">QIB")  # block block_count flags
_PLAN = struct.Struct(">BQQQQQ")
_REPLICA_HELLO_FIXED = struct.Struct(">16sBQ")
_REPLICA_HELLO_TAIL = struct.Struct(">QQ")
_BLOCKS_FIXED = struct.Struct(">QQQH")
_TWO_U64 = struct.Struct(">QQ")
_ACK = struct.Struct(">QQQ")
_NEED_BLOCKS_FIXED = struct.Struct(">BH")
_ERROR_FIXED = struct.Struct(">H")

assert _HEADER.size == FRAME_HEADER_BYTES
assert _HEADER_PREFIX.size == 16

_HISTORY_MAX_BYTES = _U16.size + MAX_HISTORY_SEGMENTS * _SEGMENT.size

#: Largest payload of each message type, checked from the frame header before any of the
#: payload is buffered: a Keepalive that announces megabytes is refused at once.
MAX_PAYLOAD_BYTES: Final[dict[MessageType, int]] = {
    MessageType.HELLO: (
        _U16.size
        + 16
        + _U16.size
        + MAX_VOLUME_NAME_BYTES
        + _U64.size
        + _U16.size
        + MAX_PRIMARY_ID_BYTES
        + _RECORD_ID.size
        + _U64.size
        + _HISTORY_MAX_BYTES
    ),
    MessageType.REPLICA_HELLO: (
        _REPLICA_HELLO_FIXED.size
        + _RECORD_ID.size
        + _U64.size
        + _HISTORY_MAX_BYTES
        + _REPLICA_HELLO_TAIL.size
    ),
    MessageType.PLAN: _PLAN.size,
    MessageType.RECORDS: MAX_FRAME_PAYLOAD_BYTES,
    MessageType.BLOCKS: MAX_FRAME_PAYLOAD_BYTES,
    MessageType.RESYNC_DONE: _TWO_U64.size,
    MessageType.BARRIER: _TWO_U64.size,
    MessageType.ACK: _ACK.size,
    MessageType.PROGRESS: _TWO_U64.size,
    MessageType.NEED_BLOCKS: _NEED_BLOCKS_FIXED.size + MAX_NEED_BLOCKS_EXTENTS * _EXTENT.size,
    MessageType.KEEPALIVE: _TWO_U64.size,
    MessageType.ERROR: _ERROR_FIXED.size + _U16.size + MAX_ERROR_REASON_BYTES,
}
assert max(MAX_PAYLOAD_BYTES.values()) == MAX_FRAME_PAYLOAD_BYTES

_TYPES_BY_CODE: Final = {int(t): t for t in MessageType}
_crc32c: Callable[..., int] = crc32c.crc32c


# --- encoding --------------------------------------------------------------------------------


def _pack_str(value: str) -> bytes:
    raw = value.encode("utf-8")
    return _U16.pack(len(raw)) + raw


def _pack_history(history: tuple[HistorySegment, ...]) -> bytes:
    parts = [_U16.pack(len(history))]
    parts.extend(_SEGMENT.pack(s.epoch, s.generation, s.first_lsn, s.last_lsn) for s in history)
    return b"".join(parts)


def _pack_record_id(record_id: RecordId) -> bytes:
    return _RECORD_ID.pack(record_id.lsn, record_id.epoch, record_id.generation)


def _payload(message: Message) -> list[BytesLike]:
    """The payload as buffers: small fields packed together, data buffers passed through."""
    match message:
        case Hello():
            return [
                b"".join(
                    (
                        _U16.pack(message.protocol_version),
                        message.volume_uuid.bytes,
                        _pack_str(message.volume_name),
                        _U64.pack(message.size_bytes),
                        _pack_str(message.primary_id),
                        _pack_record_id(message.head),
                        _U64.pack(message.durable_lsn),
                        _pack_history(message.history),
                    )
                )
            ]
        case ReplicaHello():
            return [
                b"".join(
                    (
                        _REPLICA_HELLO_FIXED.pack(
                            message.volume_uuid.bytes, message.state, message.size_bytes
                        ),
                        _pack_record_id(message.last),
                        _U64.pack(message.durable_lsn),
                        _pack_history(message.history),
                        _REPLICA_HELLO_TAIL.pack(message.resync_id, message.resync_cursor),
                    )
                )
            ]
        case Plan():
            return [
                _PLAN.pack(
                    message.kind,
                    message.start_lsn,
                    message.resync_id,
                    message.total_blocks,
                    message.resume_cursor,
                    message.diverged_after_lsn,
                )
            ]
        case Records():
            parts: list[BytesLike] = []
            small = bytearray(_U16.pack(len(message.records)))
            for r in message.records:
                data_len = nbytes(r.data)
                small += _RECORD.pack(
                    r.lsn, r.epoch, r.generation, r.kind, r.block, r.block_count, data_len
                )
                if data_len:
                    parts.append(bytes(small))
                    parts.append(r.data)
                    small.clear()
            if small:
                parts.append(bytes(small))
            return parts
        case Blocks():
            parts = []
            small = bytearray(
                _BLOCKS_FIXED.pack(
                    message.resync_id, message.cursor, message.read_lsn, len(message.runs)
                )
            )
            for run in message.runs:
                small += _RUN.pack(run.block, run.block_count, run.flags)
                if nbytes(run.data):
                    parts.append(bytes(small))
                    parts.append(run.data)
                    small.clear()
            if small:
                parts.append(bytes(small))
            return parts
        case ResyncDone():
            return [_TWO_U64.pack(message.resync_id, message.final_lsn)]
        case Barrier():
            return [_TWO_U64.pack(message.barrier_id, message.lsn)]
        case Ack():
            return [_ACK.pack(message.barrier_id, message.durable_lsn, message.applied_lsn)]
        case Progress():
            return [_TWO_U64.pack(message.resync_id, message.cursor)]
        case NeedBlocks():
            return [
                _NEED_BLOCKS_FIXED.pack(1 if message.final else 0, len(message.extents))
                + b"".join(_EXTENT.pack(e.block, e.block_count) for e in message.extents)
            ]
        case Keepalive():
            return [_TWO_U64.pack(message.durable_lsn, message.commit_lsn)]
        case Error():
            return [_ERROR_FIXED.pack(message.code) + _pack_str(message.reason)]
        case _:
            assert_never(message)


def encode_message(message: Message, epoch: int) -> list[BytesLike]:
    """Encode ``message`` as one frame stamped with ``epoch``.

    Returns the frame as buffers for ``writelines``: the header (joined with the first small
    payload part) and then the payload parts. ``ReplRecord.data`` and ``BlockRun.data`` buffers
    are passed through uncopied, so the caller must not change them until they are written.
    The CRC is computed over the parts incrementally. Raises :class:`LocalProtocolError` when the
    message breaks a rule of the spec or an integer does not fit its field.
    """
    check_message(message)
    if not 0 <= epoch < U64_LIMIT:
        raise LocalProtocolError(ErrorCode.PROTOCOL, f"epoch {epoch} does not fit in a u64")
    try:
        parts = _payload(message)
    except (struct.error, OverflowError) as exc:
        raise LocalProtocolError(
            ErrorCode.PROTOCOL, f"{type(message).__name__} has a field out of range: {exc}"
        ) from exc
    message_type = message.message_type
    length = sum(nbytes(part) for part in parts)
    if length > MAX_PAYLOAD_BYTES[message_type]:
        raise LocalProtocolError(
            ErrorCode.TOO_LARGE,
            f"{type(message).__name__} payload is {length} bytes; at most "
            f"{MAX_PAYLOAD_BYTES[message_type]} fit in one frame: split the batch",
        )
    prefix = _HEADER_PREFIX.pack(FRAME_MAGIC, WIRE_VERSION, message_type, epoch, length)
    crc = _crc32c(prefix)
    for part in parts:
        crc = _crc32c(part, crc)
    header = prefix + _CRC.pack(crc)
    if parts and isinstance(parts[0], bytes) and len(parts[0]) <= 4096:
        return [header + parts[0], *parts[1:]]
    return [header, *parts]


def make_error(code: ErrorCode, reason: str) -> Error:
    """An ``Error`` message whose reason is cut to ``MAX_ERROR_REASON_BYTES`` of UTF-8 (at a
    character boundary), so any exception text can be sent as is."""
    raw = reason.encode("utf-8", errors="replace")
    return Error(code=code, reason=raw[:MAX_ERROR_REASON_BYTES].decode("utf-8", errors="ignore"))


def error_for(exc: ReplicationProtocolError) -> Error:
    """The ``Error`` message that answers ``exc`` (its code, its reason cut to the bound)."""
    return make_error(exc.code, exc.reason)


# --- framing ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Frame:
    """One checked frame: its type, the sender's epoch and the payload (a read-only view)."""

    message_type: MessageType
    epoch: int
    payload: memoryview = field(repr=False)


NEED_DATA: Final = NeedData()
CONNECTION_CLOSED: Final = ConnectionClosed()


class FrameReader:
    """Frames one direction of a connection: bytes in, checked :class:`Frame` objects out.

    Checks magic, version, type and the type's length bound as soon as the 20-byte header is
    in, before buffering any payload, and the CRC32C once the frame is complete. Every failure
    is a :class:`RemoteProtocolError` after which framing is lost: the reader raises the same
    error on every later call. Payloads are views into buffers the reader never touches again.

    Memory: call :meth:`next_frame` until it returns ``NeedData`` before passing more data, so
    the buffer holds at most one maximal frame plus one ``receive_data`` argument; passing
    more while a maximal frame is already buffered raises :class:`LocalProtocolError`.
    Not thread-safe.
    """

    __slots__ = ("_buffer", "_eof", "_error")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._eof = False
        self._error: RemoteProtocolError | None = None

    @property
    def buffered_bytes(self) -> int:
        """Bytes received and not yet returned in a frame."""
        return len(self._buffer)

    def receive_data(self, data: BytesLike) -> None:
        """Buffer bytes from the peer; ``b""`` means the peer closed its side (EOF)."""
        if self._error is not None:
            raise self._error
        if self._eof:
            raise LocalProtocolError(
                ErrorCode.UNEXPECTED, "receive_data called after EOF (b'') was passed"
            )
        if not data:
            self._eof = True
            return
        if len(self._buffer) >= MAX_FRAME_BYTES:
            raise LocalProtocolError(
                ErrorCode.TOO_LARGE,
                f"{len(self._buffer)} bytes are already buffered; call next_frame until it "
                "returns NeedData before passing more",
            )
        self._buffer += data

    def _fail(self, code: ErrorCode, reason: str) -> RemoteProtocolError:
        self._error = RemoteProtocolError(code, reason)
        self._buffer = bytearray()
        return self._error

    def next_frame(self) -> Frame | NeedData | ConnectionClosed:
        """The next complete frame, ``NeedData``, or ``ConnectionClosed`` at a clean EOF.

        Raises :class:`RemoteProtocolError` for a bad header, an oversize length, a CRC
        mismatch, or an EOF in the middle of a frame.
        """
        if self._error is not None:
            raise self._error
        buffer = self._buffer
        available = len(buffer)
        if available < FRAME_HEADER_BYTES:
            if not self._eof:
                return NEED_DATA
            if available == 0:
                return CONNECTION_CLOSED
            raise self._fail(
                ErrorCode.PROTOCOL, f"connection closed {available} bytes into a frame header"
            )
        magic, version, type_code, epoch, length, crc = _HEADER.unpack_from(buffer)
        if magic != FRAME_MAGIC:
            raise self._fail(
                ErrorCode.PROTOCOL,
                f"frame magic {magic:#06x} is not {FRAME_MAGIC:#06x}: not a blockyard "
                "replication peer, or the stream lost its framing",
            )
        if version != WIRE_VERSION:
            raise self._fail(
                ErrorCode.UNSUPPORTED_VERSION,
                f"frame version {version}; this side speaks version {WIRE_VERSION}",
            )
        message_type = _TYPES_BY_CODE.get(type_code)
        if message_type is None:
            raise self._fail(ErrorCode.PROTOCOL, f"unknown message type {type_code}")
        if length > MAX_PAYLOAD_BYTES[message_type]:
            raise self._fail(
                ErrorCode.TOO_LARGE,
                f"{message_type.name} frame announces {length} payload bytes; at most "
                f"{MAX_PAYLOAD_BYTES[message_type]}",
            )
        total = FRAME_HEADER_BYTES + length
        if available < total:
            if self._eof:
                raise self._fail(
                    ErrorCode.PROTOCOL,
                    f"connection closed {available} bytes into a {total}-byte frame",
                )
            return NEED_DATA
        # Hand the frame's bytes over without copying them when possible: the payload views
        # returned keep that buffer alive, so the reader must never write to it again.
        if available == total:
            chunk = buffer
            self._buffer = bytearray()
        elif available - total < total:
            self._buffer = buffer[total:]
            del buffer[total:]
            chunk = buffer
        else:
            chunk = buffer[:total]
            del buffer[:total]
        view = memoryview(chunk).toreadonly()
        payload = view[FRAME_HEADER_BYTES:]
        if _crc32c(payload, _crc32c(view[:16])) != crc:
            raise self._fail(
                ErrorCode.BAD_CRC,
                f"{message_type.name} frame fails its CRC32C: corrupted in transit",
            )
        return Frame(message_type, epoch, payload)


# --- decoding --------------------------------------------------------------------------------


class _Cursor:
    """Reads fields from a payload; a short payload raises ``Violation``."""

    __slots__ = ("offset", "view")

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.offset = 0

    def unpack(self, fmt: struct.Struct) -> tuple[Any, ...]:
        offset = self.offset
        if offset + fmt.size > self.view.nbytes:
            raise Violation(ErrorCode.PROTOCOL, "payload ends in the middle of a field")
        self.offset = offset + fmt.size
        return fmt.unpack_from(self.view, offset)

    def take(self, size: int) -> memoryview:
        offset = self.offset
        if offset + size > self.view.nbytes:
            raise Violation(
                ErrorCode.PROTOCOL,
                f"payload ends {offset + size - self.view.nbytes} bytes before its data",
            )
        self.offset = offset + size
        return self.view[offset : offset + size]

    def u16(self) -> int:
        value: int = self.unpack(_U16)[0]
        return value

    def u64(self) -> int:
        value: int = self.unpack(_U64)[0]
        return value

    def string(self, what: str, max_bytes: int) -> str:
        size = self.u16()
        if size > max_bytes:
            raise Violation(ErrorCode.TOO_LARGE, f"{what} is {size} bytes; at most {max_bytes}")
        try:
            return str(self.take(size), "utf-8")
        except UnicodeDecodeError as exc:
            raise Violation(ErrorCode.PROTOCOL, f"{what} is not valid UTF-8: {exc}") from exc

    def uuid(self) -> UUID:
        return UUID(bytes=bytes(self.take(16)))

    def record_id(self) -> RecordId:
        lsn, epoch, generation = self.unpack(_RECORD_ID)
        return RecordId(lsn=lsn, epoch=epoch, generation=generation)

    def history(self) -> tuple[HistorySegment, ...]:
        count = self.u16()
        if count > MAX_HISTORY_SEGMENTS:
            raise Violation(
                ErrorCode.TOO_LARGE, f"history has {count} segments; at most {MAX_HISTORY_SEGMENTS}"
            )
        return tuple(
            HistorySegment(epoch=e, generation=g, first_lsn=f, last_lsn=la)
            for e, g, f, la in (self.unpack(_SEGMENT) for _ in range(count))
        )

    def finish(self) -> None:
        extra = self.view.nbytes - self.offset
        if extra:
            raise Violation(ErrorCode.PROTOCOL, f"{extra} unparsed bytes after the message")


_E = TypeVar("_E")


def _enum(what: str, enum: Callable[[int], _E], value: int) -> _E:
    try:
        return enum(value)
    except ValueError:
        raise Violation(ErrorCode.PROTOCOL, f"{what} {value} is out of range") from None


def _decode_hello(c: _Cursor) -> Hello:
    return Hello(
        protocol_version=c.u16(),
        volume_uuid=c.uuid(),
        volume_name=c.string("volume_name", MAX_VOLUME_NAME_BYTES),
        size_bytes=c.u64(),
        primary_id=c.string("primary_id", MAX_PRIMARY_ID_BYTES),
        head=c.record_id(),
        durable_lsn=c.u64(),
        history=c.history(),
    )


def _decode_replica_hello(c: _Cursor) -> ReplicaHello:
    raw_uuid, state, size_bytes = c.unpack(_REPLICA_HELLO_FIXED)
    last = c.record_id()
    durable_lsn = c.u64()
    history = c.history()
    resync_id, resync_cursor = c.unpack(_REPLICA_HELLO_TAIL)
    return ReplicaHello(
        volume_uuid=UUID(bytes=raw_uuid),
        state=_enum("ReplicaHello state", ReplicaDataState, state),
        size_bytes=size_bytes,
        last=last,
        durable_lsn=durable_lsn,
        history=history,
        resync_id=resync_id,
        resync_cursor=resync_cursor,
    )


def _decode_plan(c: _Cursor) -> Plan:
    kind, start_lsn, resync_id, total_blocks, resume_cursor, diverged = c.unpack(_PLAN)
    return Plan(
        kind=_enum("Plan kind", PlanKind, kind),
        start_lsn=start_lsn,
        resync_id=resync_id,
        total_blocks=total_blocks,
        resume_cursor=resume_cursor,
        diverged_after_lsn=diverged,
    )


_RECORD_KINDS: Final = {int(k): k for k in RecordKind}


def _decode_records(c: _Cursor) -> Records:
    count = c.u16()
    if not 1 <= count <= MAX_RECORDS_PER_BATCH:
        raise Violation(
            ErrorCode.TOO_LARGE if count else ErrorCode.PROTOCOL,
            f"a Records batch holds {count} records; 1..{MAX_RECORDS_PER_BATCH} allowed",
        )
    view = c.view
    end = view.nbytes
    offset = c.offset
    records = []
    unpack = _RECORD.unpack_from
    header_bytes = _RECORD.size
    for _ in range(count):
        if offset + header_bytes > end:
            raise Violation(ErrorCode.PROTOCOL, "payload ends inside a record header")
        lsn, epoch, generation, kind, block, block_count, data_len = unpack(view, offset)
        offset += header_bytes
        if offset + data_len > end:
            raise Violation(
                ErrorCode.PROTOCOL,
                f"record {lsn} announces {data_len} data bytes; the payload has "
                f"{end - offset} left",
            )
        record_kind = _RECORD_KINDS.get(kind)
        if record_kind is None:
            raise Violation(ErrorCode.PROTOCOL, f"record {lsn} kind {kind} is out of range")
        records.append(
            ReplRecord(
                lsn=lsn,
                epoch=epoch,
                generation=generation,
                kind=record_kind,
                block=block,
                block_count=block_count,
                data=view[offset : offset + data_len],
            )
        )
        offset += data_len
    c.offset = offset
    return Records(records=tuple(records))


def _decode_blocks(c: _Cursor) -> Blocks:
    resync_id, cursor, read_lsn, count = c.unpack(_BLOCKS_FIXED)
    if not 1 <= count <= MAX_BLOCK_RUNS_PER_BATCH:
        raise Violation(
            ErrorCode.TOO_LARGE if count else ErrorCode.PROTOCOL,
            f"a Blocks batch holds {count} runs; 1..{MAX_BLOCK_RUNS_PER_BATCH} allowed",
        )
    runs = []
    for index in range(count):
        block, block_count, flags = c.unpack(_RUN)
        if flags & ~KNOWN_RUN_FLAGS:
            raise Violation(ErrorCode.PROTOCOL, f"block run {index} has unknown flags {flags:#x}")
        hole = bool(flags & BlockRunFlags.HOLE)
        data = c.take(0 if hole else block_count * WIRE_BLOCK_BYTES)
        runs.append(
            BlockRun(block=block, block_count=block_count, flags=BlockRunFlags(flags), data=data)
        )
    return Blocks(resync_id=resync_id, cursor=cursor, read_lsn=read_lsn, runs=tuple(runs))


def _decode_need_blocks(c: _Cursor) -> NeedBlocks:
    final, count = c.unpack(_NEED_BLOCKS_FIXED)
    if final > 1:
        raise Violation(ErrorCode.PROTOCOL, f"NeedBlocks final is {final}; must be 0 or 1")
    if count > MAX_NEED_BLOCKS_EXTENTS:
        raise Violation(
            ErrorCode.TOO_LARGE,
            f"NeedBlocks holds {count} extents; at most {MAX_NEED_BLOCKS_EXTENTS}",
        )
    extents = tuple(
        Extent(block=block, block_count=block_count)
        for block, block_count in (c.unpack(_EXTENT) for _ in range(count))
    )
    return NeedBlocks(final=bool(final), extents=extents)


def _decode_error(c: _Cursor) -> Error:
    (code,) = c.unpack(_ERROR_FIXED)
    return Error(
        code=_enum("Error code", ErrorCode, code),
        reason=c.string("Error reason", MAX_ERROR_REASON_BYTES),
    )


def _decode_two(make: Callable[[int, int], Message]) -> Callable[[_Cursor], Message]:
    def decode(c: _Cursor) -> Message:
        first, second = c.unpack(_TWO_U64)
        return make(first, second)

    return decode


def _decode_ack(c: _Cursor) -> Ack:
    barrier_id, durable_lsn, applied_lsn = c.unpack(_ACK)
    return Ack(barrier_id=barrier_id, durable_lsn=durable_lsn, applied_lsn=applied_lsn)


_DECODERS: Final[dict[MessageType, Callable[[_Cursor], Message]]] = {
    MessageType.HELLO: _decode_hello,
    MessageType.REPLICA_HELLO: _decode_replica_hello,
    MessageType.PLAN: _decode_plan,
    MessageType.RECORDS: _decode_records,
    MessageType.BLOCKS: _decode_blocks,
    MessageType.RESYNC_DONE: _decode_two(lambda a, b: ResyncDone(resync_id=a, final_lsn=b)),
    MessageType.BARRIER: _decode_two(lambda a, b: Barrier(barrier_id=a, lsn=b)),
    MessageType.ACK: _decode_ack,
    MessageType.PROGRESS: _decode_two(lambda a, b: Progress(resync_id=a, cursor=b)),
    MessageType.NEED_BLOCKS: _decode_need_blocks,
    MessageType.KEEPALIVE: _decode_two(lambda a, b: Keepalive(durable_lsn=a, commit_lsn=b)),
    MessageType.ERROR: _decode_error,
}
assert set(_DECODERS) == set(MessageType)


def decode_message(frame: Frame) -> Message:
    """Parse and validate a frame's payload into its message.

    The payload must parse exactly (no short field, no trailing byte) and the message must pass
    :func:`check_message`'s rules; otherwise :class:`RemoteProtocolError`. Record and block data
    are views into the frame's payload, not copies.
    """
    cursor = _Cursor(frame.payload)
    try:
        message = _DECODERS[frame.message_type](cursor)
        cursor.finish()
        check(message)
    except Violation as violation:
        raise RemoteProtocolError(
            violation.code, f"{frame.message_type.name} message: {violation.reason}"
        ) from None
    return message


__all__ = [
    "CONNECTION_CLOSED",
    "FRAME_HEADER_BYTES",
    "FRAME_MAGIC",
    "MAX_BLOCK_RUNS_PER_BATCH",
    "MAX_ERROR_REASON_BYTES",
    "MAX_FRAME_BYTES",
    "MAX_FRAME_PAYLOAD_BYTES",
    "MAX_HISTORY_SEGMENTS",
    "MAX_NEED_BLOCKS_EXTENTS",
    "MAX_PAYLOAD_BYTES",
    "MAX_PRIMARY_ID_BYTES",
    "MAX_RECORDS_PER_BATCH",
    "MAX_RECORD_DATA_BYTES",
    "MAX_VOLUME_NAME_BYTES",
    "NEED_DATA",
    "OPEN_LSN",
    "WIRE_BLOCK_BYTES",
    "WIRE_VERSION",
    "Frame",
    "FrameReader",
    "check_message",
    "decode_message",
    "encode_message",
    "error_for",
    "make_error",
]
