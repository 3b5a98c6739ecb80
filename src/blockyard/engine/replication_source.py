"""The primary's side of replication in the engine: feeds, WAL retention and missed-write
bitmaps (a mixin of :class:`~blockyard.engine.volume.Volume`).

A **feed** hands one replica every record after an LSN, in LSN order, in batches of at most a
byte budget. It is push-style: :meth:`Feed.take` never blocks; when it finds nothing new it arms
the feed's ``notify`` callback, which the next write calls once (from the writer's thread, under
the volume lock: it must only schedule work, e.g. ``loop.call_soon_threadsafe``).

**Retention.** The flusher applies records to the data region as always, but their WAL space is
released only when every tracked replica is *covered* up to them: it acknowledged them as
durable, or they are recorded in its missed-write bitmap. So a replica that drops for a moment
catches up from the WAL. The wait is bounded per volume: at most
:data:`~blockyard.engine.limits.RETENTION_MAX_FRACTION` of the WAL and
:data:`~blockyard.engine.limits.RETENTION_MAX_S` seconds. Past either bound the flusher marks
the blocks of the oldest records in the bitmap of every replica not covered for them, persists
the bitmaps, and only then releases the space (a lagging replica never stalls the writers);
a feed that had not shipped those records yet is *lost* and its replica must resync from the
bitmap.

**Invariant** (what makes catch-up decisions sound): for every tracked replica, each record after
its covered LSN is either still in the WAL (retained or pending) or its blocks are set in the
replica's bitmap. After a restart the WAL region is scanned: records still physically present
from the last covered point on are retained again (payloads read back and checksummed on
demand), so the invariant survives crashes of the primary.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from blockyard.engine import wal
from blockyard.engine.fileio import IoFile, VolumeFS
from blockyard.engine.limits import (
    BLOCK_SIZE,
    RETENTION_MAX_FRACTION,
    RETENTION_MAX_S,
    SECTORS_PER_BLOCK,
)
from blockyard.engine.missed_bitmap import BITMAP_PREFIX, BITMAP_SUFFIX, MissedBitmap
from blockyard.errors import FeedLostError, VolumeClosedError, WalTruncatedError

if TYPE_CHECKING:
    import uuid as uuidlib

    from blockyard.engine import superblock as sbmod
    from blockyard.engine.volume import WalRecord

log = logging.getLogger(__name__)

#: A log entry (see ``Volume._log``): lsn, kind, block, block_count, payload (None once only
#: on disk, or for ZERO records), epoch, consumed WAL bytes, generation, WAL position.
_LogEntry = tuple[int, wal.Kind, int, int, memoryview | None, int, int, int, int]
_LSN: Final = 0
_KIND: Final = 1
_BLOCK: Final = 2
_COUNT: Final = 3
_PAYLOAD: Final = 4
_EPOCH: Final = 5
_CONSUMED: Final = 6
_GEN: Final = 7
_POS: Final = 8


@dataclass(frozen=True, slots=True)
class WalUsage:
    """How a primary's WAL is used (:meth:`ReplicationSource.wal_usage`)."""

    #: WAL bytes holding records, applied or not.
    used_bytes: int
    #: Of those, records already applied to the data region and kept only because a tracked
    #: replica is not covered for them yet (what catch-up can still ship from the WAL).
    retained_bytes: int
    #: For each LSN asked about, the WAL bytes of the records after it still in the WAL.
    bytes_after: tuple[int, ...]


@dataclass(slots=True)
class _Tracker:
    """What the primary knows about one replica of the volume."""

    bitmap: MissedBitmap
    #: Every record up to here is durable on the replica or marked in its bitmap.
    covered_lsn: int
    feed: Feed | None = None
    #: The highest LSN the replica acknowledged as durable (0: none since this process
    #: started). Every record after it is in the WAL or in the bitmap.
    acked_lsn: int = 0


