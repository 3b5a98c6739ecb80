"""Load generators and statistics of ``blockyard bench replication``: real external initiators
(qemu's libiscsi driver) over ``iscsi://`` to the primary.

- **QD32, a flush every 32 writes**: ``qemu-img bench -w -t none -d 32 -s 4096
  --flush-interval=32 -S 1052672``. qemu-img bench has no random mode; its step of 257 blocks
  (1 MiB + 4 KiB; 257 is prime, so a pass visits distinct blocks for a long time before one
  repeats) means no two writes in flight are adjacent: the target cannot merge them, and each
  costs what a random 4 KiB write costs (a WAL record, a dirty-map entry, a replication
  record). Every 32 requests qemu-img waits for those in flight and then sends
  SYNCHRONIZE CACHE (it drains before a flush unless given ``--no-drain``).
- **QD1 FUA latency**: ``qemu-io -t none`` running ``write -f -C OFFSET 4k`` once per write.
  ``-f`` is a FUA write (qemu's iSCSI driver sets FUA in the CDB because the LU reports DPOFUA);
  ``-C`` prints one line per command with its rate, the inverse of its latency as qemu-io timed
  it around the request alone.

Why these tools: Debian 12's fio has no libiscsi engine (``fio --enghelp``), iscsi-perf only
reads, and blockyard's own initiator spends more CPU per I/O than the server it measures on a
2-core machine.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from blockyard.bench.iscsi import BenchError, _run

BLOCK_SIZE: Final = 4096
#: Stride of the QD32 and QD1 writes: 257 blocks (prime, so blocks rarely repeat within a
#: run; far enough apart that nothing merges).
STRIDE_BYTES: Final = 257 * BLOCK_SIZE
QUEUE_DEPTH: Final = 32
FLUSH_EVERY: Final = 32
#: Bound on one qemu-io invocation (its command list is passed as arguments).
QD1_MAX_WRITES: Final = 5000
TOOL_TIMEOUT_S: Final = 300.0

_QEMU_DONE = re.compile(r"Run completed in ([0-9.]+) seconds")
# qemu-io -C: bytes,ops,time,bytes/s,ops/s
_QEMU_IO_LINE = re.compile(r"^(\d+),(\d+),[^,]+,([0-9.]+),([0-9.]+)$", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class Qd1Result:
    """One QD1 FUA run: per-write latencies (s) and what follows from them."""

    latencies_s: tuple[float, ...]

    @property
    def iops(self) -> float:
        return len(self.latencies_s) / sum(self.latencies_s)

    def percentile_us(self, pct: float) -> float:
        return percentile(self.latencies_s, pct) * 1e6


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (``pct`` in 0-100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[int(rank) - 1]


@dataclass(frozen=True, slots=True)
class Spread:
    """Median and range of one figure over the rounds."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))


def qd32_flush_iops(url: str, count: int, *, offset_bytes: int = 0) -> float:
    """4 KiB strided writes at QD32 with a drained SYNCHRONIZE CACHE every 32; IOPS."""
    argv = ["qemu-img", "bench", "-f", "raw", "-t", "none", "-w", "-d", str(QUEUE_DEPTH)]
    argv += ["-s", str(BLOCK_SIZE), "-S", str(STRIDE_BYTES), "-o", str(offset_bytes)]
    argv += [f"--flush-interval={FLUSH_EVERY}", "--pattern=165", "-c", str(count), url]
    out = _run(argv, TOOL_TIMEOUT_S)
    m = _QEMU_DONE.search(out)
    if m is None:
        raise BenchError(f"could not read qemu-img bench's result: {out[-300:]}")
    return count / float(m.group(1))


def fill(url: str, *, chunk_bytes: int, step_bytes: int, count: int) -> None:
    """``count`` writes of ``chunk_bytes`` (pattern 0xa5, never all zeros: the resync sends
    zero blocks as holes) every ``step_bytes`` from offset 0, then a flush."""
    depth = min(8, count)  # qemu-img refuses a flush interval below the depth
    argv = ["qemu-img", "bench", "-f", "raw", "-t", "none", "-w", "-d", str(depth)]
    argv += ["-s", str(chunk_bytes), "-S", str(step_bytes), "--pattern=165", "-c", str(count)]
    argv += [f"--flush-interval={count}", url]
    _run(argv, TOOL_TIMEOUT_S)


def poke(url: str) -> None:
    """One 4 KiB write at offset 0 (no flush)."""
    _run(["qemu-io", "-f", "raw", "-t", "none", "-c", f"write -P 90 0 {BLOCK_SIZE}", url], 60)


def qd1_fua(
    url: str, count: int, size_bytes: int, *, offset_bytes: int = 0, fua: bool = True
) -> Qd1Result:
    """``count`` (≤ :data:`QD1_MAX_WRITES`) FUA writes of 4 KiB one at a time, strided
    (``fua=False``: plain writes, acknowledged into the write cache)."""
    if not 0 < count <= QD1_MAX_WRITES:
        raise BenchError(f"QD1 runs take 1 to {QD1_MAX_WRITES} writes, not {count}")
    argv = ["qemu-io", "-f", "raw", "-t", "none"]
    flag = "-f " if fua else ""
    for i in range(count):
        off = (offset_bytes + i * STRIDE_BYTES) % size_bytes
        argv += ["-c", f"write {flag}-C {off} {BLOCK_SIZE}"]
    out = _run([*argv, url], TOOL_TIMEOUT_S)
    latencies = []
    for m in _QEMU_IO_LINE.finditer(out):
        if int(m.group(1)) != BLOCK_SIZE or int(m.group(2)) != 1 or float(m.group(4)) <= 0:
            raise BenchError(f"unexpected qemu-io report line {m.group(0)!r}")
        latencies.append(1.0 / float(m.group(4)))
    if len(latencies) != count:
        raise BenchError(f"qemu-io reported {len(latencies)} of {count} writes: {out[-300:]}")
    return Qd1Result(tuple(latencies))
