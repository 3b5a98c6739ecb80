"""``blockyard bench engine``: the engine against raw ``os.pwrite``/``os.pread`` on a plain file.

Every workload runs twice in the same process on the same filesystem — once through a volume,
once as plain positional I/O on a sparse file of the same size — and the ratio is printed.
Targets (from the engine's requirements): random read ≥ 0.5x raw, random write ≥ 0.5x raw, and
with 8 concurrent flushers, fdatasync calls ≤ 1/4 of flush calls (group commit).
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from blockyard.engine import Volume, VolumeStore

KIB = 1 << 10
MIB = 1 << 20
BLOCK = 4 * KIB
SECTOR = 512


@dataclass(frozen=True, slots=True)
class Result:
    name: str
    unit: str
    engine: float
    raw: float
    target: float | None = None
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.engine / self.raw if self.raw else 0.0

    @property
    def verdict(self) -> str:
        if self.target is None:
            return ""
        return "ok" if self.ratio >= self.target else "BELOW TARGET"


def _offsets(count: int, span_bytes: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    blocks = span_bytes // BLOCK
    return [rng.randrange(blocks) * BLOCK for _ in range(count)]


def _timed(fn: Callable[[], int]) -> float:
    """Run ``fn`` (returns operations or bytes done) and return the rate per second."""
    t0 = time.perf_counter()
    done = fn()
    return done / (time.perf_counter() - t0)


class EngineBench:
    def __init__(self, directory: str, *, size_bytes: int, seconds: float) -> None:
        self.dir = directory
        self.size = size_bytes
        self.seconds = seconds
        self.store = VolumeStore(os.path.join(directory, "volumes"))
        self.raw_path = os.path.join(directory, "raw.img")
        self.results: list[Result] = []
        self.sync_counts: dict[str, int] = {}

    # -- setup -----------------------------------------------------------------------------

    def _fresh_volume(self, name: str) -> Volume:
        if self.store.exists(name):
            self.store.delete(name)
        return self.store.create(name, self.size)

    def _fresh_raw(self) -> int:
        if os.path.exists(self.raw_path):
            os.unlink(self.raw_path)
        fd = os.open(self.raw_path, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(fd, self.size)
        return fd

    def _ops_for(self, rate_guess: float) -> int:
        return max(1000, int(rate_guess * self.seconds))

    # -- workloads -------------------------------------------------------------------------

    def random_write(self) -> None:
        n = self._ops_for(150_000)
        offs = _offsets(n, self.size, 1)
        buf = os.urandom(BLOCK)
        vol = self._fresh_volume("bench-rw")
        lbas = [o // SECTOR for o in offs]

        def engine() -> int:
            w = vol.write
            for lba in lbas:
                w(lba, buf)
            return n

        e = _timed(engine)
        vol.close()
        fd = self._fresh_raw()

        def raw() -> int:
            pw = os.pwrite
            for o in offs:
                pw(fd, buf, o)
            return n

        r = _timed(raw)
        os.close(fd)
        self.results.append(Result("4 KiB random write, no flush", "IOPS", e, r, 0.5))

    def random_write_flush(self, threads: int = 8, every: int = 32) -> None:
        per_thread = max(every * 4, self._ops_for(40_000) // threads // every * every)
        buf = os.urandom(BLOCK)
        vol = self._fresh_volume("bench-rwf")
        offs = [_offsets(per_thread, self.size, 10 + t) for t in range(threads)]

        def run(worker: Callable[[list[int]], None]) -> float:
            ts = [threading.Thread(target=worker, args=(offs[t],)) for t in range(threads)]
            t0 = time.perf_counter()
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            return threads * per_thread / (time.perf_counter() - t0)

        def engine_worker(my: list[int]) -> None:
            for i, o in enumerate(my, 1):
                vol.write(o // SECTOR, buf)
                if i % every == 0:
                    vol.flush()

        before_calls = vol.stats.flush_calls
        before_syncs = vol.stats.flush_syncs
        e = run(engine_worker)
        flush_calls = vol.stats.flush_calls - before_calls
        flush_syncs = vol.stats.flush_syncs - before_syncs
        checkpoint_syncs = vol.stats.checkpoint_syncs
        vol.close()
        fd = self._fresh_raw()

        def raw_worker(my: list[int]) -> None:
            for i, o in enumerate(my, 1):
                os.pwrite(fd, buf, o)
                if i % every == 0:
                    os.fdatasync(fd)

        r = run(raw_worker)
        os.close(fd)
        self.sync_counts = {
            "flush_calls": flush_calls,
            "flush_fdatasyncs": flush_syncs,
            "checkpoint_fdatasyncs": checkpoint_syncs,
        }
        self.results.append(
            Result(
                f"4 KiB random write, {threads} writers, flush every {every}",
                "IOPS",
                e,
                r,
                None,
                f"raw peer: fdatasync per flush ({threads * per_thread // every} calls)",
            )
        )

    def random_read(self) -> None:
        span = min(self.size, 256 * MIB)
        n = self._ops_for(300_000)
        offs = _offsets(n, span, 2)
        chunk = os.urandom(MIB)
        vol = self._fresh_volume("bench-rr")
        for off in range(0, span, MIB):
            vol.write(off // SECTOR, chunk)
        vol.flush()
        # Let the flusher apply the fill so reads measure the data-region path, as they will
        # on a long-running volume.
        deadline = time.monotonic() + 60
        while vol.checkpoint_lsn <= vol.last_lsn and time.monotonic() < deadline:
            time.sleep(0.05)
        lbas = [o // SECTOR for o in offs]

        def engine() -> int:
            r = vol.read
            for lba in lbas:
                r(lba, 8)
            return n

        vol.read(0, 8)
        e = _timed(engine)
        vol.close()
        fd = self._fresh_raw()
        for off in range(0, span, MIB):
            os.pwrite(fd, chunk, off)

        def raw() -> int:
            pr = os.pread
            for o in offs:
                pr(fd, BLOCK, o)
            return n

        r = _timed(raw)
        os.close(fd)
        self.results.append(Result("4 KiB random read (cached)", "IOPS", e, r, 0.5))

    def sequential(self) -> None:
        total = min(self.size, 512 * MIB)
        chunk = os.urandom(MIB)
        vol = self._fresh_volume("bench-seq")

        def engine_write() -> int:
            for off in range(0, total, MIB):
                vol.write(off // SECTOR, chunk)
            vol.flush()
            return total

        ew = _timed(engine_write)

        def engine_read() -> int:
            for off in range(0, total, MIB):
                vol.read(off // SECTOR, MIB // SECTOR)
            return total

        er = _timed(engine_read)
        vol.close()
        fd = self._fresh_raw()

        def raw_write() -> int:
            for off in range(0, total, MIB):
                os.pwrite(fd, chunk, off)
            os.fdatasync(fd)
            return total

        rw = _timed(raw_write)

        def raw_read() -> int:
            for off in range(0, total, MIB):
                os.pread(fd, MIB, off)
            return total

        rr = _timed(raw_read)
        os.close(fd)
        self.results.append(
            Result("1 MiB sequential write + flush", "MB/s", ew / 1e6, rw / 1e6, None)
        )
        self.results.append(Result("1 MiB sequential read", "MB/s", er / 1e6, rr / 1e6, None))

    def run(self) -> None:
        self.random_write()
        self.random_write_flush()
        self.random_read()
        self.sequential()

    def report(self) -> str:
        lines = [
            f"blockyard bench engine — volume {self.size // MIB} MiB, dir {self.dir}, "
            f"{os.cpu_count()} CPUs",
            f"{'workload':<46} {'unit':>5} {'engine':>12} {'raw':>12} {'ratio':>7}  target",
        ]
        for r in self.results:
            target = f">= {r.target:.2f}x {r.verdict}" if r.target is not None else ""
            lines.append(
                f"{r.name:<46} {r.unit:>5} {r.engine:>12,.0f} {r.raw:>12,.0f} "
                f"{r.ratio:>6.2f}x  {target}"
            )
            if r.note:
                lines.append(f"{'':<46} {r.note}")
        c = self.sync_counts
        if c:
            ratio = c["flush_fdatasyncs"] / c["flush_calls"] if c["flush_calls"] else 0.0
            verdict = "ok" if ratio <= 0.25 else "ABOVE TARGET"
            lines.append(
                f"group commit: {c['flush_calls']} flush calls -> {c['flush_fdatasyncs']} "
                f"fdatasyncs ({ratio:.3f} per flush; target <= 0.25 {verdict}); "
                f"background checkpoints added {c['checkpoint_fdatasyncs']} fdatasyncs"
            )
        return "\n".join(lines)


def run_engine_bench(directory: str | None, *, size_bytes: int, seconds: float) -> str:
    own = directory is None
    path = tempfile.mkdtemp(prefix="blockyard-bench-", dir="/var/tmp") if own else directory
    assert path is not None
    os.makedirs(path, exist_ok=True)
    try:
        bench = EngineBench(path, size_bytes=size_bytes, seconds=seconds)
        bench.run()
        return bench.report()
    finally:
        if own:
            shutil.rmtree(path, ignore_errors=True)