class Feed:
    """One replica's stream of records. Thread-safe; every method is quick."""

    def __init__(
        self, source: ReplicationSource, replica_id: str, next_lsn: int, notify: Callable[[], None]
    ) -> None:
        self._source = source
        self.replica_id = replica_id
        #: The next LSN to hand out.
        self.cursor = next_lsn
        self._notify = notify
        self.lost = False
        self.closed = False
        self._needs_disk = False

    def take(self, max_bytes: int, *, memory_only: bool = False) -> list[WalRecord]:
        """The next records (at least one if any is available, then up to ``max_bytes`` of
        payload), never blocking on other writers for long. Empty: nothing new yet, and the
        notify callback is armed. Raises :class:`FeedLostError` once the records this feed
        needs were released (the replica must resync from its bitmap).

        With ``memory_only`` it never waits: it stops before a record whose payload must be
        read back from the WAL (kept across a restart), and takes nothing while a writer holds
        the volume lock (a writer may hold it across a slow WAL write, or a large unmap across
        a checkpoint's fdatasync): safe to call on an event loop. :attr:`needs_disk` then says
        whether it stopped for either reason."""
        return self._source._feed_take(self, max_bytes, memory_only)

    @property
    def needs_disk(self) -> bool:
        """A ``memory_only`` take stopped short: the next record must be read back from the
        WAL, or the volume lock was busy (use :meth:`take` off the loop)."""
        return self._needs_disk

    def ack(self, durable_lsn: int) -> None:
        """The replica holds every record up to ``durable_lsn`` durably: their WAL space may be
        released (as far as this replica is concerned)."""
        self._source._feed_ack(self, durable_lsn)

    def close(self) -> None:
        self._source._feed_close(self)


