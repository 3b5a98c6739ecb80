"""A simulated replication connection for tests: the real session cores
(:class:`PrimarySession`, :class:`ReplicaSession`) over the real sans-IO
:class:`ReplicationConnection` on both ends, joined by two FIFO queues of encoded bytes instead
of a socket. The test decides when bytes move (all, some, or part of a frame), when either side
works, and when the connection is cut (everything in flight is lost). What the asyncio link and
receiver do with each message is mirrored here step by step (see ``replication/link.py`` and
``replication/receiver.py``), without threads or clocks, so every schedule is reproducible.

Also: :class:`FaultReplicaStore`, the engine replica store keeping ``replica.json`` in the
volume's own file system (so a :class:`~blockyard.testing.faultfs.FaultFS` power cycle covers
it), and helpers to create, crash and reopen volumes on a FaultFS.
"""

from __future__ import annotations

import json
import uuid as uuidlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from blockyard.engine import Role, Volume, VolumeStore
from blockyard.errors import BlockyardError, FeedLostError
from blockyard.replication.connection import ReplicationConnection, Side
from blockyard.replication.engine_store import EngineReplicaStore
from blockyard.replication.errors import LocalProtocolError, RemoteProtocolError
from blockyard.replication.messages import (
    Ack,
    Barrier,
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
    Progress,
    Records,
    ReplicaDataState,
    ReplicaHello,
    ReplRecord,
    ResyncDone,
)
from blockyard.replication.primary_session import PrimarySession
from blockyard.replication.replica_session import ReplicaSession
from blockyard.replication.state import REPLICA_STATE_FILE, ReplicaState
from blockyard.testing.faultfs import FaultFS

MIB = 1 << 20
BLOCK = 4096
ROOT = "/data"
PRIMARY_ID = "primary:7000"


# ---- volumes on a FaultFS -------------------------------------------------------------------


def new_fs() -> FaultFS:
    fs = FaultFS()
    fs.mkdir(ROOT)
    return fs


def store_on(fs: FaultFS) -> VolumeStore:
    return VolumeStore(ROOT, fs=fs, background_flusher=False)


def power_cycled(fs: FaultFS) -> FaultFS:
    """A new disk holding exactly what ``fs`` made durable (a power loss)."""
    out = FaultFS()
    out.mkdir(ROOT)
    for path, data in fs.durable_image().items():
        out.mkdir(path.rsplit("/", 1)[0])
        out.restore(path, data)
    return out


def create_primary(
    fs: FaultFS, name: str, size_bytes: int, *, wal_bytes: int, epoch: int = 1
) -> Volume:
    vol = store_on(fs).create(name, size_bytes, wal_size_bytes=wal_bytes)
    vol.set_role(Role.PRIMARY, epoch=epoch)
    return vol


def create_replica(
    fs: FaultFS,
    name: str,
    size_bytes: int,
    volume_uuid: uuidlib.UUID,
    *,
    wal_bytes: int,
    epoch: int = 1,
) -> Volume:
    vol = store_on(fs).create(name, size_bytes, wal_size_bytes=wal_bytes, volume_uuid=volume_uuid)
    vol.set_role(Role.REPLICA, epoch=epoch)
    return vol


