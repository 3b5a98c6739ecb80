"""One replication connection as a sans-IO state machine (the h11 model).

The adapter owns the socket; this object owns the rules::

    conn = ReplicationConnection(Side.PRIMARY, local_epoch=epoch, volume_uuid=uuid)
    transport.writelines(conn.send(Hello(...)))
    while True:
        event = conn.next_event()
        if isinstance(event, NeedData):
            conn.receive_data(await read_some())   # b"" at EOF
            continue
        ...

Handshake (one per connection): the primary sends ``Hello``, the replica answers
``ReplicaHello``, the primary sends ``Plan``; then the data phase. ``Error`` may be sent by
either side at any time and ends the connection.

Epoch fencing (DESIGN invariant 2): every frame carries the sender's epoch. The replica refuses a
``Hello`` below its volume's epoch (STALE_EPOCH); the accepted Hello's epoch becomes the
connection's epoch, and every later frame in either direction must carry exactly that epoch
(lower: STALE_EPOCH; higher: UNEXPECTED, since an epoch change needs a new connection). The
primary's connection epoch is its ``local_epoch``. When a side's own epoch moves past the
connection's (:meth:`ReplicationConnection.update_local_epoch`), the connection is fenced: it
refuses every later frame with STALE_EPOCH and sends nothing but ``Error``. ``Error`` frames are
exempt in both directions: they change nothing but end the connection, and a replica that is
ahead must be able to tell a stale primary so (its ``Error`` carries its newer epoch, readable
as :attr:`ReplicationConnection.peer_epoch`).
"""

from __future__ import annotations

from enum import Enum
from typing import Final
from uuid import UUID

from blockyard.blockdev import BytesLike
from blockyard.errors import EpochRegressionError
from blockyard.replication.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from blockyard.replication.messages import (
    Ack,
    Barrier,
    Blocks,
    ConnectionClosed,
    Error,
    Hello,
    Keepalive,
    Message,
    MessageType,
    NeedBlocks,
    NeedData,
    Plan,
    PlanKind,
    Progress,
    Records,
    ReplicaHello,
    ResyncDone,
)
from blockyard.replication.wire import (
    CONNECTION_CLOSED,
    FrameReader,
    decode_message,
    encode_message,
)

_U64_LIMIT: Final = 2**64


class Side(Enum):
    """Which end of the connection this object is."""

    PRIMARY = "primary"
    REPLICA = "replica"


class ConnectionState(Enum):
    """Where the connection is. The handshake states name the message expected next."""

    #: The primary's ``Hello`` is next.
    HELLO = "hello"
    #: The replica's ``ReplicaHello`` is next.
    REPLICA_HELLO = "replica_hello"
    #: The primary's ``Plan`` is next.
    PLAN = "plan"
    #: Handshake done: records, blocks, barriers, acks, progress, keepalives.
    DATA = "data"
    #: An ``Error`` was sent or received, or the peer closed cleanly; nothing more flows.
    CLOSED = "closed"
    #: The peer broke the protocol (a ``RemoteProtocolError`` was raised).
    ERROR = "error"


_SENT_BY: Final[dict[Side, frozenset[type[Message]]]] = {
    Side.PRIMARY: frozenset({Hello, Plan, Records, Blocks, ResyncDone, Barrier, Keepalive, Error}),
    Side.REPLICA: frozenset({ReplicaHello, Ack, Progress, NeedBlocks, Keepalive, Error}),
}
#: The one message each handshake state accepts (``_apply`` moves to the next state).
_HANDSHAKE: Final[dict[ConnectionState, type[Message]]] = {
    ConnectionState.HELLO: Hello,
    ConnectionState.REPLICA_HELLO: ReplicaHello,
    ConnectionState.PLAN: Plan,
}
_DATA_PHASE: Final[frozenset[type[Message]]] = frozenset(
    {Records, Blocks, ResyncDone, Barrier, Keepalive, Ack, Progress, NeedBlocks}
)
_RESYNC_PLANS: Final = frozenset({PlanKind.DELTA, PlanKind.FULL})

_Refusal = tuple[ErrorCode, str]


