"""A volume's write history: which primary incarnation wrote which LSNs.

Every WAL record carries ``(epoch, generation)``. A *segment* is a run of LSNs written under one
pair: the epoch changes when a new primary is promoted, the generation (random, non-zero) each
time a primary opens or is promoted. LSNs are shipped unchanged to replicas, so record ``n`` of
segment ``(e, g)`` is the same bytes on every copy that holds it.

After a crash a primary may lose its unsynced tail; the LSNs it lost may already sit on a
replica. Those records are not part of the history the primary goes on with: recovery closes the
segment at the last record it replayed and the next records belong to a new generation. So two
copies agree on "everything up to LSN n" exactly when their segment lists agree up to n, which is
what :func:`common_prefix_end` computes when a replica reconnects (the Raft log-matching idea,
with segments instead of per-entry terms).

The list is kept in a small JSON file beside the volume (``history.json``), replaced atomically;
it changes only when a segment begins (an open, a promotion, a replica seeing a new segment), so
the cost is nothing on the write path. It keeps the newest :data:`MAX_HISTORY_SEGMENTS`; a
replica whose records predate them is rebuilt in full.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from blockyard.engine.fileio import VolumeFS
from blockyard.errors import CorruptionError

HISTORY_FILE: Final = "history.json"
#: Segments kept (also the most a replication handshake carries).
MAX_HISTORY_SEGMENTS: Final = 64
#: ``last_lsn`` of a segment still being written.
OPEN_LSN: Final = (1 << 64) - 1
_MAX_FILE_BYTES: Final = 64 << 10
_U64_MAX: Final = (1 << 64) - 1
_U32_MAX: Final = (1 << 32) - 1


@dataclass(frozen=True, slots=True)
class Segment:
    """LSNs ``first_lsn..last_lsn`` written under ``(epoch, generation)``."""

    epoch: int
    generation: int
    first_lsn: int
    last_lsn: int = OPEN_LSN

    @property
    def open(self) -> bool:
        return self.last_lsn == OPEN_LSN

    def key(self) -> tuple[int, int]:
        return (self.epoch, self.generation)


def new_generation() -> int:
    """A random non-zero 32-bit generation: two incarnations never share one in practice
    (one in four billion), whichever server they run on."""
    return secrets.randbelow(_U32_MAX) + 1


class History:
    """The segment list of one volume. Not thread-safe: the volume serialises access."""

    def __init__(self, segments: Sequence[Segment] = ()) -> None:
        self.segments: list[Segment] = list(segments)

    def __repr__(self) -> str:
        return f"History({self.segments!r})"

    @property
    def last(self) -> Segment | None:
        return self.segments[-1] if self.segments else None

    def begin(self, epoch: int, generation: int, first_lsn: int, *, close_at: int) -> None:
        """Start a segment at ``first_lsn``; the open one (if any) ends at ``close_at``.
        Segments that would start at or after ``first_lsn`` never held a record of this copy
        (a power loss took them): they are dropped first."""
        self.truncate(first_lsn - 1)
        if self.segments and self.segments[-1].open:
            prev = self.segments[-1]
            if close_at < prev.first_lsn:
                # Nothing was written in the previous segment: it never existed.
                self.segments.pop()
            else:
                self.segments[-1] = Segment(prev.epoch, prev.generation, prev.first_lsn, close_at)
        self.segments.append(Segment(epoch, generation, first_lsn))
        del self.segments[:-MAX_HISTORY_SEGMENTS]

    def truncate(self, last_lsn: int) -> bool:
        """Forget what lies after ``last_lsn`` (the last record this copy holds): segments that
        start after it go, and the one holding it is open again. Returns whether anything
        changed. A replica calls it after recovery: a power loss may have taken records of
        segments it had learnt durably."""
        changed = False
        while self.segments and self.segments[-1].first_lsn > last_lsn:
            self.segments.pop()
            changed = True
        if self.segments and not self.segments[-1].open and self.segments[-1].last_lsn > last_lsn:
            seg = self.segments[-1]
            self.segments[-1] = Segment(seg.epoch, seg.generation, seg.first_lsn)
            changed = True
        return changed

    def note_record(self, epoch: int, generation: int, lsn: int, *, previous_lsn: int) -> bool:
        """A replica applies record ``lsn`` after ``previous_lsn`` (the last it held): returns
        True when it starts a new segment (the caller persists the history before making the
        record durable). The open segment ends at ``previous_lsn``: LSNs skipped between the two
        (a primary numbering past records it lost) belong to no segment."""
        last = self.last
        if last is not None and last.key() == (epoch, generation) and last.open:
            return False
        self.begin(epoch, generation, lsn, close_at=previous_lsn)
        return True

    def segment_for(self, lsn: int) -> Segment | None:
        for seg in reversed(self.segments):
            if seg.first_lsn <= lsn <= seg.last_lsn:
                return seg
        return None

    # ---- persistence ----------------------------------------------------------------------

    def encode(self) -> bytes:
        doc = {
            "version": 1,
            "segments": [
                [s.epoch, s.generation, s.first_lsn, None if s.open else s.last_lsn]
                for s in self.segments
            ],
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes, *, path: str, volume: str) -> History:
        def corrupt(what: str) -> CorruptionError:
            return CorruptionError(
                f"write history {what}; delete {path} to make the volume rebuild its replicas "
                "in full",
                volume=volume,
                path=path,
                offset=0,
            )

        if len(raw) > _MAX_FILE_BYTES:
            raise corrupt(f"is {len(raw)} bytes, more than {_MAX_FILE_BYTES}")
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise corrupt("is not JSON") from None
        if not isinstance(doc, dict) or doc.get("version") != 1:
            raise corrupt("has an unknown version")
        items = doc.get("segments")
        if not isinstance(items, list) or len(items) > MAX_HISTORY_SEGMENTS:
            raise corrupt("has no valid segment list")
        segments: list[Segment] = []
        for item in items:
            if (
                not isinstance(item, list)
                or len(item) != 4
                or not all(isinstance(v, int) and 0 <= v <= _U64_MAX for v in item[:3])
                or not (item[3] is None or (isinstance(item[3], int) and 0 <= item[3] < OPEN_LSN))
                or not 0 < item[1] <= _U32_MAX
            ):
                raise corrupt(f"has an invalid segment {item!r}")
            last = OPEN_LSN if item[3] is None else item[3]
            seg = Segment(item[0], item[1], item[2], last)
            if segments and seg.first_lsn <= segments[-1].first_lsn:
                raise corrupt("has segments out of order")
            segments.append(seg)
        return cls(segments)

    @classmethod
    def load(cls, fs: VolumeFS, directory: str, *, volume: str) -> History:
        path = f"{directory}/{HISTORY_FILE}"
        if not fs.exists(path):
            return cls()
        f = fs.open(path)
        try:
            size = min(f.size(), _MAX_FILE_BYTES + 1)
            return cls.decode(f.pread(size, 0), path=path, volume=volume)
        finally:
            f.close()

    def save(self, fs: VolumeFS, directory: str) -> None:
        """Replace the history file atomically (temp file, fsync, rename)."""
        path = f"{directory}/{HISTORY_FILE}"
        tmp = f"{path}.tmp"
        fs.remove(tmp)
        f = fs.open(tmp, create=True)
        try:
            data = self.encode()
            f.pwrite(data, 0)
            f.fdatasync()
        finally:
            f.close()
        fs.rename(tmp, path)


def common_prefix_end(
    primary: Sequence[Segment],
    primary_last_lsn: int,
    replica: Sequence[Segment],
    replica_last_lsn: int,
) -> int | None:
    """The highest LSN up to which the replica's records are exactly the primary's, or None
    when the two share no known segment (the replica must be rebuilt in full).

    Walks the replica's segments in order; each must be one of the primary's segments (same
    epoch and generation). Within a matched segment the common part ends where the shorter of
    the two ends; if the replica holds more of a segment than the primary kept (the primary lost
    that tail in a crash, or a deposed primary wrote past the point its successor took over),
    the records after that point diverge and the walk stops there.
    """
    by_key = {s.key(): s for s in primary}
    result: int | None = None
    for rs in replica:
        if rs.first_lsn > replica_last_lsn:
            break
        ps = by_key.get(rs.key())
        if ps is None:
            break
        r_last = min(rs.last_lsn, replica_last_lsn)
        p_last = min(ps.last_lsn, primary_last_lsn)
        common = min(r_last, p_last)
        if common < max(rs.first_lsn, ps.first_lsn):
            break
        result = common
        if r_last > p_last:
            break
    return result