class FaultReplicaStore(EngineReplicaStore):
    """:class:`EngineReplicaStore` with ``replica.json`` in the volume's VolumeFS (temp file,
    fdatasync, rename: durable on return, as ``atomic_write`` makes it on a real disk).

    It also watches the epoch rule: :attr:`epoch_violations` lists every record applied with an
    epoch above the volume's."""

    def __init__(self, volume: Volume, fs: FaultFS) -> None:
        super().__init__(volume)
        self.fs = fs
        self.epoch_violations: list[tuple[int, int, int]] = []

    @property
    def _path(self) -> str:
        return f"{self.volume.directory}/{REPLICA_STATE_FILE}"

    def data_state(self) -> ReplicaState:
        if not self.fs.exists(self._path):
            if not self.volume.history.segments:
                return ReplicaState(ReplicaDataState.EMPTY)
            return ReplicaState(ReplicaDataState.CONSISTENT)
        f = self.fs.open(self._path)
        try:
            doc = json.loads(f.pread(f.size(), 0))
        finally:
            f.close()
        return ReplicaState(
            ReplicaDataState[doc["data_state"].upper()],
            doc["resync_id"],
            doc["resync_final_lsn"],
        )

    def save_data_state(self, state: ReplicaState) -> None:
        doc = {
            "version": 1,
            "data_state": state.data_state.name.lower(),
            "resync_id": state.resync_id,
            "resync_final_lsn": state.resync_final_lsn,
        }
        tmp = self._path + ".tmp"
        self.fs.remove(tmp)
        f = self.fs.open(tmp, create=True)
        try:
            f.pwrite(json.dumps(doc).encode(), 0)
            f.fdatasync()
        finally:
            f.close()
        self.fs.rename(tmp, self._path)

    def apply_records(self, records: Sequence[ReplRecord]) -> int:
        last = self.volume.last_lsn
        out = super().apply_records(records)
        self._check_epochs(records, last, out)
        return out

    def try_apply_records(self, records: Sequence[ReplRecord]) -> int | None:
        last = self.volume.last_lsn
        out = super().try_apply_records(records)
        if out is not None:
            self._check_epochs(records, last, out)
        return out

    def _check_epochs(self, records: Sequence[ReplRecord], last: int, out: int) -> None:
        epoch = self.volume.epoch
        for r in records:
            if last < r.lsn <= out and r.epoch > epoch:
                self.epoch_violations.append((r.lsn, r.epoch, epoch))


# ---- the link -------------------------------------------------------------------------------


class LinkOwner(Protocol):
    """What the primary's replication (``VolumeReplication``) hears from a link."""

    def link_up(self, link: Link) -> None: ...
    def link_behind(self, link: Link, reason: str) -> None: ...
    def link_down(self, link: Link) -> None: ...
    def replica_acked(self, link: Link, durable_lsn: int, barrier_id: int) -> None: ...
    def link_caught_up(self, link: Link) -> None: ...


@dataclass
class Recorder:
    """A :class:`LinkOwner` that only records what it heard."""

    events: list[tuple[str, object]] = field(default_factory=list)

    def link_up(self, link: Link) -> None:
        self.events.append(("up", None))

    def link_behind(self, link: Link, reason: str) -> None:
        self.events.append(("behind", reason))

    def link_down(self, link: Link) -> None:
        self.events.append(("down", None))

    def replica_acked(self, link: Link, durable_lsn: int, barrier_id: int) -> None:
        self.events.append(("acked", (durable_lsn, barrier_id)))

    def link_caught_up(self, link: Link) -> None:
        self.events.append(("caught_up", None))

    def names(self) -> list[str]:
        return [e for e, _ in self.events]


@dataclass
class _Attempt:
    """One connection: both protocol objects, both session cores, the bytes in flight."""

    p_conn: ReplicationConnection
    r_conn: ReplicationConnection
    p_session: PrimarySession
    r_session: ReplicaSession
    to_replica: deque[bytes] = field(default_factory=deque)
    to_primary: deque[bytes] = field(default_factory=deque)
    #: Primary side: hello (waiting for ReplicaHello), need_blocks, data.
    phase: str = "hello"
    #: Replica side: a flush is owed (barrier, resync progress, end of resync).
    flush_due: bool = False
    pending_barrier: int = 0


