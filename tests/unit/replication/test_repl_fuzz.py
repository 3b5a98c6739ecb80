"""Fuzz: no matter what the peer sends, the replication codec and connection either parse it or
raise RemoteProtocolError, never any other exception, and never buffer more than one maximal
frame plus one read."""

from __future__ import annotations

import random
import uuid

from hypothesis import given, settings
from hypothesis import strategies as st
from repl_strategies import CORPUS, any_message, raw, with_valid_crc

from blockyard.replication.connection import ConnectionState, ReplicationConnection, Side
from blockyard.replication.errors import RemoteProtocolError
from blockyard.replication.messages import (
    ConnectionClosed,
    Hello,
    HistorySegment,
    Message,
    MessageType,
    NeedData,
    Plan,
    PlanKind,
    RecordId,
    ReplicaDataState,
    ReplicaHello,
)
from blockyard.replication.wire import (
    FRAME_HEADER_BYTES,
    MAX_FRAME_BYTES,
    OPEN_LSN,
    FrameReader,
    decode_message,
)

VOLUME = uuid.UUID(int=0xF022)
HELLO = Hello(1, VOLUME, "v", 1 << 20, "p", RecordId(1, 3, 0), 1, (HistorySegment(3, 0, 1, 9),))
REPLICA_HELLO = ReplicaHello(
    VOLUME, ReplicaDataState.RESYNCING, 1 << 20, RecordId(0, 0, 0), 0, (), 4, 0
)
PLAN = Plan(PlanKind.DELTA, 1, 4, 10, 0, OPEN_LSN)


def drain_reader(reader: FrameReader) -> bool:
    """Decode everything buffered; False once the peer broke the protocol."""
    while True:
        try:
            frame = reader.next_frame()
            if isinstance(frame, NeedData | ConnectionClosed):
                return True
            decode_message(frame)
        except RemoteProtocolError:
            return False


def feed_reader(data: bytes, chunk: int) -> None:
    reader = FrameReader()
    for i in range(0, len(data), chunk):
        reader.receive_data(data[i : i + chunk])
        assert reader.buffered_bytes <= MAX_FRAME_BYTES + chunk
        if not drain_reader(reader):
            return


def mutate(rng: random.Random, frame: bytes) -> bytes:
    """Flip bytes, truncate, extend or splice; usually recompute the CRC so that the payload
    parser (not only the CRC check) sees the damage."""
    data = bytearray(frame)
    for _ in range(rng.randint(1, 4)):
        action = rng.randrange(5)
        if action <= 1 and data:
            index = rng.randrange(len(data))
            data[index] = (
                rng.randrange(256) if action == 0 else data[index] ^ (1 << rng.randrange(8))
            )
        elif action == 2 and len(data) > 1:
            del data[rng.randrange(len(data)) :]
        elif action == 3:
            data[rng.randrange(len(data) + 1) : 0] = rng.randbytes(rng.randint(1, 40))
        else:
            # Rewrite a payload count or length field region with extreme values.
            index = rng.randrange(FRAME_HEADER_BYTES, max(FRAME_HEADER_BYTES + 1, len(data)))
            data[index : index + 2] = rng.choice([b"\xff\xff", b"\x00\x00", b"\x10\x01"])
    if len(data) >= FRAME_HEADER_BYTES and rng.random() < 0.8:
        if rng.random() < 0.7:
            # Make the header's length match the damaged payload so the parser sees all of it.
            data[12:16] = (len(data) - FRAME_HEADER_BYTES).to_bytes(4, "big")
        return with_valid_crc(data)
    return bytes(data)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    message = draw(any_message)
    return mutate(random.Random(draw(st.integers(0, 2**32))), raw(message, draw(st.integers(0, 9))))


@settings(max_examples=300)
@given(data=st.binary(max_size=600) | mutated(), chunk=st.integers(1, 700))
def test_reader_only_raises_remote_protocol_errors(data: bytes, chunk: int) -> None:
    feed_reader(data, chunk)


def test_seeded_mutations_of_every_message_type() -> None:
    """A deterministic sweep beyond hypothesis's example budget: 300 mutations of valid frames
    of each message type, fed whole and in small chunks."""
    rng = random.Random(0x8E91)
    parsed = refused = 0
    for message_type in MessageType:
        seeds = [m for m in CORPUS if m.message_type is message_type]
        for i in range(300):
            frame = mutate(rng, raw(seeds[i % len(seeds)], epoch=rng.randrange(4)))
            reader = FrameReader()
            reader.receive_data(frame)
            if drain_reader(reader):
                parsed += 1
            else:
                refused += 1
            feed_reader(frame, rng.randint(1, 64))
    # The fuzzer reaches both outcomes; if it only ever refused, it would test nothing.
    assert parsed > 100
    assert refused > 1000


@settings(max_examples=200)
@given(
    side=st.sampled_from(Side),
    prefix_steps=st.integers(0, 2),
    garbage=st.lists(st.binary(max_size=200) | mutated(), min_size=1, max_size=4),
    chunk=st.integers(1, 300),
)
def test_connection_only_raises_remote_protocol_errors(
    side: Side, prefix_steps: int, garbage: list[bytes], chunk: int
) -> None:
    """A connection at any handshake step, fed garbage: a message, NeedData, ConnectionClosed,
    or RemoteProtocolError (after which it stays in ERROR)."""
    conn = ReplicationConnection(side, local_epoch=3, volume_uuid=VOLUME)
    # Walk the handshake a valid part of the way.
    script: list[tuple[Side, Message]] = [
        (Side.PRIMARY, HELLO),
        (Side.REPLICA, REPLICA_HELLO),
        (Side.PRIMARY, PLAN),
    ]
    for sender, message in script[:prefix_steps]:
        if sender is side:
            conn.send(message)
        else:
            conn.receive_data(raw(message, epoch=3))
            assert conn.next_event() == message
    stream = b"".join(garbage)
    for i in range(0, len(stream), chunk):
        try:
            conn.receive_data(stream[i : i + chunk])
            while not isinstance(conn.next_event(), NeedData | ConnectionClosed):
                pass
        except RemoteProtocolError:
            assert conn.state is ConnectionState.ERROR
            return
        if conn.state is ConnectionState.CLOSED:
            return


def test_header_announcing_four_gib_holds_nothing() -> None:
    """Feeding a 4 GiB announcement and then megabytes more: refused at the header, and the
    reader never holds more than one read's worth."""
    header = bytes.fromhex("4259 01 04 0000000000000001 ffffffff 00000000")
    reader = FrameReader()
    reader.receive_data(header)
    try:
        reader.next_frame()
    except RemoteProtocolError as exc:
        assert exc.code.name == "TOO_LARGE"
    else:
        raise AssertionError("a 4 GiB frame was not refused")
    assert reader.buffered_bytes == 0
