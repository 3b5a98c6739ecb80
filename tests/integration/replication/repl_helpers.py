"""Helpers of the real-process replication tests.

- :class:`VolumeModel` — what every 4 KiB block of a volume may hold, from the client's side:
  the image of the last write that completed, plus the images of writes that were in flight (or
  failed) and so may or may not have landed. It also remembers which images a completed
  SYNCHRONIZE CACHE or FUA made durable, so a mismatch says what kind of loss it is.
- :class:`Workload` — writer threads doing writes, FUA writes and flushes through the project's
  userspace initiator (:class:`IscsiBlockDevice`), each recorded in the model the moment it
  completes; :func:`run_qemu_io` does the same with qemu-io (libiscsi) for variety.
- :func:`settle` — the check run after every fault: every acknowledged write reads back on the
  primary (the whole volume is read and compared block by block), then once every replica is
  in sync (``LocalCluster.wait_in_sync``) each replica's ChecksumVolume equals the primary's and
  the bytes that were read.

Every wait is bounded; the timeouts are generous because the machine is small and shared, the
assertions are exact.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import shutil
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import pytest

from blockyard.attach.initiator import IscsiBlockDevice
from blockyard.replication.report import ReplicaReport, ReplicationInfo
from blockyard.testing.cluster import LocalCluster, ServerProc

T = TypeVar("T")

BLOCK_BYTES = 4096
SECTOR_BYTES = 512
SECTORS_PER_BLOCK = BLOCK_BYTES // SECTOR_BYTES
ZERO_BLOCK = bytes(BLOCK_BYTES)
INITIATOR = "iqn.2026-11.io.blockyard.test:replication"
#: Environment variable that fixes the seed of the seeded tests (printed on failure).
SEED_ENV = "BLOCKYARD_REPL_SEED"
#: Bounds of the waits (the servers share two cores with other test runs).
SYNC_TIMEOUT_S = 90.0
WAIT_TIMEOUT_S = 60.0
POLL_INTERVAL_S = 0.05
JOIN_TIMEOUT_S = 120.0
TOOL_TIMEOUT_S = 120.0
#: I/O queues this long for a path while a killed primary restarts (then fails).
REPLACEMENT_TIMEOUT_S = 60.0
#: Whole-volume reads go in requests of at most this many bytes.
READ_CHUNK_BYTES = 1 << 20

_versions = itertools.count(1)


def next_version() -> int:
    """A process-wide unique write id (itertools.count is atomic under the GIL)."""
    return next(_versions)


def block_image(block: int, version: int) -> bytes:
    """The 4 KiB image write ``version`` puts in ``block``: distinct per (block, write), so a
    stale, misplaced or lost block is identified exactly."""
    return struct.pack("<QQ", block, version) * (BLOCK_BYTES // 16)


def describe_block(data: bytes) -> str:
    if data == ZERO_BLOCK:
        return "zeros"
    block, version = struct.unpack_from("<QQ", data)
    if data == block_image(block, version):
        return f"block {block}'s image of write {version}"
    if data == bytes([data[0]]) * BLOCK_BYTES:
        return f"qemu-io pattern 0x{data[0]:02x}"
    return f"unrecognised bytes {data[:32].hex()}..."


@dataclass(slots=True)
class _Block:
    #: Image and write id of the last write that completed (None: never written).
    acked: bytes | None = None
    acked_id: int = 0
    #: Write id made durable by a completed flush or FUA (0: none).
    durable_id: int = 0
    #: Images of writes in flight or failed: each may or may not have landed.
    maybe: list[bytes] = field(default_factory=list)


class VolumeModel:
    """The client's record of a volume (see the module docstring). Thread-safe.

    Every write that *completed* must read back on the primary even after a kill -9 of the
    primary (the engine's contract: a returned write is in the WAL in the page cache, which
    survives the process); flushed ones must also survive on the replica once it is in sync.
    """

    def __init__(self, block_count: int) -> None:
        self.block_count = block_count
        self._lock = threading.Lock()
        self._blocks: dict[int, _Block] = {}
        self._op_ids = itertools.count(1)
        self.writes = 0
        self.flushes = 0

    def begin(self, images: dict[int, bytes]) -> int:
        """A write of ``images`` (block -> image) is about to be sent; returns its id."""
        with self._lock:
            op_id = next(self._op_ids)
            for b, image in images.items():
                self._blocks.setdefault(b, _Block()).maybe.append(image)
            return op_id

    def end(self, op_id: int, images: dict[int, bytes], *, ok: bool, fua: bool) -> None:
        """The write completed (``ok``) or failed (its images stay possible)."""
        if not ok:
            return
        with self._lock:
            self.writes += 1
            for b, image in images.items():
                st = self._blocks[b]
                st.maybe.remove(image)
                st.acked, st.acked_id = image, op_id
                if fua:
                    st.durable_id = op_id

    def flush_begin(self) -> dict[int, int]:
        """A flush is about to be sent: what it will make durable when it completes."""
        with self._lock:
            return {b: st.acked_id for b, st in self._blocks.items() if st.acked_id}

    def flush_end(self, covered: dict[int, int]) -> None:
        with self._lock:
            self.flushes += 1
            for b, op_id in covered.items():
                st = self._blocks[b]
                st.durable_id = max(st.durable_id, op_id)

    def check(self, block: int, data: bytes) -> str | None:
        """None if ``block`` may hold ``data``; then the model settles on it (call only when no
        write is in flight). Otherwise what went wrong."""
        with self._lock:
            st = self._blocks.get(block)
            acked = ZERO_BLOCK if st is None or st.acked is None else st.acked
            if data == acked or (st is not None and data in st.maybe):
                if st is not None:
                    st.maybe.clear()
                    if data != acked:
                        st.acked, st.acked_id = data, next(self._op_ids)
                return None
            found = describe_block(data)
            if st is None or st.acked is None:
                return f"block {block}: never acknowledged as written, yet holds {found}"
            kind = (
                "a write made durable by a completed SYNCHRONIZE CACHE/FUA"
                if st.durable_id >= st.acked_id
                else "an acknowledged (not yet flushed) write"
            )
            return (
                f"block {block}: lost {kind}: expected {describe_block(st.acked)} "
                f"(op {st.acked_id}, durable up to op {st.durable_id}), found {found}"
            )

    def verify(self, device: IscsiBlockDevice) -> str:
        """Read the whole volume through ``device`` and check every block (no I/O may be in
        flight). Returns the sha256 of the bytes read; raises AssertionError on a mismatch."""
        digest = hashlib.sha256()
        errors: list[str] = []
        step = min(READ_CHUNK_BYTES // SECTOR_BYTES, device.max_transfer_blocks)
        step -= step % SECTORS_PER_BLOCK
        total = self.block_count * SECTORS_PER_BLOCK
        assert device.block_count == total, (device.block_count, total)
        for lba in range(0, total, step):
            data = device.read(lba, min(step, total - lba))
            digest.update(data)
            first = lba // SECTORS_PER_BLOCK
            for i in range(len(data) // BLOCK_BYTES):
                error = self.check(first + i, data[i * BLOCK_BYTES : (i + 1) * BLOCK_BYTES])
                if error is not None:
                    errors.append(error)
        if errors:
            shown = "\n  ".join(errors[:20])
            raise AssertionError(f"{len(errors)} blocks read back wrong on the primary:\n  {shown}")
        return digest.hexdigest()


class Workload:
    """Writer threads on one device, recorded in a model (see the module docstring).

    The region ``[first_block, first_block + block_count)`` is cut into extents of
    ``extent_blocks``; thread ``t`` owns the extents whose index is ``t`` modulo ``threads``,
    so no block ever has two writes in flight and the model stays exact. Each operation is a
    flush (probability ``flush_p``) or a write of 1..extent_blocks blocks inside one extent,
    FUA with probability ``fua_p``. ``pace_s`` sleeps between operations.
    """

    def __init__(
        self,
        device: IscsiBlockDevice,
        model: VolumeModel,
        seed: int | str,
        *,
        first_block: int = 0,
        block_count: int | None = None,
        threads: int = 2,
        extent_blocks: int = 8,
        flush_p: float = 0.1,
        fua_p: float = 0.1,
        pace_s: float = 0.0,
    ) -> None:
        count = model.block_count - first_block if block_count is None else block_count
        self.device = device
        self.model = model
        self.seed = seed
        self.first_block = first_block
        self.extent_blocks = extent_blocks
        self.extents = count // extent_blocks
        self.threads_count = threads
        self.flush_p = flush_p
        self.fua_p = fua_p
        self.pace_s = pace_s
        self.stop_flag = threading.Event()
        self.errors: list[BaseException] = []
        self.ops = 0
        self._ops_lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self) -> Workload:
        self.stop_flag.clear()
        self._threads = [
            threading.Thread(target=self._run, args=(t,), name=f"writer-{t}", daemon=True)
            for t in range(self.threads_count)
        ]
        for th in self._threads:
            th.start()
        return self

    def stop(self) -> None:
        """Stop and join (bounded); raises the first error a writer met."""
        self.stop_flag.set()
        for th in self._threads:
            th.join(JOIN_TIMEOUT_S)
            assert not th.is_alive(), f"{th.name} did not finish within {JOIN_TIMEOUT_S} s"
        if self.errors:
            raise AssertionError(f"a writer failed: {self.errors[0]!r}") from self.errors[0]

    def wait_ops(self, count: int, timeout_s: float = WAIT_TIMEOUT_S) -> None:
        """Until the writers completed ``count`` more operations."""
        target = self.ops + count
        wait_for(lambda: self.ops >= target or bool(self.errors), timeout_s, "writer progress")
        if self.errors:
            raise AssertionError(f"a writer failed: {self.errors[0]!r}") from self.errors[0]

    def _run(self, t: int) -> None:
        rng = random.Random(f"{self.seed}:{t}")
        mine = list(range(t, self.extents, self.threads_count))
        try:
            while not self.stop_flag.is_set() and mine:
                if rng.random() < self.flush_p:
                    covered = self.model.flush_begin()
                    self.device.flush()
                    self.model.flush_end(covered)
                else:
                    ext = self.first_block + rng.choice(mine) * self.extent_blocks
                    offset = rng.randrange(self.extent_blocks)
                    start = ext + offset
                    count = rng.randint(1, self.extent_blocks - offset)
                    self.write(start, count, fua=rng.random() < self.fua_p)
                with self._ops_lock:
                    self.ops += 1
                if self.pace_s:
                    time.sleep(self.pace_s)
        except BaseException as exc:  # reported by stop()/wait_ops()
            self.errors.append(exc)

    def write(self, start: int, count: int, *, fua: bool) -> None:
        version = next_version()
        images = {b: block_image(b, version) for b in range(start, start + count)}
        data = b"".join(images.values())
        op_id = self.model.begin(images)
        ok = False
        try:
            self.device.write(start * SECTORS_PER_BLOCK, data, fua=fua)
            ok = True
        finally:
            self.model.end(op_id, images, ok=ok, fua=fua)


def fill(device: IscsiBlockDevice, model: VolumeModel, extents: Iterable[tuple[int, int]]) -> int:
    """Write every block of ``extents`` (first block, count) in writes of up to 1 MiB, then
    flush. Returns the bytes written."""
    step = min(READ_CHUNK_BYTES // SECTOR_BYTES, device.max_transfer_blocks) // SECTORS_PER_BLOCK
    written = 0
    for first, count in extents:
        for b in range(first, first + count, step):
            n = min(step, first + count - b)
            version = next_version()
            images = {x: block_image(x, version) for x in range(b, b + n)}
            op_id = model.begin(images)
            device.write(b * SECTORS_PER_BLOCK, b"".join(images.values()))
            model.end(op_id, images, ok=True, fua=False)
            written += n * BLOCK_BYTES
    covered = model.flush_begin()
    device.flush()
    model.flush_end(covered)
    return written


def fill_range(device: IscsiBlockDevice, model: VolumeModel, first: int, count: int) -> int:
    """``count`` blocks from ``first`` in 64 KiB writes (one WAL record each), then a flush."""
    return fill(
        device, model, [(b, min(16, first + count - b)) for b in range(first, first + count, 16)]
    )


# ---- qemu-io --------------------------------------------------------------------------------


def require_qemu_io() -> None:
    if shutil.which("qemu-io") is None:
        pytest.skip("qemu-io not installed: apt-get install qemu-utils qemu-block-extra")


@dataclass
class QemuJob:
    """One qemu-io run: its commands and, per block, the image each command leaves."""

    url: str
    commands: list[str]
    #: In command order: (blocks -> image, fua) per write; None for a flush.
    steps: list[tuple[dict[int, bytes], bool] | None]


def qemu_job(url: str, rng: random.Random, first_block: int, block_count: int, ops: int) -> QemuJob:
    """Random qemu-io writes (pattern, FUA, write-zeroes with unmap) and flushes within the
    region, ending with a flush."""
    commands: list[str] = []
    steps: list[tuple[dict[int, bytes], bool] | None] = []
    for _ in range(ops):
        r = rng.random()
        if r < 0.15:
            commands.append("flush")
            steps.append(None)
            continue
        count = rng.randint(1, 4)
        b = first_block + rng.randrange(block_count - count + 1)
        off, length = b * BLOCK_BYTES, count * BLOCK_BYTES
        if r < 0.3:
            commands.append(f"write -q -z -u {off} {length}")
            steps.append(({x: ZERO_BLOCK for x in range(b, b + count)}, False))
            continue
        pattern = rng.randint(1, 255)
        fua = r < 0.45
        commands.append(f"write -q {'-f ' if fua else ''}-P {pattern} {off} {length}")
        steps.append(({x: bytes([pattern]) * BLOCK_BYTES for x in range(b, b + count)}, fua))
    commands.append("flush")
    steps.append(None)
    return QemuJob(url, commands, steps)


def run_qemu_io(job: QemuJob, model: VolumeModel) -> None:
    """Run ``job`` and record it: every write may land while it runs; all of them are
    acknowledged (and the final flush durable) once qemu-io exits 0."""
    pending = [(model.begin(step[0]), step[0], step[1]) for step in job.steps if step is not None]
    # qemu-io defaults to writethrough (every write FUA); writeback leaves FUA to "-f".
    args = ["qemu-io", "-f", "raw", "-t", "writeback"]
    for command in job.commands:
        args += ["-c", command]
    res = subprocess.run(
        [*args, job.url], check=False, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S
    )
    ok = res.returncode == 0 and "error" not in (res.stdout + res.stderr).lower()
    for op_id, images, fua in pending:
        model.end(op_id, images, ok=ok, fua=fua)
    if ok:
        # The job ends with a flush: its own writes are durable (others' are not claimed).
        mine = {b for step in job.steps if step is not None for b in step[0]}
        model.flush_end({b: i for b, i in model.flush_begin().items() if b in mine})
    assert ok, f"qemu-io failed ({res.returncode}): {res.stdout}{res.stderr}"


# ---- cluster helpers ------------------------------------------------------------------------


def wait_for(predicate: Callable[[], T], timeout_s: float, what: str) -> T:
    """Poll ``predicate`` until it returns something truthy (bounded)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not reached within {timeout_s} s")
        time.sleep(POLL_INTERVAL_S)