class Link:
    """The primary's link to one replica, over simulated connections.

    ``primary`` and ``replica`` are callables returning the current volume / store (a test
    may reopen them between connections). Errors that end a connection are kept in
    :attr:`errors` as ``(side, exception)`` for the test to judge."""

    def __init__(
        self,
        replica_id: str,
        primary: Callable[[], Volume],
        replica: Callable[[], FaultReplicaStore],
        owner: LinkOwner,
        *,
        on_message: Callable[[str, Message], None] | None = None,
    ) -> None:
        self.replica_id = replica_id
        self._primary = primary
        self._replica = replica
        self._owner = owner
        self._on_message = on_message
        self.attempt: _Attempt | None = None
        self.connections = 0
        #: A barrier for the next pump; like ``ReplicaLink._barrier`` it outlives a connection.
        self.barrier: tuple[int, int] | None = None
        self.errors: list[tuple[str, BaseException]] = []
        self.notified = 0

    # ---- connection lifecycle ------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.attempt is not None

    @property
    def up(self) -> bool:
        return self.attempt is not None and self.attempt.phase == "data"

    def connect(self) -> None:
        """Open a new connection (cutting the current one) and send the Hello."""
        self.cut()
        vol = self._primary()
        store = self._replica()

        def notify() -> None:
            self.notified += 1

        a = _Attempt(
            p_conn=ReplicationConnection(Side.PRIMARY, local_epoch=vol.epoch, volume_uuid=vol.uuid),
            r_conn=ReplicationConnection(
                Side.REPLICA, local_epoch=store.epoch, volume_uuid=vol.uuid
            ),
            p_session=PrimarySession(vol, self.replica_id, primary_id=PRIMARY_ID, notify=notify),
            r_session=ReplicaSession(store),
        )
        self.attempt = a
        self.connections += 1
        self._send_p(a, a.p_session.hello())

    def cut(self) -> None:
        """The connection drops: everything in flight is lost; the primary's link is down."""
        a, self.attempt = self.attempt, None
        if a is None:
            return
        a.p_session.close()
        self._owner.link_down(self)

    def _fail(self, side: str, exc: BaseException) -> None:
        self.errors.append((side, exc))
        self.cut()

    # ---- sending -------------------------------------------------------------------------

    def _send_p(self, a: _Attempt, *messages: Message) -> None:
        for m in messages:
            a.to_replica.append(b"".join(bytes(b) for b in a.p_conn.send(m)))

    def _send_r(self, a: _Attempt, *messages: Message) -> None:
        for m in messages:
            a.to_primary.append(b"".join(bytes(b) for b in a.r_conn.send(m)))

    @property
    def in_flight(self) -> tuple[int, int]:
        a = self.attempt
        if a is None:
            return (0, 0)
        return (sum(map(len, a.to_replica)), sum(map(len, a.to_primary)))

    # ---- the primary's side ------------------------------------------------------------

    def pump(self) -> bool:
        """One turn of the link's pump: a barrier, live records, a resync chunk. Returns
        whether anything was sent."""
        a = self.attempt
        if a is None or a.phase != "data":
            return False
        if self.barrier is not None:
            a.p_session.barrier(*self.barrier)
            self.barrier = None
        try:
            out = a.p_session.outgoing(memory_only=False)
            if out.messages:
                self._send_p(a, *out.messages)
        except (FeedLostError, LocalProtocolError) as exc:
            # The link ends the session (a LocalProtocolError here is our own bug: the test
            # judges it).
            self._fail("primary", exc)
            return False
        return bool(out.messages)

    def deliver_to_primary(self, max_bytes: int | None = None) -> int:
        """Move up to ``max_bytes`` (all when None) from the replica to the primary and act on
        every complete message. Returns the bytes moved."""
        a = self.attempt
        if a is None:
            return 0
        data = _take(a.to_primary, max_bytes)
        if not data:
            return 0
        try:
            a.p_conn.receive_data(data)
            while self.attempt is a:
                event = a.p_conn.next_event()
                if isinstance(event, NeedData):
                    break
                if isinstance(event, ConnectionClosed | Error):
                    self._fail("primary", ConnectionError(f"replica ended it: {event!r}"))
                    break
                self._primary_heard(a, event)
        except RemoteProtocolError as exc:
            self._fail("primary", exc)
        except FeedLostError as exc:
            self._fail("primary", exc)
        return len(data)

    def _primary_heard(self, a: _Attempt, msg: Message) -> None:
        if self._on_message is not None:
            self._on_message("primary", msg)
        s = a.p_session
        if a.phase == "hello":
            if not isinstance(msg, ReplicaHello):
                self._fail("primary", ConnectionError(f"answered the Hello with {msg!r}"))
                return
            plan = s.handshake(msg)
            decision = s.decision
            assert decision is not None
            if s.resync_id:
                self._owner.link_behind(self, f"it needs a {decision.choice.value} resync")
            self._send_p(a, plan)
            if s.awaits_need_blocks:
                a.phase = "need_blocks"
            else:
                self._start(a)
            return
        if a.phase == "need_blocks":
            if isinstance(msg, NeedBlocks):
                if s.need_blocks(msg):
                    self._start(a)
            elif not isinstance(msg, Keepalive):
                self._fail("primary", ConnectionError(f"{msg!r} before the diverged blocks"))
            return
        if isinstance(msg, Keepalive):
            if msg.durable_lsn <= s.acked_lsn:
                return
            # A replica's keepalive carries its durable LSN: an acknowledgement like any.
            msg = Ack(0, msg.durable_lsn, msg.durable_lsn)
        if isinstance(msg, Ack):
            self._owner.replica_acked(self, msg.durable_lsn, msg.barrier_id)
        if isinstance(msg, Ack | Progress):
            heard = s.heard(msg)
            if heard.in_sync:
                self._owner.link_caught_up(self)

    def marked_out_of_sync(self) -> None:
        """The tracker dropped this replica while its session may still be up: the session
        watches for it to catch up again (``ReplicaLink.marked_out_of_sync``)."""
        if self.attempt is not None:
            self.attempt.p_session.rearm()

    def _start(self, a: _Attempt) -> None:
        a.p_session.start()
        a.phase = "data"
        self._owner.link_up(self)

    # ---- the replica's side -------------------------------------------------------------

    def deliver_to_replica(self, max_bytes: int | None = None) -> int:
        """Move up to ``max_bytes`` (all when None) from the primary to the replica and apply
        every complete message, as the receiver does. Returns the bytes moved."""
        a = self.attempt
        if a is None:
            return 0
        data = _take(a.to_replica, max_bytes)
        if not data:
            return 0
        try:
            a.r_conn.receive_data(data)
            while self.attempt is a:
                event = a.r_conn.next_event()
                if isinstance(event, NeedData):
                    break
                if isinstance(event, ConnectionClosed | Error):
                    self._fail("replica", ConnectionError(f"primary ended it: {event!r}"))
                    break
                self._replica_heard(a, event)
        except BlockyardError as exc:
            # The receiver answers with Error and closes: the primary's link ends either way,
            # and the Error is lost with the connection here.
            self._fail("replica", exc)
        return len(data)

    def _replica_heard(self, a: _Attempt, msg: Message) -> None:
        if self._on_message is not None:
            self._on_message("replica", msg)
        s = a.r_session
        if isinstance(msg, Hello):
            reply = s.hello(msg)
            a.r_conn.update_local_epoch(self._replica().epoch)
            self._send_r(a, reply)
        elif isinstance(msg, Plan):
            self._send_r(a, *s.plan(msg))
        elif isinstance(msg, Records):
            s.records(msg)
        elif isinstance(msg, Blocks):
            s.blocks(msg)
            a.flush_due = True
        elif isinstance(msg, ResyncDone):
            s.resync_done(msg)
            a.flush_due = True
        elif isinstance(msg, Barrier):
            a.pending_barrier = max(a.pending_barrier, msg.barrier_id)
            a.flush_due = True

    def replica_flush(self, *, unsolicited: bool = False) -> bool:
        """The receiver's flush: for a barrier, resync progress or the end of a resync (or,
        with ``unsolicited``, the keepalive timer's flush of records applied but not durable).
        Returns whether it ran."""
        a = self.attempt
        if a is None or a.r_conn.plan is None:
            return False
        store = self._replica()
        if not a.flush_due and not (unsolicited and store.last_lsn > store.durable_lsn):
            return False
        barrier_id, a.pending_barrier = a.pending_barrier, 0
        a.flush_due = False
        try:
            result = a.r_session.flush(barrier_id)
        except BlockyardError as exc:
            self._fail("replica", exc)
            return True
        self._send_r(a, *result.messages)
        return True

    # ---- driving -------------------------------------------------------------------------

    def run(self, *, max_turns: int = 10_000) -> None:
        """Work until nothing moves: pump, deliver both ways, flush (when idle, also the
        keepalive timer's flush of records not yet durable). The connection stays open.
        Raises when it does not settle within ``max_turns``."""
        for _ in range(max_turns):
            if self.attempt is None:
                return
            moved = self.deliver_to_replica()
            moved += self.deliver_to_primary()
            moved += int(self.replica_flush())
            moved += int(self.pump())
            if not moved:
                moved = int(self.replica_flush(unsolicited=True))
            if not moved:
                return
        raise AssertionError(f"link to {self.replica_id} did not settle in {max_turns} turns")


