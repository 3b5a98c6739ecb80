"""Each rule of the replication wire spec: a crafted frame breaking it is refused with the right
ErrorCode, and our own side cannot encode a message that breaks it."""

from __future__ import annotations

import dataclasses
import struct
import uuid

import pytest
from repl_strategies import frame_bytes, raw, with_valid_crc

from blockyard.replication.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from blockyard.replication.messages import (
    Ack,
    Barrier,
    BlockRun,
    BlockRunFlags,
    Blocks,
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
from blockyard.replication.wire import (
    FRAME_HEADER_BYTES,
    MAX_FRAME_PAYLOAD_BYTES,
    MAX_PAYLOAD_BYTES,
    OPEN_LSN,
    Frame,
    FrameReader,
    decode_message,
    encode_message,
)

T = MessageType
VOLUME = uuid.UUID(int=0x1234)
HISTORY = (HistorySegment(1, 0, 1, 10), HistorySegment(2, 0, 11, OPEN_LSN))
HELLO = Hello(1, VOLUME, "vol", 1 << 30, "10.0.0.1:7000", RecordId(20, 2, 0), 18, HISTORY)
REPLICA_HELLO = ReplicaHello(
    VOLUME, ReplicaDataState.CONSISTENT, 1 << 30, RecordId(5, 1, 0), 5, HISTORY[:1], 0, 0
)
WRITE = ReplRecord(7, 2, 0, RecordKind.WRITE, 100, 1, b"\xab" * 4096)


def decode(data: bytes) -> Message:
    reader = FrameReader()
    reader.receive_data(data)
    frame = reader.next_frame()
    assert isinstance(frame, Frame), frame
    return decode_message(frame)


def refused(data: bytes) -> ErrorCode:
    with pytest.raises(RemoteProtocolError) as info:
        decode(data)
    return info.value.code


def local_refused(message: Message, epoch: int = 1) -> ErrorCode:
    with pytest.raises(LocalProtocolError) as info:
        encode_message(message, epoch)
    return info.value.code


def patched(message: Message, offset: int, value: bytes) -> bytes:
    """``message``'s frame with payload bytes at ``offset`` replaced, CRC recomputed."""
    frame = bytearray(raw(message))
    start = FRAME_HEADER_BYTES + offset
    frame[start : start + len(value)] = value
    return with_valid_crc(frame)


# --- framing -----------------------------------------------------------------------------


def test_wrong_magic() -> None:
    assert refused(frame_bytes(T.KEEPALIVE, bytes(16), magic=0x4258)) is ErrorCode.PROTOCOL


@pytest.mark.parametrize("version", [0, 2, 255])
def test_unsupported_version(version: int) -> None:
    data = frame_bytes(T.KEEPALIVE, bytes(16), version=version)
    assert refused(data) is ErrorCode.UNSUPPORTED_VERSION


@pytest.mark.parametrize("type_code", [0, 13, 255])
def test_unknown_type(type_code: int) -> None:
    assert refused(frame_bytes(type_code, b"")) is ErrorCode.PROTOCOL


@pytest.mark.parametrize("message_type", list(MessageType), ids=lambda t: t.name)
def test_length_over_the_types_bound_is_refused_from_the_header(message_type: MessageType) -> None:
    bound = MAX_PAYLOAD_BYTES[message_type]
    header = frame_bytes(message_type, b"", length=bound + 1)
    reader = FrameReader()
    reader.receive_data(header)  # the header alone: no payload was sent or buffered
    with pytest.raises(RemoteProtocolError) as info:
        reader.next_frame()
    assert info.value.code is ErrorCode.TOO_LARGE
    assert reader.buffered_bytes == 0


def test_four_gib_header_is_refused_before_buffering() -> None:
    reader = FrameReader()
    reader.receive_data(frame_bytes(T.RECORDS, b"", length=2**32 - 1) + bytes(1000))
    with pytest.raises(RemoteProtocolError) as info:
        reader.next_frame()
    assert info.value.code is ErrorCode.TOO_LARGE
    # Framing is lost: the reader keeps refusing and holds nothing.
    assert reader.buffered_bytes == 0
    with pytest.raises(RemoteProtocolError):
        reader.next_frame()


def test_largest_payload_is_accepted_one_more_byte_is_not() -> None:
    reader = FrameReader()
    reader.receive_data(frame_bytes(T.RECORDS, b"", length=MAX_FRAME_PAYLOAD_BYTES)[:20])
    assert isinstance(reader.next_frame(), NeedData)
    assert refused(frame_bytes(T.RECORDS, bytes(MAX_FRAME_PAYLOAD_BYTES + 1))) is (
        ErrorCode.TOO_LARGE
    )


# Magic, version, type and length are checked (above) before the CRC; every other byte of the
# frame is covered by it.
@pytest.mark.parametrize("offset", [*range(4, 12), *range(16, 36)])
def test_any_flipped_bit_fails_the_crc(offset: int) -> None:
    frame = bytearray(raw(Keepalive(1, 2)))
    for bit in range(8):
        damaged = bytearray(frame)
        damaged[offset] ^= 1 << bit
        assert refused(bytes(damaged)) is ErrorCode.BAD_CRC


def test_eof_inside_a_frame() -> None:
    frame = raw(Keepalive(1, 2))
    for cut in (1, FRAME_HEADER_BYTES - 1, FRAME_HEADER_BYTES, len(frame) - 1):
        reader = FrameReader()
        reader.receive_data(frame[:cut])
        reader.receive_data(b"")
        with pytest.raises(RemoteProtocolError) as info:
            reader.next_frame()
        assert info.value.code is ErrorCode.PROTOCOL


def test_undrained_reader_refuses_more_data() -> None:
    reader = FrameReader()
    reader.receive_data(bytes(MAX_FRAME_PAYLOAD_BYTES + FRAME_HEADER_BYTES))
    with pytest.raises(LocalProtocolError):
        reader.receive_data(b"x")


# --- payload parsing ---------------------------------------------------------------------


def test_short_payload() -> None:
    assert refused(frame_bytes(T.KEEPALIVE, bytes(15))) is ErrorCode.PROTOCOL
    assert refused(frame_bytes(T.HELLO, raw(HELLO)[20:-1])) is ErrorCode.PROTOCOL


@pytest.mark.parametrize(
    "message",
    [
        HELLO,
        REPLICA_HELLO,
        Records((WRITE,)),
        Blocks(1, 0, 0, (BlockRun(0, 1, BlockRunFlags.HOLE),)),
    ],
    ids=lambda m: type(m).__name__,
)
def test_trailing_bytes_inside_the_payload(message: Message) -> None:
    payload = raw(message)[FRAME_HEADER_BYTES:] + b"\x00"
    assert refused(frame_bytes(message.message_type, payload)) is ErrorCode.PROTOCOL


def test_fixed_size_message_with_a_trailing_byte_is_too_large() -> None:
    assert refused(frame_bytes(T.ACK, bytes(25))) is ErrorCode.TOO_LARGE


def test_hello_protocol_version_zero() -> None:
    assert refused(patched(HELLO, 0, b"\x00\x00")) is ErrorCode.UNSUPPORTED_VERSION


def test_hello_from_a_newer_primary_is_accepted() -> None:
    newer = dataclasses.replace(HELLO, protocol_version=7)
    assert decode(raw(newer)) == newer


def hello_payload(name: bytes, primary_id: bytes, segments: list[bytes]) -> bytes:
    return b"".join(
        [
            struct.pack(">H", 1),
            VOLUME.bytes,
            struct.pack(">H", len(name)),
            name,
            struct.pack(">Q", 1 << 30),
            struct.pack(">H", len(primary_id)),
            primary_id,
            struct.pack(">QQI", 1, 1, 0),
            struct.pack(">Q", 1),
            struct.pack(">H", len(segments)),
            *segments,
        ]
    )


def segment(epoch: int, generation: int, first: int, last: int) -> bytes:
    return struct.pack(">QIQQ", epoch, generation, first, last)


def test_hello_strings() -> None:
    assert decode(frame_bytes(T.HELLO, hello_payload(b"v" * 128, b"p" * 255, []))) == Hello(
        1, VOLUME, "v" * 128, 1 << 30, "p" * 255, RecordId(1, 1, 0), 1, ()
    )
    too_long_name = frame_bytes(T.HELLO, hello_payload(b"v" * 129, b"p", []))
    assert refused(too_long_name) is ErrorCode.TOO_LARGE
    too_long_id = frame_bytes(T.HELLO, hello_payload(b"v", b"p" * 256, []))
    assert refused(too_long_id) is ErrorCode.TOO_LARGE
    not_utf8 = frame_bytes(T.HELLO, hello_payload(b"v\xff", b"p", []))
    assert refused(not_utf8) is ErrorCode.PROTOCOL
    # A string length pointing past the payload.
    assert refused(frame_bytes(T.HELLO, hello_payload(b"v", b"p", [])[:21])) is ErrorCode.PROTOCOL


@pytest.mark.parametrize(
    ("segments", "code"),
    [
        ([segment(1, 0, 1, 10)] * 65, ErrorCode.TOO_LARGE),
        ([segment(1, 0, 1, OPEN_LSN), segment(2, 0, 11, 20)], ErrorCode.PROTOCOL),
        ([segment(1, 0, 12, 10)], ErrorCode.PROTOCOL),
        ([segment(2, 0, 1, 10), segment(1, 0, 11, 20)], ErrorCode.PROTOCOL),
        ([segment(2, 3, 1, 10), segment(2, 3, 11, 20)], ErrorCode.PROTOCOL),
        ([segment(1, 0, 1, 10), segment(2, 0, 10, 20)], ErrorCode.PROTOCOL),
    ],
    ids=["count", "open-not-last", "first-after-last", "epoch-back", "same-generation", "overlap"],
)
def test_history_rules(segments: list[bytes], code: ErrorCode) -> None:
    assert refused(frame_bytes(T.HELLO, hello_payload(b"v", b"p", segments))) is code


def test_history_allows_empty_segments_and_lsn_skips() -> None:
    segments = [segment(1, 0, 1, 10), segment(1, 1, 11, 10), segment(2, 0, 14, OPEN_LSN)]
    message = decode(frame_bytes(T.HELLO, hello_payload(b"v", b"p", segments)))
    assert isinstance(message, Hello)
    assert message.history[1] == HistorySegment(1, 1, 11, 10)


def test_replica_hello_rules() -> None:
    # Layout: uuid 16, state 1, size 8, RecordId 20, durable 8, history 2 + 28, resync 8+8.
    state_at, tail_at = 16, 16 + 1 + 8 + 20 + 8 + 2 + 28
    assert refused(patched(REPLICA_HELLO, state_at, b"\x03")) is ErrorCode.PROTOCOL
    resyncing = patched(REPLICA_HELLO, state_at, b"\x02")
    assert refused(resyncing) is ErrorCode.PROTOCOL  # RESYNCING without a resync id
    with_id = patched(REPLICA_HELLO, tail_at, struct.pack(">Q", 9))
    assert refused(with_id) is ErrorCode.PROTOCOL  # CONSISTENT with a resync id
    cursor = patched(REPLICA_HELLO, tail_at + 8, struct.pack(">Q", 9))
    assert refused(cursor) is ErrorCode.PROTOCOL  # cursor without a resync
    frame = bytearray(raw(REPLICA_HELLO))
    frame[20 + state_at] = 2
    frame[20 + tail_at : 20 + tail_at + 16] = struct.pack(">QQ", 9, 4)
    message = decode(with_valid_crc(frame))
    assert isinstance(message, ReplicaHello)
    assert (message.state, message.resync_id, message.resync_cursor) == (
        ReplicaDataState.RESYNCING,
        9,
        4,
    )


@pytest.mark.parametrize(
    ("kind", "resync_id", "code"),
    [
        (0, 0, ErrorCode.PROTOCOL),
        (4, 1, ErrorCode.PROTOCOL),
        (PlanKind.CATCH_UP, 5, ErrorCode.PROTOCOL),
        (PlanKind.DELTA, 0, ErrorCode.PROTOCOL),
        (PlanKind.FULL, 0, ErrorCode.PROTOCOL),
    ],
)
def test_plan_rules(kind: int, resync_id: int, code: ErrorCode) -> None:
    payload = struct.pack(">BQQQQQ", kind, 1, resync_id, 0, 0, OPEN_LSN)
    assert refused(frame_bytes(T.PLAN, payload)) is code


def record_bytes(
    lsn: int, kind: int, block: int, block_count: int, data: bytes, data_len: int | None = None
) -> bytes:
    length = len(data) if data_len is None else data_len
    return struct.pack(">QQIBQII", lsn, 1, 0, kind, block, block_count, length) + data


def records_frame(*records: bytes, count: int | None = None) -> bytes:
    n = len(records) if count is None else count
    return frame_bytes(T.RECORDS, struct.pack(">H", n) + b"".join(records))


def test_records_rules() -> None:
    block = b"\x01" * 4096
    ok = records_frame(record_bytes(5, 1, 0, 1, block), record_bytes(6, 2, 9, 300, b""))
    assert decode(ok) == Records(
        (
            ReplRecord(5, 1, 0, RecordKind.WRITE, 0, 1, block),
            ReplRecord(6, 1, 0, RecordKind.ZERO, 9, 300),
        )
    )
    cases = {
        "empty batch": (records_frame(count=0), ErrorCode.PROTOCOL),
        "count over 4096": (
            records_frame(record_bytes(1, 2, 0, 1, b""), count=4097),
            ErrorCode.TOO_LARGE,
        ),
        "count over records present": (
            records_frame(record_bytes(1, 2, 0, 1, b""), count=2),
            ErrorCode.PROTOCOL,
        ),
        "kind 0": (records_frame(record_bytes(1, 0, 0, 1, b"")), ErrorCode.PROTOCOL),
        "kind 3 (WRAP is not shipped)": (
            records_frame(record_bytes(1, 3, 0, 1, b"")),
            ErrorCode.PROTOCOL,
        ),
        "write short": (records_frame(record_bytes(1, 1, 0, 2, block)), ErrorCode.PROTOCOL),
        "write long": (records_frame(record_bytes(1, 1, 0, 1, block + b"x")), ErrorCode.PROTOCOL),
        "write zero blocks": (records_frame(record_bytes(1, 1, 0, 0, b"")), ErrorCode.PROTOCOL),
        "write over 1 MiB": (
            records_frame(record_bytes(1, 1, 0, 257, bytes(257 * 4096))),
            ErrorCode.TOO_LARGE,
        ),
        "zero with data": (records_frame(record_bytes(1, 2, 0, 1, block)), ErrorCode.PROTOCOL),
        "zero zero blocks": (records_frame(record_bytes(1, 2, 0, 0, b"")), ErrorCode.PROTOCOL),
        "lsn gap": (
            records_frame(record_bytes(1, 2, 0, 1, b""), record_bytes(3, 2, 0, 1, b"")),
            ErrorCode.PROTOCOL,
        ),
        "lsn repeat": (
            records_frame(record_bytes(1, 2, 0, 1, b""), record_bytes(1, 2, 0, 1, b"")),
            ErrorCode.PROTOCOL,
        ),
        "lsn backwards": (
            records_frame(record_bytes(2, 2, 0, 1, b""), record_bytes(1, 2, 0, 1, b"")),
            ErrorCode.PROTOCOL,
        ),
        "data_len past the payload": (
            records_frame(record_bytes(1, 1, 0, 1, b"", 4096)),
            ErrorCode.PROTOCOL,
        ),
        "block range past 2**64": (
            records_frame(record_bytes(1, 2, 2**64 - 1, 2, b"")),
            ErrorCode.PROTOCOL,
        ),
        "header cut": (records_frame(record_bytes(1, 2, 0, 1, b"")[:-1]), ErrorCode.PROTOCOL),
    }
    got = {name: refused(data) for name, (data, _) in cases.items()}
    assert got == {name: code for name, (_, code) in cases.items()}


def run_bytes(block: int, block_count: int, flags: int, data: bytes = b"") -> bytes:
    return struct.pack(">QIB", block, block_count, flags) + data


def blocks_frame(*runs: bytes, resync_id: int = 1, count: int | None = None) -> bytes:
    n = len(runs) if count is None else count
    return frame_bytes(T.BLOCKS, struct.pack(">QQQH", resync_id, 0, 0, n) + b"".join(runs))


def test_blocks_rules() -> None:
    block = b"\x02" * 4096
    ok = blocks_frame(run_bytes(0, 1, 0, block), run_bytes(1, 2**32 - 1, 1))
    assert decode(ok) == Blocks(
        1,
        0,
        0,
        (BlockRun(0, 1, BlockRunFlags.DATA, block), BlockRun(1, 2**32 - 1, BlockRunFlags.HOLE)),
    )
    cases = {
        "resync id 0": (blocks_frame(run_bytes(0, 1, 1), resync_id=0), ErrorCode.PROTOCOL),
        "empty batch": (blocks_frame(count=0), ErrorCode.PROTOCOL),
        "count over 4096": (blocks_frame(run_bytes(0, 1, 1), count=4097), ErrorCode.TOO_LARGE),
        "unknown flag": (blocks_frame(run_bytes(0, 1, 2)), ErrorCode.PROTOCOL),
        "hole and unknown flag": (blocks_frame(run_bytes(0, 1, 3)), ErrorCode.PROTOCOL),
        "zero blocks": (blocks_frame(run_bytes(0, 0, 1)), ErrorCode.PROTOCOL),
        "data short": (blocks_frame(run_bytes(0, 2, 0, block)), ErrorCode.PROTOCOL),
        "hole with data": (blocks_frame(run_bytes(0, 1, 1, block)), ErrorCode.PROTOCOL),
        "past 2**64": (blocks_frame(run_bytes(2**64 - 1, 2, 1)), ErrorCode.PROTOCOL),
    }
    got = {name: refused(data) for name, (data, _) in cases.items()}
    assert got == {name: code for name, (_, code) in cases.items()}


def test_small_message_rules() -> None:
    two = struct.Struct(">QQ")
    assert refused(frame_bytes(T.RESYNC_DONE, two.pack(0, 5))) is ErrorCode.PROTOCOL
    assert refused(frame_bytes(T.PROGRESS, two.pack(0, 5))) is ErrorCode.PROTOCOL
    assert refused(frame_bytes(T.BARRIER, two.pack(0, 5))) is ErrorCode.PROTOCOL
    assert decode(frame_bytes(T.ACK, bytes(24))) == Ack(0, 0, 0)  # unsolicited report
    assert decode(frame_bytes(T.BARRIER, two.pack(1, 0))) == Barrier(1, 0)


def test_need_blocks_rules() -> None:
    extent = struct.pack(">QI", 5, 3)
    ok = frame_bytes(T.NEED_BLOCKS, struct.pack(">BH", 1, 1) + extent)
    assert decode(ok) == NeedBlocks(True, (Extent(5, 3),))
    assert decode(frame_bytes(T.NEED_BLOCKS, struct.pack(">BH", 0, 0))) == NeedBlocks(False, ())
    bad_final = frame_bytes(T.NEED_BLOCKS, struct.pack(">BH", 2, 1) + extent)
    assert refused(bad_final) is ErrorCode.PROTOCOL
    over = frame_bytes(T.NEED_BLOCKS, struct.pack(">BH", 0, 4097) + extent)
    assert refused(over) is ErrorCode.TOO_LARGE
    empty_extent = frame_bytes(T.NEED_BLOCKS, struct.pack(">BHQI", 0, 1, 5, 0))
    assert refused(empty_extent) is ErrorCode.PROTOCOL


def test_error_rules() -> None:
    def error_frame(code: int, reason: bytes) -> bytes:
        return frame_bytes(T.ERROR, struct.pack(">HH", code, len(reason)) + reason)

    assert decode(error_frame(5, b"stale")) == Error(ErrorCode.STALE_EPOCH, "stale")
    assert decode(error_frame(11, b"r" * 1024)) == Error(ErrorCode.SHUTDOWN, "r" * 1024)
    assert refused(error_frame(0, b"")) is ErrorCode.PROTOCOL
    assert refused(error_frame(12, b"")) is ErrorCode.PROTOCOL
    assert refused(error_frame(1, b"\xc3")) is ErrorCode.PROTOCOL
    assert refused(error_frame(1, b"r" * 1025)) is ErrorCode.TOO_LARGE
    # A reason length larger than the bound, announced inside a frame that fits.
    lying = frame_bytes(T.ERROR, struct.pack(">HH", 1, 1025) + b"r" * 10)
    assert refused(lying) is ErrorCode.TOO_LARGE


# --- our side cannot send what the peer would refuse ---------------------------------------


def test_local_refusals_match_the_remote_ones() -> None:
    hole = BlockRun(0, 1, BlockRunFlags.HOLE)
    cases: dict[str, tuple[Message, ErrorCode]] = {
        "hello version 0": (
            Hello(0, VOLUME, "v", 1, "p", RecordId(0, 0, 0), 0, ()),
            ErrorCode.UNSUPPORTED_VERSION,
        ),
        "name too long": (
            Hello(1, VOLUME, "v" * 129, 1, "p", RecordId(0, 0, 0), 0, ()),
            ErrorCode.TOO_LARGE,
        ),
        "name not encodable": (
            Hello(1, VOLUME, "\udc80", 1, "p", RecordId(0, 0, 0), 0, ()),
            ErrorCode.PROTOCOL,
        ),
        "history open in the middle": (
            Hello(
                1,
                VOLUME,
                "v",
                1,
                "p",
                RecordId(0, 0, 0),
                0,
                (HistorySegment(1, 0, 1, OPEN_LSN), HistorySegment(2, 0, 5, OPEN_LSN)),
            ),
            ErrorCode.PROTOCOL,
        ),
        "history too long": (
            Hello(
                1,
                VOLUME,
                "v",
                1,
                "p",
                RecordId(0, 0, 0),
                0,
                tuple(HistorySegment(i, 0, i + 1, i) for i in range(65)),
            ),
            ErrorCode.TOO_LARGE,
        ),
        "resyncing without id": (
            ReplicaHello(VOLUME, ReplicaDataState.RESYNCING, 1, RecordId(0, 0, 0), 0, (), 0, 0),
            ErrorCode.PROTOCOL,
        ),
        "catch-up with resync": (Plan(PlanKind.CATCH_UP, 1, 3, 0, 0, OPEN_LSN), ErrorCode.PROTOCOL),
        "empty records": (Records(()), ErrorCode.PROTOCOL),
        "records gap": (
            Records((WRITE, ReplRecord(9, 2, 0, RecordKind.ZERO, 0, 1))),
            ErrorCode.PROTOCOL,
        ),
        "write short": (
            Records((ReplRecord(1, 1, 0, RecordKind.WRITE, 0, 2, bytes(4096)),)),
            ErrorCode.PROTOCOL,
        ),
        "zero with data": (
            Records((ReplRecord(1, 1, 0, RecordKind.ZERO, 0, 1, bytes(1)),)),
            ErrorCode.PROTOCOL,
        ),
        "too many records": (
            Records(tuple(ReplRecord(i, 1, 0, RecordKind.ZERO, 0, 1) for i in range(4097))),
            ErrorCode.TOO_LARGE,
        ),
        "batch over the frame": (
            Records(
                tuple(
                    ReplRecord(i, 1, 0, RecordKind.WRITE, 0, 256, bytes(1 << 20)) for i in range(5)
                )
            ),
            ErrorCode.TOO_LARGE,
        ),
        "blocks resync 0": (Blocks(0, 0, 0, (hole,)), ErrorCode.PROTOCOL),
        "hole with data": (
            Blocks(1, 0, 0, (BlockRun(0, 1, BlockRunFlags.HOLE, b"x"),)),
            ErrorCode.PROTOCOL,
        ),
        "unknown flag": (Blocks(1, 0, 0, (BlockRun(0, 1, BlockRunFlags(4)),)), ErrorCode.PROTOCOL),
        "barrier 0": (Barrier(0, 1), ErrorCode.PROTOCOL),
        "progress resync 0": (Progress(0, 1), ErrorCode.PROTOCOL),
        "resync done 0": (ResyncDone(0, 1), ErrorCode.PROTOCOL),
        "extent empty": (NeedBlocks(False, (Extent(1, 0),)), ErrorCode.PROTOCOL),
        "reason too long": (Error(ErrorCode.INTERNAL, "r" * 1025), ErrorCode.TOO_LARGE),
        "negative lsn": (Barrier(1, -1), ErrorCode.PROTOCOL),
        "lsn over u64": (Keepalive(2**64, 0), ErrorCode.PROTOCOL),
        "block count over u32": (
            Records((ReplRecord(1, 1, 0, RecordKind.ZERO, 0, 2**32),)),
            ErrorCode.PROTOCOL,
        ),
    }
    got = {name: local_refused(message) for name, (message, _) in cases.items()}
    assert got == {name: code for name, (_, code) in cases.items()}
    assert local_refused(Keepalive(0, 0), epoch=2**64) is ErrorCode.PROTOCOL
    assert local_refused(Keepalive(0, 0), epoch=-1) is ErrorCode.PROTOCOL
