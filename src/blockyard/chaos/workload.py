"""The chaos workload: per volume, several writer threads on one attached device (blockyard's
userspace multipath initiator), each owning its own 1 MiB regions so that the order of values
written to a block is the order its one writer issued them. Each writer mixes, from its own
seeded random stream: writes of 512 B to 1 MiB (aligned and unaligned to 4 KiB), FUA writes,
WRITE SAME of a stamped block, UNMAP, WRITE SAME of zeros, SYNCHRONIZE CACHE and reads of its
own blocks, checked at once against the :class:`~blockyard.chaos.model.VolumeModel`.

A writer is strictly sequential (queue depth 1 each; the volume's depth is the writer count):
that is what makes the per-block order exact. An I/O error is not a finding: the operation's
outcome is unknown (the model keeps both values), the writer backs off briefly and goes on.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Final, Protocol

from blockyard.chaos.model import OpKind, VolumeModel
from blockyard.chaos.payload import sector, sectors
from blockyard.errors import BlockyardError

#: A writer's unit of ownership: 1 MiB, the largest single write.
REGION_SECTORS: Final = 2048
#: Write sizes in 512-byte blocks, drawn uniformly: mostly small, up to 1 MiB.
SIZES: Final = (1, 3, 7, 8, 8, 8, 16, 16, 24, 64, 128, 256, 1024, 2048)
#: Operation mix (weights).
MIX: Final = (
    ("write", 40),
    ("fua", 10),
    ("read", 26),
    ("flush", 12),
    ("same", 4),
    ("unmap", 4),
    ("zeroes", 4),
)
#: After an I/O error a writer waits this long before its next operation.
BACKOFF_S: Final = 0.1
#: Gaps between completed operations shorter than this are not kept (normal latency).
GAP_KEEP_S: Final = 0.05
GAPS_KEPT: Final = 100_000
STOP_TIMEOUT_S: Final = 120.0


class Device(Protocol):
    """What the workload needs of a block device (the userspace initiator's
    :class:`~blockyard.attach.initiator.IscsiBlockDevice`)."""

    def read(self, lba: int, block_count: int) -> bytes: ...
    def write(self, lba: int, data: bytes, *, fua: bool = False) -> None: ...
    def write_same(self, lba: int, block_count: int, block: bytes) -> None: ...
    def unmap(self, lba: int, block_count: int) -> None: ...
    def write_zeroes(self, lba: int, block_count: int) -> None: ...
    def flush(self) -> None: ...


class IoGaps:
    """When I/O on a volume stood still: the intervals between consecutive completions longer
    than :data:`GAP_KEEP_S` (bounded)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: float | None = None
        self._gaps: deque[tuple[float, float]] = deque(maxlen=GAPS_KEPT)

    def completed(self, now: float) -> None:
        with self._lock:
            if self._last is not None and now - self._last > GAP_KEEP_S:
                self._gaps.append((self._last, now))
            self._last = now

    def longest_in(self, start: float, end: float) -> float:
        """The longest stretch without a completed operation inside ``[start, end]``."""
        with self._lock:
            spans = list(self._gaps)
            if self._last is not None:
                spans.append((self._last, end))  # still waiting for the next completion
        longest = 0.0
        for a, b in spans:
            overlap = min(b, end) - max(a, start)
            longest = max(longest, overlap)
        return longest


@dataclass
class Tally:
    ops: int = 0
    errors: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    last_errors: deque[str] = field(default_factory=lambda: deque(maxlen=20))