def _take(queue: deque[bytes], max_bytes: int | None) -> bytes:
    if max_bytes is None:
        data = b"".join(queue)
        queue.clear()
        return data
    out = bytearray()
    while queue and len(out) < max_bytes:
        head = queue.popleft()
        room = max_bytes - len(out)
        if len(head) > room:
            queue.appendleft(head[room:])
            head = head[:room]
        out += head
    return bytes(out)


# ---- a primary and one replica ----------------------------------------------------------

RID = "replica-1:7500"
WAL = 64 << 10
SIZE = 1 * MIB


@dataclass
class Pair:
    """A primary and a replica volume, each on its own FaultFS, and the link between them."""

    fs_p: FaultFS
    fs_r: FaultFS
    primary: Volume
    replica: Volume
    store: FaultReplicaStore
    owner: Recorder = field(default_factory=Recorder)
    sent: list[tuple[str, Message]] = field(default_factory=list)
    link: Link | None = None

    def __post_init__(self) -> None:
        self.primary.track_replica(RID)
        self.link = Link(
            RID,
            lambda: self.primary,
            lambda: self.store,
            self.owner,
            on_message=lambda side, m: self.sent.append((side, m)),
        )

    @property
    def lk(self) -> Link:
        assert self.link is not None
        return self.link

    def connect(self) -> Link:
        self.sent.clear()
        self.owner.events.clear()
        self.lk.connect()
        return self.lk

    def sync(self) -> Link:
        """Connect and run until idle."""
        lk = self.connect()
        lk.run()
        assert lk.errors == [], lk.errors
        return lk

    def to_replica(self, kind: type) -> list:  # type: ignore[type-arg]
        return [m for side, m in self.sent if side == "replica" and isinstance(m, kind)]

    def to_primary(self, kind: type) -> list:  # type: ignore[type-arg]
        return [m for side, m in self.sent if side == "primary" and isinstance(m, kind)]

    def plan(self) -> Plan:
        (plan,) = self.to_replica(Plan)
        return plan

    def same_bytes(self) -> bool:
        return read_all(self.primary) == read_all(self.replica)

    def restart_primary(self, *, power_loss: bool) -> None:
        """The primary's process dies (page cache kept) or its machine loses power."""
        self.lk.cut()
        if power_loss:
            self.fs_p = power_cycled(self.fs_p)
        self.primary = store_on(self.fs_p).open("v")
        self.primary.track_replica(RID)

    def restart_replica(self, *, power_loss: bool) -> None:
        self.lk.cut()
        if power_loss:
            self.fs_r = power_cycled(self.fs_r)
        self.replica = store_on(self.fs_r).open("v")
        self.store = FaultReplicaStore(self.replica, self.fs_r)