def replication(server: ServerProc, name: str) -> ReplicationInfo:
    return server.call(lambda c: c.get_replication(name))


def show(*reports: ReplicaReport) -> str:
    """Replica reports in full, for assertion messages (pytest shortens long reprs)."""
    return "\n".join(
        f"{r.address}: state={r.state} connected={r.connected} phase={r.phase} plan={r.plan} "
        f"({r.plan_reason}) acked_lsn={r.acked_lsn} resync {r.resync_done_blocks}/"
        f"{r.resync_total_blocks} blocks, {r.resync_bytes} bytes; last error: {r.last_error}"
        for r in reports
    )


def replica_report(cluster: LocalCluster, name: str, primary: int, replica: int) -> ReplicaReport:
    info = replication(cluster.servers[primary], name)
    report = info.replica(cluster.servers[replica].replication_address)
    assert report is not None, f"{name}: no replica {replica} in {info}"
    return report


def wait_report(
    cluster: LocalCluster,
    name: str,
    predicate: Callable[[ReplicaReport], bool],
    what: str,
    *,
    primary: int = 0,
    replica: int = 1,
    timeout_s: float = WAIT_TIMEOUT_S,
) -> ReplicaReport:
    """Poll GetReplication on the primary until the replica's report satisfies ``predicate``."""
    last: list[ReplicaReport] = []

    def probe() -> ReplicaReport | None:
        report = replica_report(cluster, name, primary, replica)
        last[:] = [report]
        return report if predicate(report) else None

    try:
        return wait_for(probe, timeout_s, what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last report: {show(*last)}") from None


def open_device(server: ServerProc, name: str) -> IscsiBlockDevice:
    """The userspace initiator on the server's portal; I/O queues across a restart of it."""
    iqn = server.call(lambda c: c.get_volume(name)).export.iqn
    return IscsiBlockDevice.connect(
        [server.portal], iqn, INITIATOR, replacement_timeout_s=REPLACEMENT_TIMEOUT_S
    )


def qemu_url(server: ServerProc, name: str) -> str:
    iqn = server.call(lambda c: c.get_volume(name)).export.iqn
    return f"iscsi://{server.portal}/{iqn}/0"


def kill_replica(cluster: LocalCluster, name: str, *, primary: int = 0, replica: int = 1) -> None:
    """SIGKILL the replica's server and wait until the primary saw the connection drop (so a
    later report is about the next session)."""
    cluster.servers[replica].kill()
    wait_report(
        cluster,
        name,
        lambda r: not r.connected,
        f"{name}: the primary noticing that replica {replica} died",
        primary=primary,
        replica=replica,
    )


def settle(
    cluster: LocalCluster,
    device: IscsiBlockDevice,
    model: VolumeModel,
    name: str,
    *,
    primary: int = 0,
    replicas: Sequence[int] = (1,),
) -> str:
    """The check after a fault, with no I/O in flight: every acknowledged write reads back on
    the primary; once every replica is in sync, each holds exactly the primary's bytes.
    Returns the volume's sha256."""
    read_sha = model.verify(device)
    # sync_all: the flush completes once every in-sync replica is durable up to the primary's
    # newest LSN; after wait_in_sync, the second one covers a replica that just came back.
    device.flush()
    cluster.wait_in_sync(name, primary=primary, timeout_s=SYNC_TIMEOUT_S)
    device.flush()
    p_sha, p_lsn = cluster.checksum(name, primary)
    assert p_sha == read_sha, (
        f"{name}: ChecksumVolume on the primary {p_sha} differs from the bytes read over "
        f"iSCSI {read_sha}"
    )
    for r in replicas:
        r_sha, r_lsn = cluster.checksum(name, r)
        assert (r_sha, r_lsn) == (p_sha, p_lsn), (
            f"{name}: replica {r} holds sha256 {r_sha} at LSN {r_lsn}, the primary {p_sha} at "
            f"LSN {p_lsn}"
        )
    return p_sha


def freeze(server: ServerProc) -> None:
    """SIGSTOP: the server stops answering but keeps its sockets open (a hung peer)."""
    assert server.process is not None and server.running
    server.process.send_signal(signal.SIGSTOP)


def thaw(server: ServerProc) -> None:
    assert server.process is not None
    server.process.send_signal(signal.SIGCONT)


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """``fn()`` and how long it took (monotonic seconds)."""
    started = time.monotonic()
    value = fn()
    return value, time.monotonic() - started