class ReplicationSource:
    """Feeds, retention and missed-write bitmaps; uses the volume's state (declared below)."""

    if TYPE_CHECKING:
        _lock: threading.RLock
        _space_cv: threading.Condition
        _log: deque[_LogEntry]
        _n_applied: int
        _used: int
        _wal_size: int
        _wal_offset: int
        _seed: int
        _block_limit: int
        _next_lsn: int
        _last_lsn: int
        _name: str
        _dir: str
        _fs: VolumeFS
        _file: IoFile
        _sb: sbmod.Superblock
        _closed: bool

        _dmap: dict[int, tuple[int, memoryview | None]]

        @property
        def uuid(self) -> uuidlib.UUID: ...

        def read(self, lba: int, block_count: int) -> bytes: ...
        def _data_extents(self, first: int, end: int) -> list[tuple[int, int]]: ...

    def _init_replication_source(self) -> None:
        self._trackers: dict[str, _Tracker] = {}
        self._feeds_waiting: list[Feed] = []
        #: (first LSN of a checkpoint batch, when it was applied), oldest first: ages for the
        #: retention time bound.
        self._retained_since: deque[tuple[int, float]] = deque()
        self._retention_max_bytes = int(self._wal_size * RETENTION_MAX_FRACTION)
        self._clock: Callable[[], float] = time.monotonic

    # ---- replicas -------------------------------------------------------------------------

    def track_replica(self, replica_id: str) -> MissedBitmap:
        """Start (or resume, after a restart) keeping what ``replica_id`` misses. Loads its
        bitmap file or creates it. Idempotent; durable on return."""
        with self._lock:
            tracker = self._trackers.get(replica_id)
            if tracker is not None:
                return tracker.bitmap
        bitmap = MissedBitmap.open(
            self._fs,
            self._dir,
            volume=self._name,
            volume_uuid=self.uuid,
            replica_id=replica_id,
            block_count=self._block_limit,
        )
        with self._lock:
            existing = self._trackers.get(replica_id)
            if existing is not None:
                bitmap.close()
                return existing.bitmap
            # Records still in the WAL are kept for the replica; anything older is on it
            # already, in its bitmap, or at or below the bitmap's floor.
            oldest = self._log[0][_LSN] if self._log else self._next_lsn
            self._trackers[replica_id] = _Tracker(bitmap, oldest - 1)
        if bitmap.created:
            # A new bitmap knows nothing of what was released before now.
            bitmap.set_floor(oldest - 1)
            bitmap.persist()
        return bitmap

    def untrack_replica(self, replica_id: str, *, delete: bool = True) -> None:
        """Forget a replica (it left the replica set): its feed is lost, its bitmap closed and,
        with ``delete``, removed."""
        with self._lock:
            tracker = self._trackers.pop(replica_id, None)
            if tracker is None:
                return
            if tracker.feed is not None:
                tracker.feed.lost = True
            self._release_covered_locked()
            self._space_cv.notify_all()
        path = tracker.bitmap.path
        tracker.bitmap.close()
        if delete:
            self._fs.remove(path)

    def untrack_all_replicas(self) -> None:
        """Stop keeping WAL for any replica: a copy that is no longer primary ships to nobody,
        and records held for its former replicas would pin up to half its WAL while it applies
        a new primary's stream. Their bitmaps go too: what this copy releases as a replica is
        marked nowhere, so a bitmap kept would claim to know what a replica missed when it
        does not. A later term as primary starts new ones, whose floor says so."""
        for replica_id in self.tracked_replicas():
            self.untrack_replica(replica_id)

    def replica_bitmap(self, replica_id: str) -> MissedBitmap:
        with self._lock:
            tracker = self._trackers.get(replica_id)
        if tracker is None:
            raise KeyError(f"volume {self._name!r} does not track replica {replica_id!r}")
        return tracker.bitmap

    def tracked_replicas(self) -> list[str]:
        with self._lock:
            return sorted(self._trackers)

    def oldest_available_lsn(self) -> int:
        """The oldest LSN a feed can still start from (``last_lsn + 1`` when none is held)."""
        with self._lock:
            return self._log[0][_LSN] if self._log else self._next_lsn

    def covered_lsn(self, replica_id: str) -> int:
        with self._lock:
            return self._trackers[replica_id].covered_lsn

    def acked_lsn(self, replica_id: str) -> int:
        """The highest LSN the replica acknowledged durable since this volume was opened."""
        with self._lock:
            return self._trackers[replica_id].acked_lsn

    def wal_usage(self, after_lsns: Sequence[int] = ()) -> WalUsage:
        """WAL accounting for metrics, from memory only (no I/O): see :class:`WalUsage`.
        Holds the volume lock only to copy the log's index; the sums are made after."""
        with self._lock:
            entries = list(self._log)
            n_applied = self._n_applied
            used = self._used
        lsns = [e[_LSN] for e in entries]
        prefix = [0, *itertools.accumulate(e[_CONSUMED] for e in entries)]
        return WalUsage(
            used_bytes=used,
            retained_bytes=prefix[n_applied],
            bytes_after=tuple(
                prefix[-1] - prefix[bisect.bisect_right(lsns, x)] for x in after_lsns
            ),
        )

    def mark_missed(self, replica_id: str, blocks: Sequence[tuple[int, int]]) -> None:
        """Add block runs a replica must get back (e.g. what its divergent records touched, or
        everything for a full rebuild); durable on return."""
        bitmap = self.replica_bitmap(replica_id)
        with self._lock:
            bitmap.activate(self._trackers[replica_id].covered_lsn)
            for block, count in blocks:
                bitmap.mark(block, count)
        bitmap.persist()

    def resync_read(self, block: int, count: int) -> list[tuple[int, int, bytes | None]]:
        """The current image of blocks ``[block, block+count)`` for a resync: runs of data and
        holes (``None``), in order. Holes are found without reading them (the data region is
        sparse: SEEK_DATA/SEEK_HOLE), so a sparse volume resyncs in time proportional to its
        data; a block that reads as zeros is sent as a hole too. Consistent per block (each
        block is one image at one moment); the caller streams newer writes live."""
        end = min(block + count, self._block_limit)
        if block >= end:
            return []
        with self._lock:
            dirty = {b for b in range(block, end) if b in self._dmap}
        allocated = set(dirty)
        for first, n in self._data_extents(block, end):
            allocated.update(range(max(first, block), min(first + n, end)))
        out: list[tuple[int, int, bytes | None]] = []
        b = block
        zero = bytes(BLOCK_SIZE)
        while b < end:
            if b not in allocated:
                first = b
                while b < end and b not in allocated:
                    b += 1
                _append_run(out, first, b - first, None)
                continue
            first = b
            while b < end and b in allocated:
                b += 1
            data = self.read(first * SECTORS_PER_BLOCK, (b - first) * SECTORS_PER_BLOCK)
            mv = memoryview(data)
            i = 0
            while i < b - first:
                j = i
                is_zero = mv[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE] == zero
                while j < b - first and (mv[j * BLOCK_SIZE : (j + 1) * BLOCK_SIZE] == zero) == (
                    is_zero
                ):
                    j += 1
                chunk = None if is_zero else bytes(mv[i * BLOCK_SIZE : j * BLOCK_SIZE])
                _append_run(out, first + i, j - i, chunk)
                i = j
        return out

    # ---- feeds ----------------------------------------------------------------------------

    def open_feed(self, replica_id: str, after_lsn: int, notify: Callable[[], None]) -> Feed:
        """A feed of every record after ``after_lsn`` for a tracked replica. Raises
        :class:`WalTruncatedError` when some of those records are no longer in the WAL (the
        replica needs a resync from its bitmap first). Replaces the replica's previous feed."""
        with self._lock:
            if self._closed:
                raise VolumeClosedError(f"volume {self._name!r} is closed")
            tracker = self._trackers.get(replica_id)
            if tracker is None:
                raise KeyError(f"volume {self._name!r} does not track replica {replica_id!r}")
            oldest = self._log[0][_LSN] if self._log else self._next_lsn
            if after_lsn + 1 < oldest and after_lsn < self._last_lsn:
                raise WalTruncatedError(
                    f"volume {self._name!r}: replica {replica_id} needs records after LSN "
                    f"{after_lsn} but the WAL holds them from LSN {oldest} on; resync it"
                )
            if tracker.feed is not None:
                tracker.feed.lost = True
                tracker.feed.closed = True
            feed = Feed(self, replica_id, after_lsn + 1, notify)
            tracker.feed = feed
            tracker.covered_lsn = max(tracker.covered_lsn, min(after_lsn, self._last_lsn))
            return feed

    def _feed_take(self, feed: Feed, max_bytes: int, memory_only: bool) -> list[WalRecord]:
        if memory_only:
            # On the event loop: never wait for the lock (see Feed.take). The records taken
            # hold their payloads in memory, so building them needs no I/O either.
            if not self._lock.acquire(blocking=False):
                feed._needs_disk = True
                return []
            try:
                return [self._to_record(e) for e in self._feed_next(feed, max_bytes, True)]
            finally:
                self._lock.release()
        with self._lock:
            entries = self._feed_next(feed, max_bytes, False)
        if not entries:
            return []
        records = [self._to_record(e) for e in entries]
        with self._lock:
            if feed.lost:
                # Released (and maybe overwritten) while we read it back from the WAL.
                raise FeedLostError(
                    f"volume {self._name!r}: replica {feed.replica_id} fell too far behind "
                    "while reading; it must resync from its missed-write bitmap"
                )
        return records

    def _feed_next(self, feed: Feed, max_bytes: int, memory_only: bool) -> list[_LogEntry]:
        """The log entries ``feed`` takes next, advancing its cursor. Caller holds ``_lock``."""
        feed._needs_disk = False
        if feed.lost or feed.closed:
            raise FeedLostError(
                f"volume {self._name!r}: the records replica {feed.replica_id} needs were "
                "released from the WAL; it must resync from its missed-write bitmap"
            )
        log_ = self._log
        n = len(log_)
        i = n
        while i > 0 and log_[i - 1][_LSN] >= feed.cursor:
            i -= 1
        if i == n:
            if feed not in self._feeds_waiting:
                self._feeds_waiting.append(feed)
            return []
        entries: list[_LogEntry] = []
        size = 0
        while i < n:
            e = log_[i]
            is_write = e[_KIND] is wal.Kind.WRITE
            if memory_only and is_write and e[_PAYLOAD] is None:
                feed._needs_disk = True
                break
            payload_bytes = e[_COUNT] * BLOCK_SIZE if is_write else 0
            if entries and size + payload_bytes > max_bytes:
                break
            entries.append(e)
            size += payload_bytes
            i += 1
        if entries:
            feed.cursor = entries[-1][_LSN] + 1
        return entries

    def _to_record(self, e: _LogEntry) -> WalRecord:
        from blockyard.engine.volume import WalRecord  # noqa: PLC0415 - import cycle

        kind = e[_KIND]
        payload: bytes | memoryview | None = e[_PAYLOAD]
        if kind is wal.Kind.WRITE and payload is None:
            payload = self._read_back(e)
        return WalRecord(
            lsn=e[_LSN],
            epoch=e[_EPOCH],
            kind=kind,
            lba=e[_BLOCK] * SECTORS_PER_BLOCK,
            block_count=e[_COUNT] * SECTORS_PER_BLOCK,
            data=None if kind is not wal.Kind.WRITE else payload,
            generation=e[_GEN],
        )

    def _read_back(self, e: _LogEntry) -> bytes:
        """A retained record's payload from the WAL (after a restart), checksum-verified."""
        pos = e[_POS]
        raw = self._file.pread(wal.HEADER_BYTES, self._wal_offset + pos)
        length = e[_COUNT] * BLOCK_SIZE
        payload = self._file.pread(length, self._wal_offset + pos + wal.HEADER_BYTES)
        hdr = wal.parse_header(raw, self._wal_size, self._block_limit)
        if hdr is None or hdr.lsn != e[_LSN] or not wal.checksum_ok(raw, payload, self._seed):
            raise FeedLostError(
                f"volume {self._name!r}: WAL record LSN {e[_LSN]} kept for replication no "
                "longer checks out; the replica must be rebuilt"
            )
        return payload

    def _feed_ack(self, feed: Feed, durable_lsn: int) -> None:
        with self._lock:
            tracker = self._trackers.get(feed.replica_id)
            if tracker is None or tracker.feed is not feed:
                return
            tracker.acked_lsn = max(tracker.acked_lsn, min(durable_lsn, self._last_lsn))
            if durable_lsn > tracker.covered_lsn:
                tracker.covered_lsn = min(durable_lsn, self._last_lsn)
                if self._release_covered_locked():
                    self._space_cv.notify_all()

    def _feed_close(self, feed: Feed) -> None:
        with self._lock:
            feed.closed = True
            if feed in self._feeds_waiting:
                self._feeds_waiting.remove(feed)
            tracker = self._trackers.get(feed.replica_id)
            if tracker is not None and tracker.feed is feed:
                tracker.feed = None

    def _wake_feeds(self) -> None:
        """New records: call every armed feed's notify once. Caller holds ``_lock``."""
        waiting, self._feeds_waiting = self._feeds_waiting, []
        for feed in waiting:
            if feed.closed:
                continue
            try:
                feed._notify()
            except Exception:
                log.exception("volume %s: replication feed notify failed", self._name)

    # ---- retention ------------------------------------------------------------------------

    def _retained_applied(self, upto: int) -> None:
        """A checkpoint applied records up to ``upto``. Caller holds ``_lock``."""
        if self._trackers:
            self._retained_since.append((upto, self._clock()))

    def _keep_from_locked(self) -> int:
        if not self._trackers:
            return self._next_lsn
        return min(t.covered_lsn for t in self._trackers.values()) + 1

    def _release_covered_locked(self) -> bool:
        """Free the WAL space of applied records every replica is covered for. Needs no I/O.
        Caller holds ``_lock``. Returns whether anything was freed."""
        keep_from = self._keep_from_locked()
        log_ = self._log
        freed = 0
        while self._n_applied and log_[0][_LSN] < keep_from:
            freed += log_.popleft()[_CONSUMED]
            self._n_applied -= 1
        if not freed:
            return False
        self._used -= freed
        since = self._retained_since
        oldest = log_[0][_LSN] if log_ else self._next_lsn
        while since and since[0][0] < oldest:
            since.popleft()
        return True

    def _retained_bytes_locked(self) -> int:
        log_ = self._log
        return sum(log_[i][_CONSUMED] for i in range(self._n_applied))

    def _retention_due(self) -> bool:
        """Whether retention passed a bound (the flusher then releases with marking), or
        records are held that no tracked replica needs."""
        with self._lock:
            if not self._n_applied:
                return False
            if self._log[0][_LSN] < self._keep_from_locked():
                return True
            if self._retained_since and self._clock() - self._retained_since[0][1] > (
                RETENTION_MAX_S
            ):
                return True
            return self._retained_bytes_locked() > self._retention_max_bytes

    def _release_due_retained_locked(self) -> None:
        """Enforce the retention bounds: mark the oldest retained records in the bitmaps of
        the replicas not covered for them, persist those bitmaps, then free the space. Caller
        holds ``_apply_lock`` (flusher or checkpoint), not ``_lock``."""
        with self._lock:
            if not self._n_applied or not self._trackers:
                if self._release_covered_locked():
                    self._space_cv.notify_all()
                return
            now = self._clock()
            retained = [self._log[i] for i in range(self._n_applied)]
            budget = self._retention_max_bytes
            total = sum(e[_CONSUMED] for e in retained)
            age_limit_lsn = -1
            for first_lsn, t in self._retained_since:
                if now - t > RETENTION_MAX_S:
                    age_limit_lsn = max(age_limit_lsn, first_lsn)
            victims = []
            for e in retained:
                if total <= budget and e[_LSN] > age_limit_lsn:
                    break
                victims.append(e)
                total -= e[_CONSUMED]
            if not victims:
                return
            upto = victims[-1][_LSN]
            touched: list[_Tracker] = []
            for tracker in self._trackers.values():
                if tracker.covered_lsn >= upto:
                    continue
                tracker.bitmap.activate(tracker.covered_lsn)
                for e in victims:
                    if e[_LSN] > tracker.covered_lsn:
                        tracker.bitmap.mark(e[_BLOCK], e[_COUNT])
                touched.append(tracker)
        # Durable before the space can be reused: a crash now replays the same records and
        # marks them again; a crash later finds them in the bitmap.
        for tracker in touched:
            tracker.bitmap.persist()
        with self._lock:
            for tracker in touched:
                tracker.covered_lsn = max(tracker.covered_lsn, upto)
                feed = tracker.feed
                if feed is not None and feed.cursor <= upto and not feed.lost:
                    # Once per feed: a lost feed stays lost until its session ends, and a
                    # writer keeps releasing space meanwhile (seen as a hundred lines a second).
                    feed.lost = True
                    log.warning(
                        "volume %s: replica %s fell more than the retention bound behind; its "
                        "missed writes are in its bitmap and it will resync from it",
                        self._name,
                        tracker.bitmap.replica_id,
                    )
                    try:
                        feed._notify()
                    except Exception:
                        log.exception("volume %s: replication feed notify failed", self._name)
            if self._release_covered_locked():
                self._space_cv.notify_all()

    def _adopt_retained(self, result: wal.ScanResult, end_lsn: int) -> None:
        """After recovery: keep the records still physically in the WAL (from the newest back
        to the first gap) for tracked replicas. Called before any tracker exists; the server
        tracks replicas right after opening, and an idle flusher then releases what no
        replica needs (or what the time bound says it may)."""
        genuine = result.genuine
        if not genuine or not self._has_bitmaps():
            return
        lsns: list[int] = []
        lsn = end_lsn - 1
        while lsn in genuine:
            lsns.append(lsn)
            lsn -= 1
        if not lsns:
            return
        lsns.reverse()
        headers: list[tuple[wal.RecordHeader, int]] = []
        for lsn in lsns:
            pos = genuine[lsn]
            raw = self._file.pread(wal.HEADER_BYTES, self._wal_offset + pos)
            hdr = wal.parse_header(raw, self._wal_size, self._block_limit)
            if hdr is None or hdr.kind is wal.Kind.WRAP:
                headers = []
                continue
            headers.append((hdr, pos))
        if not headers:
            return
        # Space each record holds: up to the next one (a wrap gap included), the last up to
        # the head.
        head = result.end_pos
        entries: list[_LogEntry] = []
        for i, (hdr, pos) in enumerate(headers):
            nxt = headers[i + 1][1] if i + 1 < len(headers) else head
            consumed = (nxt - pos) % self._wal_size or self._wal_size
            entries.append(
                (hdr.lsn, hdr.kind, hdr.block, hdr.block_count, None, hdr.epoch, consumed,
                 hdr.generation, pos)
            )  # fmt: skip
        total = sum(e[_CONSUMED] for e in entries)
        if total > self._wal_size:
            return
        self._log.extend(entries)
        self._n_applied = len(entries)
        self._used = total
        self._retained_since.append((entries[-1][_LSN], self._clock()))

    def _has_bitmaps(self) -> bool:
        return any(
            e.startswith(BITMAP_PREFIX) and e.endswith(BITMAP_SUFFIX)
            for e in self._fs.listdir(self._dir)
        )


def _append_run(
    out: list[tuple[int, int, bytes | None]], block: int, count: int, data: bytes | None
) -> None:
    """Append a run, merging it into the previous hole run when both are holes."""
    if data is None and out and out[-1][2] is None and out[-1][0] + out[-1][1] == block:
        out[-1] = (out[-1][0], out[-1][1] + count, None)
    else:
        out.append((block, count, data))
