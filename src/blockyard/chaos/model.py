"""The consistency checker's core: per volume, per 512-byte block, the set of values a read may
legally return. Pure: no I/O and no clock (callers pass times); thread-safe.

The rule (SBC-4 §5.22 for SYNCHRONIZE CACHE, §5.49 for FUA): a write is *acknowledged durable*
once it completed with FUA, or once a SYNCHRONIZE CACHE that started after it completed
returned GOOD. A read of a block may return the newest acknowledged-durable value of that block
or any value written to it after that one was issued — completed, failed or still in flight,
since a write that failed or was cut by a crash may or may not have reached the medium — or
zeros where that value is an UNMAP or a WRITE SAME of zeros (LBPRZ). Nothing else.

Every block has one writer at a time (the workload gives each writer thread its own regions),
so the order in which values were issued to a block is the order of their write ids, and the
allowed set is a suffix of the block's history: ``[durable, later issued...]``.

Checks, numbered as in docs/reliability.md:

1. no acknowledged-durable write lost: a read returns a value older than the durable one;
2. no torn or invented data: a block that fails its checksum, names another volume, another
   block, or a write that never went to it;
3. no block going back in time: outside fault windows (``quiet``: no fault injected and the
   cluster healed since), a read returns a value older than one an earlier quiet read of the
   same block returned. Inside a fault window a write that was never acknowledged durable may
   legitimately vanish (the primary that held it died), so reads there are checked by 1 and 2
   only.
"""

from __future__ import annotations

import enum
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Final

from blockyard.chaos.payload import SECTOR_BYTES, CorruptSector, parse

#: Findings kept with their details; counts go on past it.
VIOLATIONS_KEPT: Final = 200
#: The initial value of every block: zeros, never written.
INITIAL: Final = 0


class OpKind(enum.Enum):
    WRITE = "write"
    FUA = "write+fua"
    SAME = "write-same"
    UNMAP = "unmap"
    ZEROES = "write-zeroes"


#: Kinds whose blocks read back as zeros.
ZEROING: Final = frozenset({OpKind.UNMAP, OpKind.ZEROES})


@dataclass(slots=True)
class WriteRecord:
    write_id: int
    kind: OpKind
    lba: int
    count: int
    writer: int
    ok: bool | None = None  # None while in flight
    # When (the caller's clock): issued, completed, acknowledged durable (None: not yet).
    issued_s: float = 0.0
    completed_s: float | None = None
    durable_s: float | None = None

    def covers(self, lba: int) -> bool:
        return self.lba <= lba < self.lba + self.count


@dataclass(frozen=True, slots=True)
class Violation:
    check: int
    volume: int
    lba: int | None
    message: str
    at_s: float


@dataclass(frozen=True, slots=True)
class ReadToken:
    """What a read needs from the moment it was issued: the fault generation, whether the
    cluster was quiet, and how many reads had completed (only those precede it: a read that
    overlaps another one has no order with it, SAM-5 §4.15)."""

    lba: int
    count: int
    generation: int
    quiet: bool
    reads_done: int


@dataclass
class Counters:
    writes_issued: int = 0
    writes_ok: int = 0
    writes_failed: int = 0
    durable: int = 0  # writes (of any kind) acknowledged durable
    flushes_ok: int = 0
    flushes_failed: int = 0
    reads: int = 0
    sectors_checked: int = 0
    by_check: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Miss:
    """A block that failed ``check``."""

    check: int
    message: str


@dataclass
class _Finding:
    """The first block of one read that failed a check, and how many did."""

    lba: int
    message: str
    blocks: int = 1


def _note(found: dict[int, _Finding], check: int, lba: int, message: str) -> None:
    if check in found:
        found[check].blocks += 1
    else:
        found[check] = _Finding(lba, message)