class ReplicationConnection:
    """The protocol state of one replication connection, seen from ``side``; does no I/O.

    ``local_epoch`` is this side's epoch for the volume. ``volume_uuid``, when given, is the only
    volume this connection may be for (WRONG_VOLUME otherwise); a replica server that learns
    the volume only from the Hello reads it first with :func:`peek_hello`.

    Contract of the three calls:

    - :meth:`receive_data` buffers bytes (``b""`` = the peer closed). Drain :meth:`next_event`
      until ``NeedData`` before passing more: at most one maximal frame plus one argument is
      ever buffered.
    - :meth:`next_event` returns one parsed, validated message at a time, ``NeedData``, or
      ``ConnectionClosed``. Anything the peer got wrong raises :class:`RemoteProtocolError`;
      the connection is then in state ERROR, every later ``receive_data``/``next_event`` raises
      that error again, and the only thing left to do is ``send(error_for(exc))`` and close.
    - :meth:`send` returns a message's frame as buffers for ``writelines`` (block data passed
      through uncopied: do not change it until written). A message this side may not send now,
      or one that breaks a bound, raises :class:`LocalProtocolError` and changes nothing.

    Not thread-safe: one connection belongs to one task.
    """

    __slots__ = (
        "_epoch",
        "_error",
        "_error_sent",
        "_hello",
        "_local_epoch",
        "_need_blocks_final",
        "_peer_epoch",
        "_plan",
        "_reader",
        "_replica_hello",
        "_resync_done",
        "_side",
        "_state",
        "_volume_uuid",
    )

    def __init__(self, side: Side, *, local_epoch: int, volume_uuid: UUID | None) -> None:
        if not 0 <= local_epoch < _U64_LIMIT:
            raise LocalProtocolError(
                ErrorCode.PROTOCOL, f"local_epoch {local_epoch} does not fit in a u64"
            )
        self._side = side
        self._state = ConnectionState.HELLO
        self._local_epoch = local_epoch
        # The epoch every non-Error frame carries, both ways; a replica learns it from the Hello.
        self._epoch: int | None = local_epoch if side is Side.PRIMARY else None
        self._peer_epoch: int | None = None
        self._volume_uuid = volume_uuid
        self._hello: Hello | None = None
        self._replica_hello: ReplicaHello | None = None
        self._plan: Plan | None = None
        self._resync_done = False
        self._need_blocks_final = False
        self._reader = FrameReader()
        self._error: RemoteProtocolError | None = None
        self._error_sent = False

    # --- read-only state -----------------------------------------------------------------

    @property
    def side(self) -> Side:
        """Which end this object is."""
        return self._side

    @property
    def state(self) -> ConnectionState:
        """The current state."""
        return self._state

    @property
    def local_epoch(self) -> int:
        """This side's epoch for the volume, as last given."""
        return self._local_epoch

    @property
    def epoch(self) -> int | None:
        """The connection's epoch: stamped on every frame sent and required on every frame
        received. None on a replica until the Hello is accepted."""
        return self._epoch

    @property
    def peer_epoch(self) -> int | None:
        """The epoch of the last frame received (including an ``Error``); None before any."""
        return self._peer_epoch

    @property
    def fenced(self) -> bool:
        """True when this side's epoch moved past the connection's: the connection only
        refuses now; close it (after sending ``Error(STALE_EPOCH)``)."""
        return self._epoch is not None and self._local_epoch > self._epoch

    @property
    def volume_uuid(self) -> UUID | None:
        """The volume this connection is for (a replica constructed without one learns it from
        the Hello)."""
        return self._volume_uuid

    @property
    def hello(self) -> Hello | None:
        """The ``Hello`` once sent (primary) or accepted (replica)."""
        return self._hello

    @property
    def replica_hello(self) -> ReplicaHello | None:
        """The ``ReplicaHello`` once sent (replica) or accepted (primary)."""
        return self._replica_hello

    @property
    def plan(self) -> Plan | None:
        """The ``Plan`` once sent (primary) or accepted (replica)."""
        return self._plan

    # --- epoch -----------------------------------------------------------------------------

    def update_local_epoch(self, epoch: int) -> None:
        """Tell the connection this side's epoch moved to ``epoch``.

        A replica calls it after persisting a newer epoch (including the one of the Hello it
        just accepted), a primary when it is given a new epoch. If ``epoch`` is above the
        connection's, the connection is fenced (see :attr:`fenced`). Epochs only move forward:
        a lower value raises :class:`~blockyard.errors.EpochRegressionError`.
        """
        if epoch < self._local_epoch:
            raise EpochRegressionError(
                f"local epoch would move back from {self._local_epoch} to {epoch}; epochs only "
                "move forward"
            )
        if epoch >= _U64_LIMIT:
            raise LocalProtocolError(ErrorCode.PROTOCOL, f"epoch {epoch} does not fit in a u64")
        self._local_epoch = epoch

    # --- receiving -------------------------------------------------------------------------

    def receive_data(self, data: BytesLike) -> None:
        """Buffer bytes from the peer; ``b""`` means the peer closed its side."""
        if self._state is ConnectionState.ERROR:
            assert self._error is not None
            raise self._error
        if self._state is ConnectionState.CLOSED:
            return  # the connection is over; what the peer still sends is not read
        self._reader.receive_data(data)

    def next_event(self) -> Message | NeedData | ConnectionClosed:
        """The next message from the peer, ``NeedData`` or ``ConnectionClosed``.

        Raises :class:`RemoteProtocolError` (and enters state ERROR) for a malformed or
        oversize frame, a bad CRC, a stale or changed epoch, the wrong volume, or a message the
        peer may not send in this state.
        """
        if self._state is ConnectionState.ERROR:
            assert self._error is not None
            raise self._error
        if self._state is ConnectionState.CLOSED:
            return CONNECTION_CLOSED
        try:
            frame = self._reader.next_frame()
            if isinstance(frame, NeedData):
                return frame
            if isinstance(frame, ConnectionClosed):
                self._state = ConnectionState.CLOSED
                return frame
            self._peer_epoch = frame.epoch
            message = decode_message(frame)
        except RemoteProtocolError as exc:
            self._error = exc
            self._state = ConnectionState.ERROR
            raise
        refusal = self._receive_refusal(message, frame.epoch)
        if refusal is not None:
            self._error = RemoteProtocolError(*refusal)
            self._state = ConnectionState.ERROR
            raise self._error
        self._apply(message, frame.epoch)
        return message

    def _receive_refusal(self, message: Message, frame_epoch: int) -> _Refusal | None:
        if isinstance(message, Error):
            return None
        if (
            isinstance(message, Hello)
            and self._state is ConnectionState.HELLO
            and self._volume_uuid is not None
            and message.volume_uuid != self._volume_uuid
        ):
            # Checked before the epoch: another volume's epoch means nothing here.
            return self._wrong_volume(message.volume_uuid, self._volume_uuid)
        if frame_epoch < self._local_epoch:
            return (
                ErrorCode.STALE_EPOCH,
                f"{type(message).__name__} carries epoch {frame_epoch}, below this "
                f"{self._side.value}'s epoch {self._local_epoch} for the volume",
            )
        if self._epoch is not None and frame_epoch != self._epoch:
            if frame_epoch < self._epoch:
                return (
                    ErrorCode.STALE_EPOCH,
                    f"{type(message).__name__} carries epoch {frame_epoch}, below the "
                    f"connection's epoch {self._epoch}",
                )
            return (
                ErrorCode.UNEXPECTED,
                f"{type(message).__name__} carries epoch {frame_epoch}, but this connection "
                f"runs at epoch {self._epoch}; an epoch change needs a new connection",
            )
        peer = Side.REPLICA if self._side is Side.PRIMARY else Side.PRIMARY
        return self._refusal(message, peer)

    # --- sending ---------------------------------------------------------------------------

    def send(self, message: Message) -> list[BytesLike]:
        """Encode ``message`` for the peer and advance the state; returns the frame's buffers.

        Raises :class:`LocalProtocolError` (nothing sent, state unchanged) when this side may
        not send ``message`` now: wrong direction or state, a bound broken, or a fenced
        connection. After an ``Error`` the connection is closed; in state ERROR exactly one
        ``Error`` may still be sent.
        """
        if self._state is ConnectionState.CLOSED:
            raise LocalProtocolError(
                ErrorCode.UNEXPECTED,
                f"cannot send {type(message).__name__}: the connection is closed; open a new one",
            )
        if self._state is ConnectionState.ERROR:
            if isinstance(message, Error) and not self._error_sent:
                buffers = encode_message(message, self._error_epoch())
                self._error_sent = True
                return buffers
            raise LocalProtocolError(
                ErrorCode.UNEXPECTED,
                f"cannot send {type(message).__name__}: the peer broke the protocol; send one "
                "Error and close the connection",
            )
        refusal = self._refusal(message, self._side)
        if refusal is not None:
            raise LocalProtocolError(*refusal)
        if isinstance(message, Error):
            epoch = self._error_epoch()
        else:
            if self.fenced:
                raise LocalProtocolError(
                    ErrorCode.STALE_EPOCH,
                    f"this {self._side.value}'s epoch is now {self._local_epoch} but the "
                    f"connection runs at epoch {self._epoch}: send Error and reconnect",
                )
            # Every non-Error message a replica may send comes after the Hello set the epoch.
            assert self._epoch is not None
            epoch = self._epoch
        buffers = encode_message(message, epoch)
        self._apply(message, epoch)
        return buffers

    def _error_epoch(self) -> int:
        # The newest epoch this side knows: a fenced side tells the peer why.
        return max(self._local_epoch, self._epoch or 0)

    # --- the rules, the same for both directions -------------------------------------------

    def _wrong_volume(self, got: UUID, want: UUID) -> _Refusal:
        return (
            ErrorCode.WRONG_VOLUME,
            f"message is for volume {got}, but this connection is for volume {want}",
        )

    def _refusal(self, message: Message, sender: Side) -> _Refusal | None:
        """Why ``sender`` may not send ``message`` in the current state, or None."""
        name = type(message).__name__
        if type(message) not in _SENT_BY[sender]:
            return ErrorCode.UNEXPECTED, f"{name} is never sent by the {sender.value}"
        if isinstance(message, Error):
            return None
        state = self._state
        expected = _HANDSHAKE.get(state)
        if expected is not None and type(message) is not expected:
            return (
                ErrorCode.UNEXPECTED,
                f"{name} during the handshake; {expected.__name__} is expected next",
            )
        if state is ConnectionState.DATA and type(message) not in _DATA_PHASE:
            return ErrorCode.UNEXPECTED, f"{name} after the handshake is over"
        match message:
            case Hello():
                if self._volume_uuid is not None and message.volume_uuid != self._volume_uuid:
                    return self._wrong_volume(message.volume_uuid, self._volume_uuid)
            case ReplicaHello():
                assert self._hello is not None  # state REPLICA_HELLO follows the Hello
                if message.volume_uuid != self._hello.volume_uuid:
                    return self._wrong_volume(message.volume_uuid, self._hello.volume_uuid)
            case Blocks() | ResyncDone():
                refusal = self._resync_refusal(name, message.resync_id)
                if refusal is None and self._resync_done:
                    refusal = ErrorCode.UNEXPECTED, f"{name} after ResyncDone"
                return refusal
            case Progress():
                return self._resync_refusal(name, message.resync_id)
            case NeedBlocks():
                refusal = self._resync_refusal(name, None)
                if refusal is None and self._need_blocks_final:
                    refusal = ErrorCode.UNEXPECTED, "NeedBlocks after the final NeedBlocks chunk"
                return refusal
            case Keepalive():
                if sender is Side.REPLICA and message.commit_lsn != 0:
                    return (
                        ErrorCode.PROTOCOL,
                        f"replica Keepalive has commit_lsn {message.commit_lsn}; a replica sends 0",
                    )
            case _:
                pass
        return None

    def _resync_refusal(self, name: str, resync_id: int | None) -> _Refusal | None:
        plan = self._plan
        assert plan is not None  # only data-phase messages get here
        if plan.kind not in _RESYNC_PLANS:
            return (
                ErrorCode.UNEXPECTED,
                f"{name} under a {plan.kind.name} plan, which has no resync",
            )
        if resync_id is not None and resync_id != plan.resync_id:
            return (
                ErrorCode.UNEXPECTED,
                f"{name} for resync {resync_id}; this connection's plan runs resync "
                f"{plan.resync_id}",
            )
        return None

    def _apply(self, message: Message, frame_epoch: int) -> None:
        match message:
            case Error():
                self._state = ConnectionState.CLOSED
            case Hello():
                self._hello = message
                if self._side is Side.REPLICA:
                    self._epoch = frame_epoch
                    self._volume_uuid = message.volume_uuid
                self._state = ConnectionState.REPLICA_HELLO
            case ReplicaHello():
                self._replica_hello = message
                self._state = ConnectionState.PLAN
            case Plan():
                self._plan = message
                self._state = ConnectionState.DATA
            case ResyncDone():
                self._resync_done = True
            case NeedBlocks():
                self._need_blocks_final = self._need_blocks_final or message.final
            case _:
                pass


def peek_hello(data: BytesLike) -> Hello | None:
    """The ``Hello`` at the start of ``data``, or None while its frame is incomplete.

    For a replica server that learns which volume a connection is for only from the Hello:
    keep the bytes read so far, peek, look the volume up, then construct the
    :class:`ReplicationConnection` with that volume's epoch and UUID and pass it the same
    bytes, so the fencing rules run on them. Pass at most ``MAX_FRAME_BYTES``. Raises
    :class:`RemoteProtocolError` when the first frame is malformed or is not a Hello.
    """
    reader = FrameReader()
    reader.receive_data(data)
    frame = reader.next_frame()
    if isinstance(frame, NeedData | ConnectionClosed):
        return None
    message = decode_message(frame)
    if isinstance(message, Hello):
        return message
    if isinstance(message, Error):
        raise RemoteProtocolError(
            ErrorCode.UNEXPECTED,
            f"the peer sent Error {message.code.name} before Hello: {message.reason}",
        )
    raise RemoteProtocolError(
        ErrorCode.UNEXPECTED,
        f"the first message is {MessageType(frame.message_type).name}; a connection starts "
        "with Hello",
    )


__all__ = [
    "ConnectionState",
    "ReplicationConnection",
    "Side",
    "peek_hello",
]
