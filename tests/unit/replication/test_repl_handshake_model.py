"""Model-based test of the connection's state machine: random sequences of messages from
either side, checked against a plain model of the spec's rules. Both connections must agree:
what the sender refuses to send, the receiver refuses to accept."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockyard.replication.connection import ConnectionState, ReplicationConnection, Side
from blockyard.replication.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from blockyard.replication.messages import (
    Ack,
    Barrier,
    BlockRun,
    BlockRunFlags,
    Blocks,
    ConnectionClosed,
    Error,
    Hello,
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
from blockyard.replication.wire import OPEN_LSN, encode_message

VOLUME = uuid.UUID(int=0x30DE1)
EPOCH = 4
RESYNC = 7
HELLO = Hello(1, VOLUME, "v", 1 << 20, "p", RecordId(3, EPOCH, 0), 3, ())
REPLICA_HELLO = ReplicaHello(
    VOLUME, ReplicaDataState.CONSISTENT, 1 << 20, RecordId(1, EPOCH, 0), 1, (), 0, 0
)
CATCH_UP = Plan(PlanKind.CATCH_UP, 2, 0, 0, 0, OPEN_LSN)
DELTA = Plan(PlanKind.DELTA, 2, RESYNC, 10, 0, OPEN_LSN)
FULL = Plan(PlanKind.FULL, 2, RESYNC, 10, 0, OPEN_LSN)
HOLE = (BlockRun(0, 4, BlockRunFlags.HOLE),)

POOL: list[Message] = [
    HELLO,
    REPLICA_HELLO,
    CATCH_UP,
    DELTA,
    Records((ReplRecord(2, EPOCH, 0, RecordKind.ZERO, 0, 1),)),
    Blocks(RESYNC, 4, 2, HOLE),
    Blocks(RESYNC + 1, 4, 2, HOLE),
    ResyncDone(RESYNC, 2),
    ResyncDone(RESYNC + 1, 2),
    Barrier(1, 2),
    Ack(1, 2, 2),
    Ack(0, 2, 2),
    Progress(RESYNC, 4),
    Progress(RESYNC + 1, 4),
    NeedBlocks(False, ()),
    NeedBlocks(True, ()),
    Keepalive(2, 2),
    Keepalive(2, 0),
    Error(ErrorCode.SHUTDOWN, "bye"),
]

PRIMARY_SENDS = (Hello, Plan, Records, Blocks, ResyncDone, Barrier, Keepalive, Error)
REPLICA_SENDS = (ReplicaHello, Ack, Progress, NeedBlocks, Keepalive, Error)


@dataclass
class Model:
    """The spec's rules, written out plainly."""

    step: str = "hello"  # hello -> replica_hello -> plan -> data -> closed
    plan: Plan | None = None
    resync_done: bool = False
    need_blocks_final: bool = False

    def allows(self, sender: Side, m: Message) -> bool:
        if self.step == "closed":
            return False
        if not isinstance(m, PRIMARY_SENDS if sender is Side.PRIMARY else REPLICA_SENDS):
            return False
        if isinstance(m, Error):
            return True
        if self.step == "hello":
            return isinstance(m, Hello)
        if self.step == "replica_hello":
            return isinstance(m, ReplicaHello)
        if self.step == "plan":
            return isinstance(m, Plan)
        assert self.plan is not None
        resync = self.plan.kind in (PlanKind.DELTA, PlanKind.FULL)
        if isinstance(m, Hello | ReplicaHello | Plan):
            return False
        if isinstance(m, Blocks | ResyncDone):
            return resync and m.resync_id == self.plan.resync_id and not self.resync_done
        if isinstance(m, Progress):
            return resync and m.resync_id == self.plan.resync_id
        if isinstance(m, NeedBlocks):
            return resync and not self.need_blocks_final
        if isinstance(m, Keepalive) and sender is Side.REPLICA:
            return m.commit_lsn == 0
        return True

    def apply(self, m: Message) -> None:
        if isinstance(m, Error):
            self.step = "closed"
        elif isinstance(m, Hello):
            self.step = "replica_hello"
        elif isinstance(m, ReplicaHello):
            self.step = "plan"
        elif isinstance(m, Plan):
            self.step, self.plan = "data", m
        elif isinstance(m, ResyncDone):
            self.resync_done = True
        elif isinstance(m, NeedBlocks) and m.final:
            self.need_blocks_final = True


PREFIXES: list[list[tuple[Side, Message]]] = [
    [],
    [(Side.PRIMARY, HELLO)],
    [(Side.PRIMARY, HELLO), (Side.REPLICA, REPLICA_HELLO)],
    *(
        [(Side.PRIMARY, HELLO), (Side.REPLICA, REPLICA_HELLO), (Side.PRIMARY, plan)]
        for plan in (CATCH_UP, DELTA, FULL)
    ),
]


@settings(max_examples=1000)
@given(
    prefix=st.sampled_from(PREFIXES),
    steps=st.lists(
        st.tuples(
            st.sampled_from(Side), st.sampled_from(POOL), st.integers(0, 9).map(lambda n: n == 0)
        ),
        max_size=40,
    ),
)
def test_connection_matches_the_model(
    prefix: list[tuple[Side, Message]], steps: list[tuple[Side, Message, bool]]
) -> None:
    """A refused send leaves both ends as they were, so the run goes on; now and then
    (``force``) the refused message is put on the wire anyway and the receiver must refuse it
    too, which ends the run."""
    conns = {
        Side.PRIMARY: ReplicationConnection(Side.PRIMARY, local_epoch=EPOCH, volume_uuid=VOLUME),
        Side.REPLICA: ReplicationConnection(Side.REPLICA, local_epoch=EPOCH, volume_uuid=VOLUME),
    }
    model = Model()
    for sender, message, force in [(side, m, False) for side, m in prefix] + steps:
        receiver = conns[Side.REPLICA if sender is Side.PRIMARY else Side.PRIMARY]
        if model.allows(sender, message):
            frame = b"".join(bytes(b) for b in conns[sender].send(message))
            receiver.receive_data(frame)
            assert receiver.next_event() == message
            model.apply(message)
            if model.step == "closed":
                assert conns[sender].state is receiver.state is ConnectionState.CLOSED
                assert receiver.next_event() == ConnectionClosed()
                return
            assert receiver.next_event() == NeedData()
            continue
        before = conns[sender].state
        with pytest.raises(LocalProtocolError):
            conns[sender].send(message)
        assert conns[sender].state is before
        if not force:
            continue
        receiver.receive_data(b"".join(bytes(b) for b in encode_message(message, EPOCH)))
        with pytest.raises(RemoteProtocolError):
            receiver.next_event()
        assert receiver.state is ConnectionState.ERROR
        return
