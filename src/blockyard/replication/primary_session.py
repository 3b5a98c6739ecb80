"""The primary's side of one replication connection, without the network (the core that
:mod:`.link` drives over asyncio and the model test drives over a simulated network).

:class:`PrimarySession` builds the Hello, reads the replica's answer and decides the catch-up
plan (:func:`~blockyard.replication.plan.choose_plan`), marks what a full rebuild or a diverged
replica needs in the replica's missed-write bitmap, opens the engine feed, and from then on says
what to send next — a barrier, live records, then one resync chunk within the window of what the
replica has not yet confirmed durable — and what each message from the replica means: durable
progress (which releases WAL and clears bitmap bits) and, once, that the replica is in sync.

It talks to storage only through the engine volume (:class:`PrimaryStore`). Calls that may do
storage I/O say so (``needs_io``); the asyncio driver runs those in the worker pool and the
rest inline. Not thread-safe: one driver at a time.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Protocol

from blockyard.engine import wal
from blockyard.engine.history import History
from blockyard.engine.missed_bitmap import MissedBitmap
from blockyard.engine.volume import WalRecord
from blockyard.errors import EpochMovedError, FeedLostError
from blockyard.replication.messages import (
    Ack,
    Barrier,
    BlockRun,
    BlockRunFlags,
    Blocks,
    Hello,
    Keepalive,
    Message,
    NeedBlocks,
    Plan,
    PlanKind,
    Progress,
    RecordId,
    RecordKind,
    Records,
    ReplicaHello,
    ReplRecord,
    ResyncDone,
)
from blockyard.replication.plan import (
    PlanChoice,
    PlanDecision,
    PrimaryFacts,
    choose_plan,
    segments_to_wire,
)
from blockyard.replication.wire import MAX_RECORDS_PER_BATCH, OPEN_LSN

if TYPE_CHECKING:
    import uuid as uuidlib

    from blockyard.engine.replication_source import Feed

#: Payload bytes per Records frame.
RECORDS_BATCH_BYTES: Final = 1 << 20
#: Blocks read per resync frame (1 MiB).
RESYNC_CHUNK_BLOCKS: Final = 256
#: Resync blocks sent beyond what the replica confirmed durable; bounds what a crash of the
#: replica makes us resend and what either side holds in flight.
RESYNC_WINDOW_BLOCKS: Final = 1 << 16
_PLAN_KIND: Final = {
    PlanChoice.CATCH_UP: PlanKind.CATCH_UP,
    PlanChoice.DELTA: PlanKind.DELTA,
    PlanChoice.FULL: PlanKind.FULL,
}


class PrimaryStore(Protocol):
    """The engine volume as a primary session uses it (:class:`~blockyard.engine.volume.
    Volume` satisfies it)."""

    @property
    def name(self) -> str: ...
    @property
    def uuid(self) -> uuidlib.UUID: ...
    @property
    def size_bytes(self) -> int: ...
    @property
    def epoch(self) -> int: ...
    @property
    def generation(self) -> int: ...
    @property
    def last_lsn(self) -> int: ...
    @property
    def durable_lsn(self) -> int: ...
    @property
    def history(self) -> History: ...

    def oldest_available_lsn(self) -> int: ...
    def acked_lsn(self, replica_id: str) -> int: ...
    def replica_bitmap(self, replica_id: str) -> MissedBitmap: ...
    def mark_missed(self, replica_id: str, blocks: Sequence[tuple[int, int]]) -> None: ...
    def open_feed(self, replica_id: str, after_lsn: int, notify: Callable[[], None]) -> Feed: ...
    def resync_read(self, block: int, count: int) -> list[tuple[int, int, bytes | None]]: ...


@dataclass(slots=True)
class Outgoing:
    """What to send now. ``needs_io``: call again with ``memory_only=False`` off the loop
    (records to read back from the WAL, or a resync chunk to read). ``idle``: nothing to do
    until new records, a barrier or replica progress. ``resync_bytes``: data bytes of the
    resync chunk included (for the bandwidth limit)."""

    messages: list[Message] = field(default_factory=list)
    needs_io: bool = False
    idle: bool = False
    resync_bytes: int = 0


@dataclass(frozen=True, slots=True)
class Heard:
    """What a message from the replica meant."""

    #: The replica's durable LSN (from an Ack), for the commit tracker.
    durable_lsn: int | None = None
    barrier_id: int = 0
    #: The replica just became in sync (report once; the owner persists it).
    in_sync: bool = False
    #: Resync progress moved: there may be more to send.
    progressed: bool = False


class PrimarySession:
    """See the module docstring."""

    def __init__(
        self,
        store: PrimaryStore,
        replica_id: str,
        *,
        primary_id: str,
        notify: Callable[[], None],
    ) -> None:
        self._store = store
        self.replica_id = replica_id
        self._primary_id = primary_id
        self._notify = notify
        self.feed: Feed | None = None
        self.decision: PlanDecision | None = None
        self.resync_id = 0
        self._bitmap: MissedBitmap | None = None
        self._runs: Iterator[tuple[int, int]] | None = None
        self._run_pos: tuple[int, int] | None = None
        # Resync cursors as on the wire: they only grow within a resync, so a later pass
        # (blocks marked again) counts on from where the last one ended (``_pass_base`` is
        # block 0 of the current pass); the replica reports the highest it holds.
        self._pass_base = 0
        self._sent_cursor = 0
        self._confirmed_cursor = 0
        self._pass_done = True
        self._done_lsn: int | None = None
        self._caught_up_lsn: int | None = None
        self._in_sync = False
        self._barrier: tuple[int, int] | None = None
        #: The epoch this session's Hello announced (see :meth:`_check_epoch`).
        self._epoch: int | None = None
        # Reported by the management API.
        self.acked_lsn = 0
        self.resync_total_blocks = 0
        self.resync_done_blocks = 0
        self.resync_bytes = 0

    # ---- handshake ------------------------------------------------------------------------

    def hello(self) -> Hello:
        s = self._store
        self._epoch = s.epoch
        return Hello(
            protocol_version=1,
            volume_uuid=s.uuid,
            volume_name=s.name,
            size_bytes=s.size_bytes,
            primary_id=self._primary_id,
            head=RecordId(max(s.last_lsn, 0), s.epoch, s.generation),
            durable_lsn=max(s.durable_lsn, 0),
            history=segments_to_wire(s.history.segments),
        )

    def handshake(self, reply: ReplicaHello) -> Plan:
        """Decide the plan, mark a full rebuild, open the feed (storage I/O)."""
        s = self._store
        bitmap = s.replica_bitmap(self.replica_id)
        self._bitmap = bitmap
        facts = PrimaryFacts(
            history=tuple(s.history.segments),
            last_lsn=s.last_lsn,
            oldest_available_lsn=s.oldest_available_lsn(),
            acked_lsn=s.acked_lsn(self.replica_id),
            bitmap_dirty=bitmap.set_blocks > 0,
            bitmap_floor_lsn=bitmap.floor_lsn,
        )
        self._check_epoch()
        decision = choose_plan(facts, reply)
        self.decision = decision
        if decision.choice is PlanChoice.FULL:
            s.mark_missed(self.replica_id, [(0, s.size_bytes >> 12)])
        self.feed = s.open_feed(self.replica_id, decision.start_lsn - 1, self._notify)
        resync = decision.choice is not PlanChoice.CATCH_UP
        self.resync_id = secrets.randbits(63) + 1 if resync else 0
        self._pass_done = not resync
        return Plan(
            kind=_PLAN_KIND[decision.choice],
            start_lsn=decision.start_lsn,
            resync_id=self.resync_id,
            total_blocks=bitmap.set_blocks,
            resume_cursor=0,
            diverged_after_lsn=(
                OPEN_LSN if decision.diverged_after is None else decision.diverged_after
            ),
        )

    @property
    def awaits_need_blocks(self) -> bool:
        return self.decision is not None and self.decision.diverged_after is not None

    def need_blocks(self, message: NeedBlocks) -> bool:
        """The replica's diverged blocks join its bitmap (storage I/O). True after the last
        chunk."""
        extents = [(e.block, e.block_count) for e in message.extents]
        self._store.mark_missed(self.replica_id, extents)
        return message.final

    def start(self) -> None:
        """The handshake is over: the resync (if any) covers the bitmap as it is now."""
        bitmap = self._bitmap
        assert bitmap is not None
        if self.resync_id:
            bitmap.begin_pass()
            self._runs = iter(bitmap.runs())
            self.resync_total_blocks = bitmap.set_blocks

    # ---- sending --------------------------------------------------------------------------

    def barrier(self, barrier_id: int, lsn: int) -> None:
        """Send a barrier with the next :meth:`outgoing` (a newer one replaces it)."""
        self._barrier = (barrier_id, lsn)

    def keepalive(self, commit_lsn: int) -> Keepalive:
        return Keepalive(max(self._store.durable_lsn, 0), commit_lsn)

    def outgoing(self, *, memory_only: bool, resync: bool = True) -> Outgoing:
        """What to send next (see :class:`Outgoing`). With ``resync`` False no resync chunk
        is read (the bandwidth limit holds it back; live records and barriers still go).
        Raises :class:`FeedLostError` when the replica fell past the retention bound (end the
        connection; it resyncs next time)."""
        self._check_epoch()
        out = Outgoing()
        if self._barrier is not None:
            barrier_id, lsn = self._barrier
            self._barrier = None
            out.messages.append(Barrier(barrier_id, lsn))
        feed = self.feed
        assert feed is not None
        records = feed.take(RECORDS_BATCH_BYTES, memory_only=memory_only)
        if records:
            out.messages.extend(_batches(records))
            return out
        if memory_only and feed.needs_disk:
            out.needs_io = True
            return out
        if self._caught_up_lsn is None:
            # Everything written so far is on its way: a catching-up replica is in sync once
            # it acknowledges this LSN durably.
            self._caught_up_lsn = self._store.last_lsn
        if resync and self._resync_step(out, memory_only):
            return out
        out.idle = not out.messages
        return out

    @property
    def resync_ready(self) -> bool:
        """A resync chunk could go now but for the bandwidth limit."""
        return (
            bool(self.resync_id)
            and not self._pass_done
            and self._sent_cursor - self._confirmed_cursor < RESYNC_WINDOW_BLOCKS
        )

    def _resync_step(self, out: Outgoing, memory_only: bool) -> bool:
        if not self.resync_id:
            return False
        if self._pass_done:
            if self._done_lsn is None and self._confirmed_cursor >= self._sent_cursor:
                bitmap = self._bitmap
                assert bitmap is not None
                if bitmap.set_blocks:
                    # Blocks marked again during the pass (a live record released by the
                    # retention bound before the replica acknowledged it): another pass sends
                    # them, before ResyncDone, which must be the resync's last word.
                    self._new_pass(bitmap)
                    return self._resync_step(out, memory_only)
                self._done_lsn = self._store.last_lsn
                out.messages.append(ResyncDone(self.resync_id, self._done_lsn))
            return False
        if self._sent_cursor - self._confirmed_cursor >= RESYNC_WINDOW_BLOCKS:
            return False  # the replica's progress opens the window again
        if memory_only:
            out.needs_io = True
            return True
        chunk = self._next_chunk()
        if chunk is None:
            self._pass_done = True
            return self._resync_step(out, memory_only)
        block, count = chunk
        read_lsn = self._store.last_lsn
        runs = self._store.resync_read(block, count)
        # Checked after the read: a write of a newer epoch starts only after the epoch moved,
        # so an unchanged epoch means nothing read here was written under the new one.
        self._check_epoch()
        self._sent_cursor = self._pass_base + block + count
        if runs:
            out.messages.append(
                Blocks(
                    self.resync_id,
                    self._sent_cursor,
                    read_lsn,
                    tuple(
                        BlockRun(b, n, BlockRunFlags.HOLE)
                        if d is None
                        else BlockRun(b, n, BlockRunFlags.DATA, d)
                        for b, n, d in runs
                    ),
                )
            )
        nbytes = sum(len(d) for _b, _n, d in runs if d is not None)
        out.resync_bytes = nbytes
        self.resync_bytes += nbytes
        return True

    def _check_epoch(self) -> None:
        if self._epoch is not None and self._store.epoch != self._epoch:
            raise EpochMovedError(
                f"volume {self._store.name} moved from epoch {self._epoch} to "
                f"{self._store.epoch} during a session with replica {self.replica_id}; a new "
                "session starts from the new epoch"
            )

    def _new_pass(self, bitmap: MissedBitmap) -> None:
        bitmap.begin_pass()
        # What is still owed: blocks kept set by the last pass (marked again while it ran)
        # were counted in the total already and not done, so the total is recomputed, not
        # summed (summing counted them twice and the report never reached its total).
        self.resync_total_blocks = self.resync_done_blocks + bitmap.set_blocks
        self._runs = iter(bitmap.runs())
        self._run_pos = None
        self._pass_base = self._confirmed_cursor = self._sent_cursor
        self._pass_done = False

    def _next_chunk(self) -> tuple[int, int] | None:
        while True:
            if self._run_pos is None:
                assert self._runs is not None
                self._run_pos = next(self._runs, None)
                if self._run_pos is None:
                    return None
            block, count = self._run_pos
            if count <= 0:
                self._run_pos = None
                continue
            n = min(count, RESYNC_CHUNK_BLOCKS)
            self._run_pos = (block + n, count - n)
            return block, n

    # ---- receiving ------------------------------------------------------------------------

    def heard(self, message: Message) -> Heard:
        """Act on a message from the replica (may do storage I/O: bitmap persistence).
        Raises :class:`FeedLostError` when blocks were marked again after the resync ended
        (end the connection; the next one resyncs them)."""
        feed = self.feed
        assert feed is not None
        if isinstance(message, Ack):
            self.acked_lsn = max(self.acked_lsn, message.durable_lsn)
            feed.ack(message.durable_lsn)
            return Heard(
                durable_lsn=message.durable_lsn,
                barrier_id=message.barrier_id,
                in_sync=self._check_in_sync(),
            )
        if isinstance(message, Progress):
            if message.resync_id != self.resync_id or feed.lost or self._bitmap is None:
                return Heard()
            cursor = min(message.cursor, self._sent_cursor)
            if cursor <= self._confirmed_cursor:
                return Heard()
            self.resync_done_blocks += self._bitmap.clear_pass(
                self._confirmed_cursor - self._pass_base, cursor - self._confirmed_cursor
            )
            self._confirmed_cursor = cursor
            self._bitmap.persist()
            return Heard(progressed=True, in_sync=self._check_in_sync())
        return Heard()

    def _check_in_sync(self) -> bool:
        if self._in_sync:
            return False
        acked = self.acked_lsn
        if self.resync_id:
            if self._done_lsn is None or acked < self._done_lsn:
                return False
            bitmap = self._bitmap
            assert bitmap is not None
            if bitmap.set_blocks:
                # Marked again after ResyncDone went (released before acknowledged): no
                # Blocks may follow it on this connection. The next one resyncs them.
                raise FeedLostError(
                    f"blocks of {self._store.name} were marked for replica "
                    f"{self.replica_id} after the resync ended; resyncing on a new connection"
                )
            bitmap.deactivate()
            # The replica holds every record up to ``acked``; every later one is in the WAL
            # or will be marked: the bitmap now vouches for everything.
            bitmap.set_floor(0)
            bitmap.persist()
        elif self._caught_up_lsn is None or acked < self._caught_up_lsn:
            return False
        elif self._bitmap is not None and self._bitmap.floor_lsn:
            self._bitmap.set_floor(0)  # as above
            self._bitmap.persist()
        self._in_sync = True
        return True

    @property
    def in_sync(self) -> bool:
        return self._in_sync

    def rearm(self) -> None:
        """The replica was marked out of sync while connected (a barrier timed out): report
        once more when it has caught up again (it is acknowledged up to the primary's LSN at
        the next idle point)."""
        if self.resync_id and self._done_lsn is None:
            return  # the resync's end reports it
        self._in_sync = False
        self._caught_up_lsn = None

    def close(self) -> None:
        if self.feed is not None:
            self.feed.close()
        if self._bitmap is not None and self.resync_id:
            self._bitmap.end_pass()


def _batches(records: Sequence[WalRecord]) -> list[Message]:
    """Records frames: LSNs consecutive within each (a new history segment may skip)."""
    out: list[Message] = []
    batch: list[ReplRecord] = []
    for rec in records:
        if batch and (rec.lsn != batch[-1].lsn + 1 or len(batch) >= MAX_RECORDS_PER_BATCH):
            out.append(Records(tuple(batch)))
            batch = []
        batch.append(
            ReplRecord(
                lsn=rec.lsn,
                epoch=rec.epoch,
                generation=rec.generation,
                kind=RecordKind.WRITE if rec.kind is wal.Kind.WRITE else RecordKind.ZERO,
                block=rec.block,
                block_count=rec.blocks,
                data=rec.data if rec.data is not None else b"",
            )
        )
    if batch:
        out.append(Records(tuple(batch)))
    return out


__all__ = ["FeedLostError", "Heard", "Outgoing", "PrimarySession", "PrimaryStore"]
