"""The sans-IO replication connection: handshake order on both sides, direction rules, epoch
fencing (DESIGN invariant 2), volume checks, EOF and Error handling."""

from __future__ import annotations

import dataclasses
import uuid

import pytest
from repl_strategies import raw

from blockyard.errors import EpochRegressionError
from blockyard.replication.connection import (
    ConnectionState,
    ReplicationConnection,
    Side,
    peek_hello,
)
from blockyard.replication.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from blockyard.replication.messages import (
    Ack,
    Barrier,
    BlockRun,
    BlockRunFlags,
    Blocks,
    ConnectionClosed,
    Error,
    Event,
    Extent,
    Hello,
    HistorySegment,
    Keepalive,
    Message,
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
from blockyard.replication.wire import OPEN_LSN, FrameReader, encode_message, error_for

VOLUME = uuid.UUID(int=0xB10C)
OTHER = uuid.UUID(int=0xD1FF)
HELLO = Hello(
    1, VOLUME, "vol", 1 << 30, "primary:7000", RecordId(20, 5, 0), 20,
    (HistorySegment(5, 0, 1, OPEN_LSN),),
)  # fmt: skip
REPLICA_HELLO = ReplicaHello(
    VOLUME, ReplicaDataState.CONSISTENT, 1 << 30, RecordId(10, 5, 0), 10,
    (HistorySegment(5, 0, 1, OPEN_LSN),), 0, 0,
)  # fmt: skip
CATCH_UP = Plan(PlanKind.CATCH_UP, 11, 0, 0, 0, OPEN_LSN)
DELTA = Plan(PlanKind.DELTA, 11, 7, 100, 0, OPEN_LSN)
RECORDS = Records((ReplRecord(11, 5, 0, RecordKind.WRITE, 3, 1, b"\x07" * 4096),))
BLOCKS = Blocks(7, 10, 20, (BlockRun(0, 10, BlockRunFlags.HOLE),))


def join(buffers: list[bytes | bytearray | memoryview]) -> bytes:
    return b"".join(bytes(b) for b in buffers)


def events(conn: ReplicationConnection, data: bytes = b"") -> list[Event]:
    """Pass ``data``, then drain ``next_event`` until NeedData or ConnectionClosed."""
    if data:
        conn.receive_data(data)
    out: list[Event] = []
    while True:
        event = conn.next_event()
        out.append(event)
        if isinstance(event, NeedData | ConnectionClosed):
            return out


def transfer(sender: ReplicationConnection, receiver: ReplicationConnection, m: Message) -> Event:
    got = events(receiver, join(sender.send(m)))
    assert got[1:] == [NeedData()] or isinstance(got[0], Error), got
    return got[0]


def pair(
    *, primary_epoch: int = 5, replica_epoch: int = 5, plan: Plan | None = CATCH_UP
) -> tuple[ReplicationConnection, ReplicationConnection]:
    """A primary and a replica connection, through the handshake up to ``plan``."""
    primary = ReplicationConnection(Side.PRIMARY, local_epoch=primary_epoch, volume_uuid=VOLUME)
    replica = ReplicationConnection(Side.REPLICA, local_epoch=replica_epoch, volume_uuid=VOLUME)
    assert transfer(primary, replica, HELLO) == HELLO
    assert transfer(replica, primary, REPLICA_HELLO) == REPLICA_HELLO
    if plan is not None:
        assert transfer(primary, replica, plan) == plan
    return primary, replica


def remote_refusal(conn: ReplicationConnection, message: Message, epoch: int) -> ErrorCode:
    """Feed ``message`` as a frame at ``epoch`` (bypassing the sender's rules)."""
    conn.receive_data(join(encode_message(message, epoch)))
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    assert conn.state is ConnectionState.ERROR
    return info.value.code


def local_refusal(conn: ReplicationConnection, message: Message) -> ErrorCode:
    state = conn.state
    with pytest.raises(LocalProtocolError) as info:
        conn.send(message)
    assert conn.state is state, "a refused send must not change the state"
    return info.value.code


# --- the handshake and the data phase --------------------------------------------------------


def test_full_exchange_both_sides() -> None:
    primary, replica = pair(plan=DELTA)
    assert primary.state is replica.state is ConnectionState.DATA
    assert replica.epoch == primary.epoch == 5
    assert replica.hello == primary.hello == HELLO
    assert replica.replica_hello == primary.replica_hello == REPLICA_HELLO
    assert replica.plan == primary.plan == DELTA
    assert transfer(replica, primary, NeedBlocks(False, (Extent(4, 2),))) == NeedBlocks(
        False, (Extent(4, 2),)
    )
    assert transfer(replica, primary, NeedBlocks(True, ())) == NeedBlocks(True, ())
    assert transfer(primary, replica, BLOCKS) == BLOCKS
    assert transfer(primary, replica, RECORDS) == RECORDS
    assert transfer(replica, primary, Progress(7, 10)) == Progress(7, 10)
    assert transfer(primary, replica, ResyncDone(7, 11)) == ResyncDone(7, 11)
    assert transfer(replica, primary, Progress(7, 100)) == Progress(7, 100)
    assert transfer(primary, replica, Barrier(1, 11)) == Barrier(1, 11)
    assert transfer(replica, primary, Ack(1, 11, 11)) == Ack(1, 11, 11)
    assert transfer(primary, replica, Keepalive(11, 11)) == Keepalive(11, 11)
    assert transfer(replica, primary, Keepalive(11, 0)) == Keepalive(11, 0)
    assert transfer(replica, primary, Ack(0, 11, 11)) == Ack(0, 11, 11)


def test_frames_arrive_in_any_split() -> None:
    primary = ReplicationConnection(Side.PRIMARY, local_epoch=5, volume_uuid=VOLUME)
    replica = ReplicationConnection(Side.REPLICA, local_epoch=5, volume_uuid=None)
    stream = join(primary.send(HELLO))
    got: list[Event] = []
    for i in range(len(stream)):
        got.extend(e for e in events(replica, stream[i : i + 1]) if not isinstance(e, NeedData))
    assert got == [HELLO]
    assert replica.volume_uuid == VOLUME  # learned from the Hello


@pytest.mark.parametrize(
    ("message", "code"),
    [
        (REPLICA_HELLO, ErrorCode.UNEXPECTED),  # never sent by the primary
        (CATCH_UP, ErrorCode.UNEXPECTED),  # before Hello
        (RECORDS, ErrorCode.UNEXPECTED),
        (Keepalive(0, 0), ErrorCode.UNEXPECTED),
        (Ack(0, 0, 0), ErrorCode.UNEXPECTED),
    ],
    ids=lambda v: type(v).__name__ if not isinstance(v, ErrorCode) else v.name,
)
def test_primary_must_start_with_hello(message: Message, code: ErrorCode) -> None:
    primary = ReplicationConnection(Side.PRIMARY, local_epoch=5, volume_uuid=VOLUME)
    assert local_refusal(primary, message) is code
    replica = ReplicationConnection(Side.REPLICA, local_epoch=5, volume_uuid=VOLUME)
    assert remote_refusal(replica, message, epoch=5) is code


def test_handshake_order_is_enforced_on_both_sides() -> None:
    primary = ReplicationConnection(Side.PRIMARY, local_epoch=5, volume_uuid=VOLUME)
    primary.send(HELLO)
    # Waiting for ReplicaHello: the primary may send nothing but Error.
    for message in (HELLO, CATCH_UP, RECORDS, Barrier(1, 1), Keepalive(0, 0)):
        assert local_refusal(primary, message) is ErrorCode.UNEXPECTED
    # The replica, before its ReplicaHello, may not send data-phase messages.
    replica = ReplicationConnection(Side.REPLICA, local_epoch=5, volume_uuid=VOLUME)
    events(
        replica,
        join(ReplicationConnection(Side.PRIMARY, local_epoch=5, volume_uuid=VOLUME).send(HELLO)),
    )
    for message in (Ack(0, 0, 0), Keepalive(0, 0), Progress(7, 0), NeedBlocks(True, ())):
        assert local_refusal(replica, message) is ErrorCode.UNEXPECTED
    # A primary that got ReplicaHello must send Plan before data.
    primary, replica = pair(plan=None)
    for message in (RECORDS, Barrier(1, 1), Keepalive(0, 0), HELLO):
        assert local_refusal(primary, message) is ErrorCode.UNEXPECTED
    assert remote_refusal(replica, RECORDS, epoch=5) is ErrorCode.UNEXPECTED


@pytest.mark.parametrize(
    ("sender", "message"),
    [
        ("primary", HELLO),
        ("primary", CATCH_UP),
        ("primary", Ack(1, 1, 1)),
        ("primary", Progress(7, 1)),
        ("primary", NeedBlocks(True, ())),
        ("replica", REPLICA_HELLO),
        ("replica", RECORDS),
        ("replica", Barrier(1, 1)),
        ("replica", BLOCKS),
        ("replica", ResyncDone(7, 1)),
    ],
    ids=lambda v: v if isinstance(v, str) else type(v).__name__,
)
def test_data_phase_direction_rules(sender: str, message: Message) -> None:
    primary, replica = pair(plan=DELTA)
    conn, peer = (primary, replica) if sender == "primary" else (replica, primary)
    assert local_refusal(conn, message) is ErrorCode.UNEXPECTED
    assert remote_refusal(peer, message, epoch=5) is ErrorCode.UNEXPECTED


def test_resync_messages_follow_the_plan() -> None:
    primary, replica = pair(plan=CATCH_UP)
    for message in (BLOCKS, ResyncDone(7, 1)):
        assert local_refusal(primary, message) is ErrorCode.UNEXPECTED
    for message in (Progress(7, 1), NeedBlocks(True, ())):
        assert local_refusal(replica, message) is ErrorCode.UNEXPECTED
    assert remote_refusal(replica, BLOCKS, epoch=5) is ErrorCode.UNEXPECTED

    primary, replica = pair(plan=DELTA)
    wrong_id = Blocks(8, 0, 0, BLOCKS.runs)
    assert local_refusal(primary, wrong_id) is ErrorCode.UNEXPECTED
    assert local_refusal(replica, Progress(8, 1)) is ErrorCode.UNEXPECTED
    assert local_refusal(primary, ResyncDone(8, 1)) is ErrorCode.UNEXPECTED
    transfer(primary, replica, ResyncDone(7, 30))
    assert local_refusal(primary, BLOCKS) is ErrorCode.UNEXPECTED
    assert local_refusal(primary, ResyncDone(7, 30)) is ErrorCode.UNEXPECTED
    assert remote_refusal(replica, BLOCKS, epoch=5) is ErrorCode.UNEXPECTED

    primary, replica = pair(plan=Plan(PlanKind.FULL, 1, 9, 10, 0, OPEN_LSN))
    transfer(replica, primary, NeedBlocks(True, (Extent(0, 1),)))
    assert local_refusal(replica, NeedBlocks(True, ())) is ErrorCode.UNEXPECTED
    assert remote_refusal(primary, NeedBlocks(False, ()), epoch=5) is ErrorCode.UNEXPECTED


def test_replica_keepalive_carries_no_commit_lsn() -> None:
    primary, replica = pair()
    assert local_refusal(replica, Keepalive(1, 1)) is ErrorCode.PROTOCOL
    assert remote_refusal(primary, Keepalive(1, 1), epoch=5) is ErrorCode.PROTOCOL


# --- epoch fencing ---------------------------------------------------------------------------


def test_replica_refuses_a_hello_below_its_epoch() -> None:
    primary = ReplicationConnection(Side.PRIMARY, local_epoch=4, volume_uuid=VOLUME)
    replica = ReplicationConnection(Side.REPLICA, local_epoch=5, volume_uuid=VOLUME)
    replica.receive_data(join(primary.send(HELLO)))
    with pytest.raises(RemoteProtocolError) as info:
        replica.next_event()
    assert info.value.code is ErrorCode.STALE_EPOCH
    assert replica.state is ConnectionState.ERROR
    with pytest.raises(RemoteProtocolError):
        replica.next_event()
    with pytest.raises(RemoteProtocolError):
        replica.receive_data(b"x")
    # The answer tells the stale primary the newer epoch; the primary reads it whatever epoch
    # it carries, learns it, and the connection is over.
    answer = replica.send(error_for(info.value))
    assert local_refusal(replica, Error(ErrorCode.INTERNAL, "twice")) is ErrorCode.UNEXPECTED
    got = events(primary, join(answer))
    assert got == [Error(ErrorCode.STALE_EPOCH, info.value.reason), ConnectionClosed()]
    assert primary.peer_epoch == 5
    assert primary.state is ConnectionState.CLOSED


def test_hello_at_or_above_the_replica_epoch_sets_the_connection_epoch() -> None:
    primary, replica = pair(primary_epoch=5, replica_epoch=5)
    assert replica.epoch == 5
    primary, replica = pair(primary_epoch=9, replica_epoch=5)
    assert replica.epoch == 9
    assert replica.local_epoch == 5  # the caller persists 9, then says so:
    replica.update_local_epoch(9)
    assert not replica.fenced
    assert transfer(primary, replica, RECORDS) == RECORDS
    assert transfer(replica, primary, Ack(0, 11, 11)) == Ack(0, 11, 11)


def test_every_later_frame_must_carry_the_connection_epoch() -> None:
    primary, replica = pair(primary_epoch=7, replica_epoch=5)
    assert remote_refusal(replica, RECORDS, epoch=6) is ErrorCode.STALE_EPOCH
    primary, replica = pair(primary_epoch=7, replica_epoch=5)
    assert remote_refusal(replica, RECORDS, epoch=8) is ErrorCode.UNEXPECTED
    primary, replica = pair(primary_epoch=7, replica_epoch=5)
    assert remote_refusal(primary, Ack(0, 1, 1), epoch=6) is ErrorCode.STALE_EPOCH
    primary, replica = pair(primary_epoch=7, replica_epoch=5)
    assert remote_refusal(primary, Ack(0, 1, 1), epoch=8) is ErrorCode.UNEXPECTED


def test_primary_applies_the_rule_to_replica_hello() -> None:
    for epoch, code in ((4, ErrorCode.STALE_EPOCH), (6, ErrorCode.UNEXPECTED)):
        primary = ReplicationConnection(Side.PRIMARY, local_epoch=5, volume_uuid=VOLUME)
        primary.send(HELLO)
        assert remote_refusal(primary, REPLICA_HELLO, epoch=epoch) is code


def test_replica_epoch_moving_past_the_connection_fences_it() -> None:
    primary, replica = pair(primary_epoch=5, replica_epoch=5)
    replica.update_local_epoch(6)  # e.g. promoted by the master
    assert replica.fenced
    assert local_refusal(replica, Ack(0, 1, 1)) is ErrorCode.STALE_EPOCH
    assert remote_refusal(replica, RECORDS, epoch=5) is ErrorCode.STALE_EPOCH
    # Its Error carries the newer epoch so the old primary learns it.
    frame = join(replica.send(Error(ErrorCode.STALE_EPOCH, "epoch 6 now")))
    reader = FrameReader()
    reader.receive_data(frame)
    assert reader.next_frame().epoch == 6  # type: ignore[union-attr]
    assert events(primary, frame)[0] == Error(ErrorCode.STALE_EPOCH, "epoch 6 now")
    assert primary.peer_epoch == 6


def test_primary_epoch_moving_fences_its_connection() -> None:
    primary, _ = pair()
    primary.update_local_epoch(6)
    assert local_refusal(primary, RECORDS) is ErrorCode.STALE_EPOCH
    assert remote_refusal(primary, Ack(0, 1, 1), epoch=5) is ErrorCode.STALE_EPOCH


def test_epochs_only_move_forward() -> None:
    conn = ReplicationConnection(Side.REPLICA, local_epoch=5, volume_uuid=VOLUME)
    with pytest.raises(EpochRegressionError):
        conn.update_local_epoch(4)
    conn.update_local_epoch(5)
    assert conn.local_epoch == 5
    # Before the Hello, raising the epoch raises the bar the Hello must clear.
    conn.update_local_epoch(6)
    assert remote_refusal(conn, HELLO, epoch=5) is ErrorCode.STALE_EPOCH


def test_error_frames_are_delivered_from_any_epoch() -> None:
    for epoch in (0, 4, 5, 6, 2**64 - 1):
        primary, _ = pair()
        got = events(primary, join(encode_message(Error(ErrorCode.SHUTDOWN, "bye"), epoch)))
        assert got == [Error(ErrorCode.SHUTDOWN, "bye"), ConnectionClosed()]
        assert primary.peer_epoch == epoch


# --- volume ------------------------------------------------------------------------------


def test_wrong_volume() -> None:
    other_hello = dataclasses.replace(HELLO, volume_uuid=OTHER)
    replica = ReplicationConnection(Side.REPLICA, local_epoch=5, volume_uuid=VOLUME)
    assert remote_refusal(replica, other_hello, epoch=5) is ErrorCode.WRONG_VOLUME
    # The volume is checked before the epoch: another volume's epoch means nothing.
    replica = ReplicationConnection(Side.REPLICA, local_epoch=5, volume_uuid=VOLUME)
    assert remote_refusal(replica, other_hello, epoch=1) is ErrorCode.WRONG_VOLUME
    primary = ReplicationConnection(Side.PRIMARY, local_epoch=5, volume_uuid=VOLUME)
    assert local_refusal(primary, other_hello) is ErrorCode.WRONG_VOLUME

    other_answer = dataclasses.replace(REPLICA_HELLO, volume_uuid=OTHER)
    primary = ReplicationConnection(Side.PRIMARY, local_epoch=5, volume_uuid=None)
    primary.send(HELLO)
    assert remote_refusal(primary, other_answer, epoch=5) is ErrorCode.WRONG_VOLUME
    replica_only = ReplicationConnection(Side.REPLICA, local_epoch=5, volume_uuid=None)
    events(replica_only, raw(HELLO, epoch=5))
    assert local_refusal(replica_only, other_answer) is ErrorCode.WRONG_VOLUME


# --- closing -------------------------------------------------------------------------------


def test_clean_eof() -> None:
    _, replica = pair()
    replica.receive_data(b"")
    assert replica.next_event() == ConnectionClosed()
    assert replica.state is ConnectionState.CLOSED
    assert replica.next_event() == ConnectionClosed()
    assert local_refusal(replica, Ack(0, 0, 0)) is ErrorCode.UNEXPECTED


def test_eof_inside_a_frame_is_a_protocol_error() -> None:
    _, replica = pair()
    replica.receive_data(raw(RECORDS, epoch=5)[:-1])
    assert replica.next_event() == NeedData()
    replica.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as info:
        replica.next_event()
    assert info.value.code is ErrorCode.PROTOCOL


def test_sending_error_closes() -> None:
    primary, replica = pair()
    frame = join(primary.send(Error(ErrorCode.SHUTDOWN, "stopping")))
    assert primary.state is ConnectionState.CLOSED
    assert local_refusal(primary, RECORDS) is ErrorCode.UNEXPECTED
    primary.receive_data(raw(Ack(0, 1, 1), epoch=5))  # ignored: the connection is over
    assert primary.next_event() == ConnectionClosed()
    # Bytes after an Error are not read.
    assert events(replica, frame + b"garbage") == [
        Error(ErrorCode.SHUTDOWN, "stopping"),
        ConnectionClosed(),
    ]


def test_error_may_be_sent_in_every_open_state() -> None:
    for plan in (None, CATCH_UP):
        for conn in pair(plan=plan):
            conn.send(Error(ErrorCode.INTERNAL, "disk failed"))
            assert conn.state is ConnectionState.CLOSED
    fresh = ReplicationConnection(Side.REPLICA, local_epoch=3, volume_uuid=None)
    frame = join(fresh.send(Error(ErrorCode.SHUTDOWN, "")))
    assert frame[4:12] == (3).to_bytes(8, "big")


def test_undrained_connection_refuses_more_data() -> None:
    _, replica = pair()
    big = raw(Records((ReplRecord(11, 5, 0, RecordKind.WRITE, 0, 256, bytes(1 << 20)),)), 5)
    for _ in range(5):
        replica.receive_data(big)
    with pytest.raises(LocalProtocolError):
        replica.receive_data(big)


# --- peek_hello ----------------------------------------------------------------------------


def test_peek_hello_then_construct_with_the_volume_epoch() -> None:
    stream = raw(HELLO, epoch=5) + raw(CATCH_UP, epoch=5)
    assert peek_hello(stream[:30]) is None
    hello = peek_hello(stream)
    assert hello == HELLO
    # The server looks the volume up (epoch 6 now) and the connection fences the Hello.
    replica = ReplicationConnection(Side.REPLICA, local_epoch=6, volume_uuid=hello.volume_uuid)
    replica.receive_data(stream)
    with pytest.raises(RemoteProtocolError) as info:
        replica.next_event()
    assert info.value.code is ErrorCode.STALE_EPOCH


def test_peek_hello_refuses_other_first_messages() -> None:
    for message in (RECORDS, Error(ErrorCode.SHUTDOWN, "bye")):
        with pytest.raises(RemoteProtocolError) as info:
            peek_hello(raw(message))
        assert info.value.code is ErrorCode.UNEXPECTED
    with pytest.raises(RemoteProtocolError) as info:
        peek_hello(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert info.value.code is ErrorCode.PROTOCOL