def make_pair(*, size: int = SIZE, wal: int = WAL) -> Pair:
    fs_p, fs_r = new_fs(), new_fs()
    p = create_primary(fs_p, "v", size, wal_bytes=wal)
    r = create_replica(fs_r, "v", size, p.uuid, wal_bytes=wal)
    return Pair(fs_p, fs_r, p, r, FaultReplicaStore(r, fs_r))


def write(vol: Volume, block: int, tag: int) -> int:
    return vol.write(block * 8, block_image(tag, block))


def data_blocks(msgs: list[Blocks]) -> list[int]:
    return [
        b
        for m in msgs
        for run in m.runs
        if not run.flags & BlockRunFlags.HOLE
        for b in range(run.block, run.block + run.block_count)
    ]


def hole_blocks(msgs: list[Blocks]) -> list[int]:
    return [
        b
        for m in msgs
        for run in m.runs
        if run.flags & BlockRunFlags.HOLE
        for b in range(run.block, run.block + run.block_count)
    ]


def record_lsns(msgs: list[Records]) -> list[int]:
    return [r.lsn for m in msgs for r in m.records]


def block_image(tag: int, block: int) -> bytes:
    """A 4 KiB image naming the write (``tag``) and the block it was written to."""
    head = tag.to_bytes(8, "little") + block.to_bytes(8, "little")
    return head + bytes([(tag * 31 + block) % 251 + 1]) * (BLOCK - len(head))


def read_all(vol: Volume) -> bytes:
    return vol.read(0, vol.block_count)
