"""Replication wire codec: every message round-trips, and every reader is fed its input whole,
one byte at a time, and followed by the next frame's bytes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from repl_strategies import MESSAGES, U64, any_message, raw

from blockyard.engine import limits
from blockyard.replication.errors import ErrorCode, LocalProtocolError
from blockyard.replication.messages import (
    BlockRun,
    BlockRunFlags,
    Blocks,
    ConnectionClosed,
    Error,
    Keepalive,
    Message,
    MessageType,
    NeedData,
    RecordKind,
    Records,
    ReplRecord,
)
from blockyard.replication.wire import (
    FRAME_HEADER_BYTES,
    MAX_BLOCK_RUNS_PER_BATCH,
    MAX_ERROR_REASON_BYTES,
    MAX_FRAME_PAYLOAD_BYTES,
    MAX_PAYLOAD_BYTES,
    MAX_RECORD_DATA_BYTES,
    MAX_RECORDS_PER_BATCH,
    MAX_VOLUME_NAME_BYTES,
    WIRE_BLOCK_BYTES,
    Frame,
    FrameReader,
    decode_message,
    encode_message,
    error_for,
    make_error,
)


def read_all(reader: FrameReader) -> list[Frame]:
    frames = []
    while True:
        frame = reader.next_frame()
        if isinstance(frame, NeedData | ConnectionClosed):
            return frames
        frames.append(frame)


def decode_stream(data: bytes, chunk: int) -> list[tuple[Message, int]]:
    reader = FrameReader()
    out: list[tuple[Message, int]] = []
    for i in range(0, len(data), chunk):
        reader.receive_data(data[i : i + chunk])
        out.extend((decode_message(f), f.epoch) for f in read_all(reader))
    return out


@pytest.mark.parametrize("message_type", list(MessageType), ids=lambda t: t.name)
@settings(max_examples=30)
@given(data=st.data(), epoch=U64)
def test_every_message_round_trips_whole(
    message_type: MessageType, data: st.DataObject, epoch: int
) -> None:
    message = data.draw(MESSAGES[message_type])
    frame = raw(message, epoch)
    assert frame[3] == message_type
    assert decode_stream(frame, len(frame)) == [(message, epoch)]


@settings(max_examples=15)
@given(message=any_message, epoch=U64)
def test_byte_at_a_time(message: Message, epoch: int) -> None:
    frame = raw(message, epoch)
    reader = FrameReader()
    decoded = []
    for i in range(len(frame)):
        assert not decoded, "a frame was returned before its last byte arrived"
        reader.receive_data(frame[i : i + 1])
        decoded.extend(decode_message(f) for f in read_all(reader))
    assert decoded == [message]
    assert reader.buffered_bytes == 0


@settings(max_examples=40)
@given(
    messages=st.lists(any_message, min_size=2, max_size=5),
    epoch=U64,
    chunk=st.integers(1, 5000),
)
def test_trailing_data_is_the_next_frame(messages: list[Message], epoch: int, chunk: int) -> None:
    stream = b"".join(raw(m, epoch) for m in messages)
    assert decode_stream(stream, chunk) == [(m, epoch) for m in messages]
    # Whole stream at once: each frame's trailing bytes are the next frame.
    assert decode_stream(stream, len(stream)) == [(m, epoch) for m in messages]


def test_partial_next_frame_stays_buffered() -> None:
    first, second = raw(Keepalive(1, 2)), raw(Keepalive(3, 4))
    reader = FrameReader()
    reader.receive_data(first + second[:7])
    frame = reader.next_frame()
    assert isinstance(frame, Frame)
    assert decode_message(frame) == Keepalive(1, 2)
    assert isinstance(reader.next_frame(), NeedData)
    assert reader.buffered_bytes == 7
    reader.receive_data(second[7:])
    frame = reader.next_frame()
    assert isinstance(frame, Frame)
    assert decode_message(frame) == Keepalive(3, 4)


def test_clean_eof_is_connection_closed() -> None:
    reader = FrameReader()
    reader.receive_data(raw(Keepalive(1, 2)))
    reader.receive_data(b"")
    assert isinstance(reader.next_frame(), Frame)
    assert isinstance(reader.next_frame(), ConnectionClosed)
    assert isinstance(reader.next_frame(), ConnectionClosed)
    with pytest.raises(LocalProtocolError):
        reader.receive_data(b"more")


def test_payload_views_survive_later_frames() -> None:
    """Decoded data is a view into a buffer the reader never reuses."""
    one = Records((ReplRecord(1, 1, 0, RecordKind.WRITE, 0, 1, b"\x11" * 4096),))
    two = Records((ReplRecord(2, 1, 0, RecordKind.WRITE, 0, 1, b"\x22" * 4096),))
    reader = FrameReader()
    frame_one, frame_two = raw(one), raw(two)
    # Exact frame, a frame with a short tail, and a frame with a long tail: all three hand-over
    # paths of the reader.
    reader.receive_data(frame_one)
    first = decode_message(reader.next_frame())  # type: ignore[arg-type]
    reader.receive_data(frame_two + frame_one[:10])
    second = decode_message(reader.next_frame())  # type: ignore[arg-type]
    reader.receive_data(frame_one[10:] + frame_two + frame_one)
    third = decode_message(reader.next_frame())  # type: ignore[arg-type]
    rest = [decode_message(f) for f in read_all(reader)]
    assert [first, second, third, *rest] == [one, two, one, two, one]
    assert isinstance(first, Records)
    assert bytes(first.records[0].data) == b"\x11" * 4096


def test_record_data_is_passed_through_uncopied() -> None:
    data = memoryview(bytearray(b"\x5a" * (256 * 4096)))
    records = tuple(
        ReplRecord(10 + i, 2, 0, RecordKind.WRITE, i, 1, data[i * 4096 : (i + 1) * 4096])
        for i in range(256)
    )
    buffers = encode_message(Records(records), epoch=2)
    passed = [b for b in buffers if isinstance(b, memoryview)]
    assert len(passed) == 256
    assert all(p.obj is data.obj for p in passed)
    # Header + record headers travel in small buffers, never a copy of the data.
    assert sum(len(b) for b in buffers if not isinstance(b, memoryview)) < 256 * 64


def test_decoded_record_data_is_a_view_into_the_frame() -> None:
    message = Records((ReplRecord(1, 1, 0, RecordKind.WRITE, 0, 256, bytes(1 << 20)),))
    reader = FrameReader()
    reader.receive_data(raw(message))
    frame = reader.next_frame()
    assert isinstance(frame, Frame)
    decoded = decode_message(frame)
    assert isinstance(decoded, Records)
    view = decoded.records[0].data
    assert isinstance(view, memoryview)
    assert view.readonly
    assert view.obj is frame.payload.obj


def test_maximal_frames_encode_and_decode() -> None:
    zeros = Records(
        tuple(
            ReplRecord(i + 1, 1, 0, RecordKind.ZERO, i, 2**32 - 1)
            for i in range(MAX_RECORDS_PER_BATCH)
        )
    )
    holes = Blocks(
        1, 2, 3, tuple(BlockRun(i, 1, BlockRunFlags.HOLE) for i in range(MAX_BLOCK_RUNS_PER_BATCH))
    )
    per_record = MAX_RECORD_DATA_BYTES // WIRE_BLOCK_BYTES
    full = Records(
        tuple(
            ReplRecord(i + 1, 1, 0, RecordKind.WRITE, i, per_record, bytes(MAX_RECORD_DATA_BYTES))
            for i in range(4)
        )
    )
    four_mib = Blocks(1, 2, 3, tuple(BlockRun(i, 1, data=bytes(4096)) for i in range(1024)))
    for message in (zeros, holes, full, four_mib):
        frame = raw(message)
        assert len(frame) <= FRAME_HEADER_BYTES + MAX_FRAME_PAYLOAD_BYTES
        assert decode_stream(frame, 65536) == [(message, 1)]


def test_wire_constants_match_the_engine() -> None:
    """The wire block unit and record cap are fixed by protocol version 1; if the engine's
    change, this protocol version can no longer carry its records."""
    assert WIRE_BLOCK_BYTES == limits.BLOCK_SIZE
    assert MAX_RECORD_DATA_BYTES == limits.MAX_RECORD_PAYLOAD_BYTES
    assert MAX_VOLUME_NAME_BYTES == limits.NAME_MAX_CHARS
    assert MAX_PAYLOAD_BYTES[MessageType.RECORDS] == MAX_FRAME_PAYLOAD_BYTES == 5 << 20


def test_header_layout_is_the_spec() -> None:
    frame = raw(Keepalive(durable_lsn=7, commit_lsn=9), epoch=0x0102030405060708)
    assert frame[:2] == b"BY"
    assert frame[2] == 1
    assert frame[3] == 11
    assert frame[4:12] == bytes(range(1, 9))
    assert frame[12:16] == (16).to_bytes(4, "big")
    assert frame[20:] == (7).to_bytes(8, "big") + (9).to_bytes(8, "big")
    assert len(frame) == FRAME_HEADER_BYTES + 16


def test_make_error_cuts_the_reason_at_a_character() -> None:
    error = make_error(ErrorCode.INTERNAL, "é" * 2000)
    assert error.reason == "é" * (MAX_ERROR_REASON_BYTES // 2)
    assert decode_stream(raw(error), 100) == [(error, 1)]
    odd = make_error(ErrorCode.INTERNAL, "x" + "é" * 1000)
    assert len(odd.reason.encode()) == MAX_ERROR_REASON_BYTES - 1
    assert make_error(ErrorCode.SHUTDOWN, "bye") == Error(ErrorCode.SHUTDOWN, "bye")


def test_error_for_keeps_the_code() -> None:
    exc = LocalProtocolError(ErrorCode.GAP, "gap at 5")
    assert error_for(exc) == Error(ErrorCode.GAP, "gap at 5")


def test_frame_epoch_is_the_senders() -> None:
    frame = raw(Keepalive(0, 0), epoch=2**64 - 1)
    reader = FrameReader()
    reader.receive_data(frame)
    decoded = reader.next_frame()
    assert isinstance(decoded, Frame)
    assert decoded.epoch == 2**64 - 1