class VolumeModel:
    """The allowed values of every block of one volume (``volume`` is its index in the run)."""

    def __init__(self, volume: int, sector_count: int) -> None:
        self.volume = volume
        self.sector_count = sector_count
        self.counters = Counters()
        self.violations: list[Violation] = []
        self._lock = threading.Lock()
        self._next_id = 1
        self._writes: dict[int, WriteRecord] = {}
        # block → write ids from its durable value on, in issue order; absent = [INITIAL]
        self._allowed: dict[int, list[int]] = {}
        self._durable: dict[int, int] = {}  # block → its newest durable write id
        self._completions = 0
        self._unflushed: deque[tuple[int, int]] = deque()  # (completion number, write id)
        # block → (oldest id it could hold, generation, completion number) of the quiet read
        # that set the floor of later reads
        self._last_read: dict[int, tuple[int, int, int]] = {}
        self._reads_done = 0
        self._generation = 0
        self._quiet = True
        #: Subtracted from the caller's times in messages (the runner sets its start).
        self.origin_s = 0.0

    # ---- fault windows -------------------------------------------------------------------

    def fault_begin(self) -> None:
        with self._lock:
            self._generation += 1
            self._quiet = False

    def fault_end(self) -> None:
        """The fault is over and the cluster healed: reads are held to monotonicity again."""
        with self._lock:
            self._quiet = True

    # ---- writes --------------------------------------------------------------------------

    def issue(self, kind: OpKind, lba: int, count: int, writer: int, at_s: float = 0.0) -> int:
        """Register a write about to be submitted; its write id (stamp it into the payload)."""
        if count <= 0 or lba < 0 or lba + count > self.sector_count:
            raise ValueError(f"write of {count} blocks at LBA {lba} is outside the volume")
        with self._lock:
            wid = self._next_id
            self._next_id += 1
            self._writes[wid] = WriteRecord(wid, kind, lba, count, writer, issued_s=at_s)
            for s in range(lba, lba + count):
                self._allowed.setdefault(s, [INITIAL]).append(wid)
            self.counters.writes_issued += 1
            return wid

    def complete(self, write_id: int, *, ok: bool, at_s: float = 0.0) -> None:
        """The write returned: GOOD (``ok``) or an error (its outcome is then unknown)."""
        with self._lock:
            rec = self._writes[write_id]
            rec.ok = ok
            rec.completed_s = at_s
            if not ok:
                self.counters.writes_failed += 1
                return
            self.counters.writes_ok += 1
            if rec.kind is OpKind.FUA:
                self._make_durable(rec, at_s)
            else:
                self._completions += 1
                self._unflushed.append((self._completions, write_id))

    def flush_begin(self) -> int:
        """Call before submitting SYNCHRONIZE CACHE; pass the result to :meth:`flush_end`."""
        with self._lock:
            return self._completions

    def flush_end(self, token: int, *, ok: bool, at_s: float = 0.0) -> None:
        with self._lock:
            if not ok:
                self.counters.flushes_failed += 1
                return
            self.counters.flushes_ok += 1
            while self._unflushed and self._unflushed[0][0] <= token:
                _, wid = self._unflushed.popleft()
                self._make_durable(self._writes[wid], at_s)

    def _make_durable(self, rec: WriteRecord, at_s: float) -> None:
        self.counters.durable += 1
        rec.durable_s = at_s
        for s in range(rec.lba, rec.lba + rec.count):
            allowed = self._allowed.get(s)
            if allowed is None or rec.write_id not in allowed:
                continue  # a newer write of this block is already durable
            del allowed[: allowed.index(rec.write_id)]
            self._durable[s] = rec.write_id

    # ---- reads ---------------------------------------------------------------------------

    def read_begin(self, lba: int, count: int) -> ReadToken:
        with self._lock:
            return ReadToken(lba, count, self._generation, self._quiet, self._reads_done)

    def read_end(self, token: ReadToken, data: bytes | memoryview, at_s: float) -> int:
        """Check what a read returned; the number of violations it found (0 when it held)."""
        view = memoryview(data)
        if len(view) != token.count * SECTOR_BYTES:
            raise ValueError(f"{len(view)} bytes read for {token.count} blocks")
        found: dict[int, _Finding] = {}
        with self._lock:
            quiet = token.quiet and self._quiet and token.generation == self._generation
            self.counters.reads += 1
            self.counters.sectors_checked += token.count
            self._reads_done += 1
            done = self._reads_done
            for i in range(token.count):
                s = token.lba + i
                got = self._check_sector(s, view[i * SECTOR_BYTES : (i + 1) * SECTOR_BYTES])
                if isinstance(got, _Miss):
                    _note(found, got.check, s, got.message)
                    continue
                low, high = got
                if not quiet:
                    continue
                last = self._last_read.get(s)
                if last is None or last[1] != token.generation:
                    self._last_read[s] = (low, token.generation, done)
                    continue
                if last[2] <= token.reads_done and high < last[0]:
                    message = (
                        f"LBA {s} reads write {high} after a quiet read of it returned "
                        f"write {last[0]} (no fault in between)"
                    )
                    _note(found, 3, s, message)
                elif low >= last[0]:
                    self._last_read[s] = (low, token.generation, done)
            for check, f in sorted(found.items()):
                self._violate(check, f.lba, f"{f.message}; {f.blocks} block(s) of this read", at_s)
        return len(found)

    def _check_sector(self, s: int, raw: memoryview) -> tuple[int, int] | _Miss:
        """``(oldest, newest)`` write ids the block's content could be, or ``(check, why)``."""
        allowed = self._allowed.get(s) or [INITIAL]
        try:
            stamp = parse(raw)
        except CorruptSector as exc:
            return _Miss(2, f"torn or invented data at LBA {s}: {exc}")
        if stamp is None:
            zeros = [w for w in allowed if w == INITIAL or self._writes[w].kind in ZEROING]
            if zeros:
                return zeros[0], zeros[-1]
            return _Miss(1, self._lost(s, "zeros", allowed))
        rec = self._writes.get(stamp.write_id)
        if stamp.volume != self.volume:
            return _Miss(2, f"LBA {s} holds volume {stamp.volume}'s write {stamp.write_id}")
        if rec is None or not rec.covers(s) or rec.kind in ZEROING:
            return _Miss(2, f"LBA {s} holds write {stamp.write_id}, which never went to it")
        expected_lba = rec.lba if rec.kind is OpKind.SAME else s
        if stamp.same != (rec.kind is OpKind.SAME) or stamp.lba != expected_lba:
            return _Miss(2, f"LBA {s} holds write {stamp.write_id}'s block for LBA {stamp.lba}")
        if stamp.write_id in allowed:
            return stamp.write_id, stamp.write_id
        return _Miss(1, self._lost(s, f"write {stamp.write_id}", allowed))

    def _lost(self, s: int, what: str, allowed: list[int]) -> str:
        durable = self._durable.get(s, INITIAL)
        rec = self._writes.get(durable)
        when = ""
        if rec is not None:
            when = (
                f" (issued at {rec.issued_s - self.origin_s:.3f} s, completed at "
                f"{(rec.completed_s or 0.0) - self.origin_s:.3f} s, durable at "
                f"{(rec.durable_s or 0.0) - self.origin_s:.3f} s by "
                f"{'FUA' if rec.kind is OpKind.FUA else 'a flush'})"
            )
        return (
            f"acknowledged write lost at LBA {s}: reads {what}, but write {durable} was "
            f"acknowledged durable{when} (allowed: {allowed[:6]})"
        )

    def _violate(self, check: int, lba: int | None, message: str, at_s: float) -> None:
        self.counters.by_check[check] = self.counters.by_check.get(check, 0) + 1
        if len(self.violations) < VIOLATIONS_KEPT:
            self.violations.append(Violation(check, self.volume, lba, message, at_s))

    def record(self, check: int, message: str, at_s: float) -> None:
        """A finding made outside the block checks (checks 4 and 5, replica divergence)."""
        with self._lock:
            self._violate(check, None, message, at_s)

    def violation_count(self) -> int:
        with self._lock:
            return sum(self.counters.by_check.values())