class VolumeWorkload:
    """``writers`` threads on ``device``; :meth:`sweep` has each read back all its regions."""

    def __init__(self, model: VolumeModel, device: Device, *, seed: int, writers: int = 3) -> None:
        self.model = model
        self.device = device
        self.seed = seed
        self.writers = writers
        self.gaps = IoGaps()
        self.tally = Tally()
        self.crashed: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sweep = [threading.Event() for _ in range(writers)]
        self._swept = [threading.Event() for _ in range(writers)]
        regions = model.sector_count // REGION_SECTORS
        if regions < writers:
            raise ValueError(f"{writers} writers need at least {writers} MiB of volume")
        self._regions = [list(range(w, regions, writers)) for w in range(writers)]

    def start(self) -> None:
        for w in range(self.writers):
            t = threading.Thread(
                target=self._run, args=(w,), name=f"chaos-v{self.model.volume}-w{w}", daemon=True
            )
            self._threads.append(t)
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=STOP_TIMEOUT_S)
            if t.is_alive():
                self.crashed.append(f"{t.name} did not stop within {STOP_TIMEOUT_S} s")

    def sweep(self, timeout_s: float) -> bool:
        """Each writer reads back (and checks) every block it owns, in 1 MiB reads; False when
        they did not all finish within ``timeout_s``."""
        for w in range(self.writers):
            self._swept[w].clear()
            self._sweep[w].set()
        deadline = time.monotonic() + timeout_s
        return all(e.wait(max(0.0, deadline - time.monotonic())) for e in self._swept)

    # ---- one writer ----------------------------------------------------------------------

    def _run(self, w: int) -> None:
        rng = random.Random(f"{self.seed}/{self.model.volume}/{w}")
        kinds = [k for k, _ in MIX]
        weights = [n for _, n in MIX]
        try:
            while not self._stop.is_set():
                if self._sweep[w].is_set():
                    self._sweep[w].clear()
                    for region in self._regions[w]:
                        self._op(w, "read", region * REGION_SECTORS, REGION_SECTORS)
                    self._swept[w].set()
                    continue
                kind = rng.choices(kinds, weights)[0]
                count = rng.choice(SIZES)
                region = rng.choice(self._regions[w])
                slack = REGION_SECTORS - count
                offset = rng.randrange(slack + 1)
                if rng.random() < 0.5:
                    offset -= offset % 8  # 4 KiB aligned
                self._op(w, kind, region * REGION_SECTORS + offset, count)
        except Exception as exc:  # a harness bug: reported, fails the run
            self.crashed.append(f"writer {w}: {type(exc).__name__}: {exc}")
            raise

    def _op(self, w: int, kind: str, lba: int, count: int) -> None:
        model, dev = self.model, self.device
        try:
            if kind == "read":
                token = model.read_begin(lba, count)
                data = dev.read(lba, count)
                model.read_end(token, data, time.monotonic())
            elif kind == "flush":
                flush = model.flush_begin()
                try:
                    dev.flush()
                except BlockyardError:
                    model.flush_end(flush, ok=False, at_s=time.monotonic())
                    raise
                model.flush_end(flush, ok=True, at_s=time.monotonic())
            else:
                self._write(w, kind, lba, count)
        except BlockyardError as exc:
            with self._lock:
                self.tally.errors += 1
                self.tally.last_errors.append(f"{time.monotonic():.3f} {kind}: {exc}")
            self._stop.wait(BACKOFF_S)
            return
        self.gaps.completed(time.monotonic())
        with self._lock:
            self.tally.ops += 1
            self.tally.by_kind[kind] = self.tally.by_kind.get(kind, 0) + 1

    def _write(self, w: int, kind: str, lba: int, count: int) -> None:
        model, dev, vol = self.model, self.device, self.model.volume
        op = {"write": OpKind.WRITE, "fua": OpKind.FUA, "same": OpKind.SAME,
              "unmap": OpKind.UNMAP, "zeroes": OpKind.ZEROES}[kind]  # fmt: skip
        wid = model.issue(op, lba, count, w, time.monotonic())
        try:
            if op is OpKind.SAME:
                dev.write_same(lba, count, sector(vol, lba, wid, same=True))
            elif op is OpKind.UNMAP:
                dev.unmap(lba, count)
            elif op is OpKind.ZEROES:
                dev.write_zeroes(lba, count)
            else:
                dev.write(lba, sectors(vol, lba, count, wid), fua=op is OpKind.FUA)
        except BlockyardError:
            model.complete(wid, ok=False, at_s=time.monotonic())
            raise
        model.complete(wid, ok=True, at_s=time.monotonic())


def read_all(model: VolumeModel, device: Device, chunk: int = REGION_SECTORS) -> None:
    """Read and check every block of the volume (the workload must be stopped)."""
    for lba in range(0, model.sector_count, chunk):
        n = min(chunk, model.sector_count - lba)
        token = model.read_begin(lba, n)
        model.read_end(token, device.read(lba, n), time.monotonic())
