"""What a replica does with each message of a replication connection.

:class:`ReplicaSession` holds the replica's side of one connection: it answers the Hello, acts
on the Plan (reports its diverged blocks, starts a new log when the stream does not continue its
own, persists that a resync is under way *before* the first resync byte lands), applies records
and resync blocks in stream order, and says when a barrier or a resync is durably done. It talks
to storage only through :class:`ReplicaStore` (the engine adapter, or an in-memory model in the
protocol's model test) and never blocks on the network: the asyncio receiver calls it from a
worker thread, one message at a time in stream order; only :meth:`flush` may run beside the
appliers (it takes the session lock just to read and write bookkeeping).

**Live writes win over older backfill.** During a resync every block a live record touches is
remembered; a resync block for a remembered block is dropped (the record carries a newer image,
applied or about to be). Records always carry whole 4 KiB blocks, so one record fully decides a
block.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from blockyard.blockdev import BytesLike
from blockyard.engine.history import History, Segment
from blockyard.errors import InvalidArgumentError
from blockyard.replication.errors import ErrorCode, LocalProtocolError
from blockyard.replication.messages import (
    NO_RECORD,
    Ack,
    BlockRunFlags,
    Blocks,
    Extent,
    Hello,
    Message,
    NeedBlocks,
    Plan,
    PlanKind,
    Progress,
    RecordId,
    Records,
    ReplicaDataState,
    ReplicaHello,
    ReplRecord,
    ResyncDone,
)
from blockyard.replication.plan import segments_from_wire, segments_to_wire
from blockyard.replication.state import ReplicaState
from blockyard.replication.wire import MAX_NEED_BLOCKS_EXTENTS, OPEN_LSN


class ReplicaStore(Protocol):
    """The replica copy as the session sees it. Every mutating call is durable when the
    contract says (records and blocks after :meth:`flush`, state and log resets on return)."""

    @property
    def volume_uuid_bytes(self) -> bytes: ...
    @property
    def size_bytes(self) -> int: ...
    @property
    def block_count(self) -> int: ...
    @property
    def epoch(self) -> int: ...
    @property
    def last_lsn(self) -> int: ...
    @property
    def durable_lsn(self) -> int: ...

    def history(self) -> tuple[Segment, ...]: ...
    def data_state(self) -> ReplicaState: ...
    def save_data_state(self, state: ReplicaState) -> None: ...
    def grow(self, size_bytes: int) -> None: ...
    def apply_records(self, records: Sequence[ReplRecord]) -> int: ...
    def try_apply_records(self, records: Sequence[ReplRecord]) -> int | None: ...
    def apply_backfill(self, runs: Sequence[tuple[int, int, BytesLike | None]]) -> None: ...
    def flush(self) -> int: ...
    def reset_log(self, next_lsn: int, history: History) -> None: ...
    def divergent_extents(self, after_lsn: int) -> list[tuple[int, int]] | None: ...


@dataclass(frozen=True, slots=True)
class FlushResult:
    """What a flush made durable, and the messages that report it."""

    durable_lsn: int
    messages: tuple[Message, ...]


class ReplicaSession:
    """The replica's side of one connection (see the module docstring)."""

    def __init__(self, store: ReplicaStore) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._hello: Hello | None = None
        self._plan: Plan | None = None
        #: Blocks touched by live records since the resync began (1 bit per 4 KiB block).
        self._touched: bytearray | None = None
        #: Resync position applied (not yet durable) and reported durable.
        self._applied_cursor = 0
        self._reported_cursor = 0
        self._resync_done_lsn: int | None = None
        self._blocks_since_progress = 0

    # ---- handshake ------------------------------------------------------------------------

    def hello(self, hello: Hello) -> ReplicaHello:
        store = self._store
        if hello.size_bytes < store.size_bytes:
            raise LocalProtocolError(
                ErrorCode.SIZE_MISMATCH,
                f"the primary's volume has {hello.size_bytes} bytes, fewer than this "
                f"replica's {store.size_bytes}; the replica must be recreated",
            )
        if hello.size_bytes > store.size_bytes:
            store.grow(hello.size_bytes)
        if hello.protocol_version < 1:
            raise LocalProtocolError(ErrorCode.UNSUPPORTED_VERSION, "protocol version 0")
        newest = max([s.epoch for s in hello.history] + [hello.head.epoch], default=0)
        if newest > store.epoch:
            # Epochs are assigned (by the master, or `volume replicate`) to the replica before
            # the primary: a primary claiming a newer one than we were told is not trusted.
            raise LocalProtocolError(
                ErrorCode.UNEXPECTED,
                f"this replica is at epoch {store.epoch} but the primary writes at epoch "
                f"{newest}; assign the new epoch to the replica first (SetReplication)",
            )
        self._hello = hello
        state = store.data_state()
        history = store.history()
        last = self._last_record(history)
        return ReplicaHello(
            volume_uuid=hello.volume_uuid,
            state=state.data_state,
            size_bytes=store.size_bytes,
            last=last,
            durable_lsn=store.durable_lsn,
            history=segments_to_wire(history),
            resync_id=state.resync_id if state.data_state is ReplicaDataState.RESYNCING else 0,
            resync_cursor=0,
        )

    def _last_record(self, history: Sequence[Segment]) -> RecordId:
        last_lsn = self._store.last_lsn
        for seg in reversed(history):
            if seg.first_lsn <= last_lsn <= seg.last_lsn:
                return RecordId(last_lsn, seg.epoch, seg.generation)
        if last_lsn <= 0:
            return NO_RECORD
        # Records written before this volume kept a history: no segment to name.
        return RecordId(last_lsn, 0, 0)

    def plan(self, plan: Plan) -> list[Message]:
        """Act on the primary's plan. Returns what to send back (NeedBlocks chunks)."""
        store = self._store
        hello = self._hello
        if hello is None:
            raise LocalProtocolError(ErrorCode.UNEXPECTED, "a Plan before the Hello")
        resync = plan.kind in (PlanKind.DELTA, PlanKind.FULL)
        out: list[Message] = []
        if resync:
            # Before any resync byte lands: this copy is not consistent until it finishes.
            store.save_data_state(ReplicaState(ReplicaDataState.RESYNCING, plan.resync_id, 0))
        diverged = plan.diverged_after_lsn != OPEN_LSN
        if diverged:
            extents = store.divergent_extents(plan.diverged_after_lsn)
            if extents is None:
                extents = [(0, store.block_count)]
            out.extend(_need_blocks(extents))
        if diverged or plan.kind is PlanKind.FULL or plan.start_lsn != store.last_lsn + 1:
            # The stream does not continue our records (we diverged — even when its first LSN
            # happens to follow our last, which belongs to a lost history —, the primary no
            # longer holds what follows them, or we share no history at all): start a new log
            # where the stream starts, under the primary's history.
            store.reset_log(plan.start_lsn, History(segments_from_wire(hello.history)))
        with self._lock:
            self._plan = plan
            self._touched = bytearray((store.block_count + 7) // 8) if resync else None
            self._applied_cursor = plan.resume_cursor
            self._reported_cursor = plan.resume_cursor
            self._resync_done_lsn = None
        return out

    # ---- data phase -----------------------------------------------------------------------

    def records(self, message: Records) -> int:
        """Apply records in order; returns the last LSN held."""
        self._touch(message)
        return self._store.apply_records(message.records)

    def try_records(self, message: Records) -> int | None:
        """:meth:`records` if the store can apply them without waiting (on the receiver's
        loop), else None with nothing applied (marking blocks touched early is harmless: the
        resync only skips more of what the records bring anyway)."""
        self._touch(message)
        return self._store.try_apply_records(message.records)

    def _touch(self, message: Records) -> None:
        touched = self._touched
        if touched is not None:
            for rec in message.records:
                _set_bits(touched, rec.block, min(rec.block + rec.block_count, len(touched) * 8))

    def blocks(self, message: Blocks) -> None:
        """Apply resync blocks no live record has touched since the resync began."""
        plan = self._plan
        touched = self._touched
        if plan is None or touched is None or message.resync_id != plan.resync_id:
            raise LocalProtocolError(ErrorCode.UNEXPECTED, "resync blocks outside a resync")
        runs: list[tuple[int, int, BytesLike | None]] = []
        for run in message.runs:
            hole = bool(run.flags & BlockRunFlags.HOLE)
            start = run.block
            end = run.block + run.block_count
            if end > self._store.block_count:
                raise InvalidArgumentError(
                    f"resync run [{start}, {end}) is past the volume's "
                    f"{self._store.block_count} blocks"
                )
            # Split the run around touched blocks.
            b = start
            while b < end:
                if touched[b >> 3] & (1 << (b & 7)):
                    b += 1
                    continue
                first = b
                while b < end and not touched[b >> 3] & (1 << (b & 7)):
                    b += 1
                if hole:
                    runs.append((first, b - first, None))
                else:
                    off = (first - start) * 4096
                    data = memoryview(run.data)[off : off + (b - first) * 4096]
                    runs.append((first, b - first, data))
        if runs:
            self._store.apply_backfill(runs)
        with self._lock:
            self._applied_cursor = max(self._applied_cursor, message.cursor)
            self._blocks_since_progress += sum(r.block_count for r in message.runs)

    def resync_done(self, message: ResyncDone) -> None:
        plan = self._plan
        if plan is None or message.resync_id != plan.resync_id:
            raise LocalProtocolError(ErrorCode.UNEXPECTED, "ResyncDone outside a resync")
        self._store.save_data_state(
            ReplicaState(ReplicaDataState.RESYNCING, plan.resync_id, message.final_lsn)
        )
        with self._lock:
            self._resync_done_lsn = message.final_lsn

    @property
    def progress_due_blocks(self) -> int:
        """Resync blocks applied since the last Progress (the receiver flushes past a bound)."""
        return self._blocks_since_progress

    def flush(self, barrier_id: int = 0) -> FlushResult:
        """Make everything applied so far durable, then report it: an Ack (for a barrier, or
        unsolicited), Progress for resync blocks now durable, and the end of a resync once the
        final LSN is durable. Safe to run beside :meth:`records` and :meth:`blocks`."""
        with self._lock:
            cursor = self._applied_cursor
            done_lsn = self._resync_done_lsn
            self._blocks_since_progress = 0
        applied = self._store.last_lsn
        durable = self._store.flush()
        out: list[Message] = []
        plan = self._plan
        with self._lock:
            if plan is not None and plan.resync_id and cursor > self._reported_cursor:
                self._reported_cursor = cursor
                out.append(Progress(plan.resync_id, cursor))
        if done_lsn is not None and durable >= done_lsn:
            state = self._store.data_state()
            if state.data_state is ReplicaDataState.RESYNCING:
                self._store.save_data_state(ReplicaState(ReplicaDataState.CONSISTENT, 0, 0))
            with self._lock:
                self._touched = None
        out.append(Ack(barrier_id, durable, max(applied, durable)))
        return FlushResult(durable, tuple(out))


def _set_bits(bits: bytearray, first: int, end: int) -> None:
    """Set bits [first, end): whole bytes at once (a range unmap may cover the volume)."""
    b = first
    while b < end and b & 7:
        bits[b >> 3] |= 1 << (b & 7)
        b += 1
    whole = (end - b) >> 3
    if whole:
        i = b >> 3
        bits[i : i + whole] = b"\xff" * whole
        b += whole << 3
    while b < end:
        bits[b >> 3] |= 1 << (b & 7)
        b += 1


def _need_blocks(extents: Sequence[tuple[int, int]]) -> list[Message]:
    chunks: list[Message] = []
    items = [Extent(b, c) for b, c in extents if c > 0]
    for i in range(0, max(len(items), 1), MAX_NEED_BLOCKS_EXTENTS):
        part = tuple(items[i : i + MAX_NEED_BLOCKS_EXTENTS])
        chunks.append(NeedBlocks(final=i + MAX_NEED_BLOCKS_EXTENTS >= len(items), extents=part))
    return chunks
