"""``blockyard bench failover``: time from kill -9 of a volume's primary to the first completed
I/O, through blockyard's userspace multipath initiator.

A real ``blockyard master`` (SQLite store) and three real ``blockyard serve --master`` processes;
a 2-replica sync_all volume; :class:`Workload` threads (QD = thread count) write
self-describing 4 KiB blocks (block number, sequence, CRC32C) and read them back, issuing
SYNCHRONIZE CACHE every few writes. A write is *acknowledged* once a flush that started after
it completed returned (SBC-4 §5.22: the flush covers every write completed before it) — also
when the dead primary completed the write and the flush completed on the new one: sync_all
acknowledges a write only once the replicas received it, so the promoted copy holds it. Those
writes are counted apart (``crossed``), and how many of them were lost. A round
(:func:`fail_over_once`) kills the primary's server and measures the gap; with ``restart`` it
then starts the killed server on the same ports and data directory and waits until it is back
in sync (and the initiator has its path again), so the next kill has two copies to fail over
between. The bench runs each kill on a fresh cluster (see :func:`run_failover_bench`).

The same harness drives the integration test (``tests/integration/master/test_failover_io.py``),
which adds the correctness checks: every acknowledged write reads back, epochs only go up, and
no epoch ever has two primaries.
"""

from __future__ import annotations

import asyncio
import os
import queue
import random
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import crc32c

from blockyard import tls
from blockyard.attach.initiator import IscsiBlockDevice, IscsiVolumeSpec, parse_portal
from blockyard.engine.epoch import Role
from blockyard.errors import BlockyardError
from blockyard.master.client import MasterClient
from blockyard.master.proto import master_pb2 as mpb
from blockyard.server.client import VolumeServerClient
from blockyard.server.proto import volume_server_pb2 as vpb

BLOCK_BYTES = 4096
#: SBC-4 logical blocks are 512 bytes on every blockyard LU; 4 KiB blocks are 8 of them.
SECTORS_PER_BLOCK = BLOCK_BYTES // 512
#: block u64 | sequence u64 | crc32c u32 of the whole block with this field zeroed.
_HEADER = struct.Struct("<QQI")
_CRC_AT = 16
VOLUME_NAME = "failover"
VOLUME_SIZE_BYTES = 64 << 20
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
#: Longest wait for a failover, a restart or a resync on a loaded 2-core machine.
WAIT_S = 90.0
POLL_S = 0.05
#: Goal of issue 13 §5 with the default 2 s lease.
GOAL_MEDIAN_S = 3.0
GOAL_MAX_S = 5.0
INITIATOR_NAME = "iqn.2026-11.io.blockyard.bench:failover"

T = TypeVar("T")


class FailoverBenchError(BlockyardError):
    """The failover harness could not set up or observe the cluster."""


def make_block(block: int, sequence: int) -> bytes:
    """A 4 KiB block naming itself: its number, the write's sequence, a checksum over both and
    a pattern derived from them (so a block from another write or another place fails)."""
    body = bytearray(BLOCK_BYTES)
    fill = struct.pack("<QQ", block, sequence)
    body[_HEADER.size :] = (fill * (BLOCK_BYTES // len(fill) + 1))[: BLOCK_BYTES - _HEADER.size]
    _HEADER.pack_into(body, 0, block, sequence, 0)
    struct.pack_into("<I", body, _CRC_AT, crc32c.crc32c(bytes(body)))
    return bytes(body)


def parse_block(data: bytes) -> tuple[int, int] | None:
    """``(block, sequence)`` of a block written by :func:`make_block`; None for a never-written
    (all-zero) block. Raises :class:`FailoverBenchError` for anything else."""
    if not any(data):
        return None
    block, sequence, crc = _HEADER.unpack_from(data)
    blank = bytearray(data)
    struct.pack_into("<I", blank, _CRC_AT, 0)
    if crc32c.crc32c(bytes(blank)) != crc or data != make_block(block, sequence):
        raise FailoverBenchError(
            f"a block failed its checksum (claims block {block} seq {sequence})"
        )
    return block, sequence


# ---- processes ---------------------------------------------------------------------------


@dataclass
class Proc:
    """One ``blockyard`` child process and the fields of its READY line."""

    process: subprocess.Popen[str]
    fields: dict[str, str]
    args: list[str]
    log: Path
    wrapper: tuple[str, ...] = ()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT_S)
            if self.process.stdout is not None:
                self.process.stdout.close()


def launch(args: list[str], log: Path, *, wrapper: Sequence[str] = ()) -> Proc:
    """Start ``blockyard ARGS`` (under ``wrapper``, e.g. ``ip netns exec NS``) and wait
    (bounded) for its READY line."""
    cmd = [*wrapper, sys.executable, "-m", "blockyard.cli.main", "--log-level", "INFO", *args]
    with log.open("a") as err:
        process = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
    assert process.stdout is not None
    stdout = process.stdout
    lines: queue.Queue[str] = queue.Queue(maxsize=1)
    threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
    proc = Proc(process, {}, args, log, tuple(wrapper))
    try:
        line = lines.get(timeout=START_TIMEOUT_S)
    except queue.Empty as exc:
        proc.stop(signal.SIGKILL)
        raise FailoverBenchError(f"blockyard {args[0]} printed nothing; see {log}") from exc
    if not line.startswith("READY "):
        proc.stop(signal.SIGKILL)
        raise FailoverBenchError(f"blockyard {args[0]} did not start ({line.strip()!r}); see {log}")
    proc.fields = dict(part.split("=", 1) for part in line.split()[1:])
    return proc


def wait_for(what: str, check: Callable[[], bool], timeout_s: float = WAIT_S) -> float:
    """Poll ``check`` until it holds; seconds waited. Raises after ``timeout_s``."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout_s:
            raise FailoverBenchError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(POLL_S)
    return time.monotonic() - start


class Cluster:
    """A master and ``server_count`` volume servers under ``root``. Thread-safe calls (each
    runs its own short event loop)."""

    #: How the harness dials the master and the servers (plaintext on loopback here;
    #: subclasses that put processes on other addresses say ``insecure``).
    security: tls.TransportSecurity = tls.PLAINTEXT

    def __init__(
        self,
        root: Path,
        *,
        server_count: int = 3,
        lease_ttl_s: float = 2.0,
        heartbeat_interval_s: float = 0.5,
    ) -> None:
        self._prepare(root)
        interval = f"{int(heartbeat_interval_s * 1000)}ms"
        try:
            self.master = launch(
                [
                    "master",
                    "--listen",
                    "127.0.0.1:0",
                    "--store",
                    f"sqlite:///{root}/master.db",
                    "--lease-ttl",
                    f"{lease_ttl_s}s",
                    "--heartbeat-interval",
                    interval,
                ],
                self.logs / "master.log",
            )
            self._procs.append(self.master)
            self.address = self.master.fields["master"]
            started = []
            for i in range(server_count):
                s = launch(
                    [
                        "serve",
                        "--data-dir",
                        str(root / f"s{i}"),
                        "--api-listen",
                        "127.0.0.1:0",
                        "--iscsi-listen",
                        "127.0.0.1:0",
                        "--replication-listen",
                        "127.0.0.1:0",
                        "--master",
                        self.address,
                        "--heartbeat-interval",
                        interval,
                    ],
                    self.logs / f"serve-{i}.log",
                )
                self._procs.append(s)
                started.append(s)
            wait_for(f"{server_count} alive servers", lambda: len(self.alive()) == server_count)
            for server in self.list_servers():
                self.servers[server.server_id] = next(
                    p for p in started if p.fields["api"] == server.addresses.api
                )
        except BaseException:
            self.close()
            raise

    def _prepare(self, root: Path) -> None:
        """What every cluster starts with (subclasses that launch their own processes call
        it first): its directories, no process yet, and the control loop."""
        self.root = root
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self._procs: list[Proc] = []
        self.servers: dict[str, Proc] = {}  # server id → its current process
        self._start_control_loop()

    def _start_control_loop(self) -> None:
        # grpc.aio channels belong to one event loop: every control call from any thread runs
        # on this one.
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(
            target=self._loop.run_forever, name="failover-control", daemon=True
        )
        self._loop_thread.start()

    def close(self) -> None:
        for p in reversed(self._procs):
            p.stop(signal.SIGKILL)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join(timeout=STOP_TIMEOUT_S)
        if not self._loop_thread.is_alive():
            self._loop.close()

    def _run(self, coro: Coroutine[object, object, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=WAIT_S)

    def _master(self, call: Callable[[MasterClient], object]) -> object:
        async def main() -> object:
            async with MasterClient(self.address, timeout_s=10.0, security=self.security) as client:
                return await call(client)  # type: ignore[misc]

        return self._run(main())

    def list_servers(self) -> list[mpb.ServerInfo]:
        out = self._master(lambda c: c.list_servers())
        assert isinstance(out, list)
        return out

    def alive(self) -> set[str]:
        return {s.server_id for s in self.list_servers() if s.state == "alive"}

    def get_volume(self, name: str) -> mpb.VolumeInfo:
        out = self._master(lambda c: c.get_volume(name))
        assert isinstance(out, mpb.VolumeInfo)
        return out

    def create_volume(
        self,
        name: str,
        size_bytes: int,
        *,
        replicas: int = 2,
        mode: int = vpb.DURABILITY_MODE_SYNC_ALL,
    ) -> mpb.VolumeInfo:
        out = self._master(
            lambda c: c.create_volume(name, size_bytes, replica_count=replicas, mode=mode)
        )
        assert isinstance(out, mpb.VolumeInfo)
        return out

    def server_role(self, server_id: str, name: str) -> tuple[Role, int] | None:
        """The (role, epoch) a server reports for the volume; None when it does not answer."""

        async def main() -> tuple[Role, int]:
            async with VolumeServerClient(
                self.servers[server_id].fields["api"], timeout_s=2.0, security=self.security
            ) as c:
                d = await c.get_volume(name)
                return d.role, d.epoch

        try:
            return self._run(main())
        except BlockyardError:
            return None

    def kill(self, server_id: str, then: Callable[[float], None] | None = None) -> float:
        """kill -9 the server; the monotonic time of the kill, also handed to ``then`` at once
        (before reaping the process)."""
        proc = self.servers[server_id]
        proc.process.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        if then is not None:
            then(killed)
        proc.stop(signal.SIGKILL)
        return killed

    def restart(self, server_id: str, replication: str) -> None:
        """Start the server again on its data directory and its old ports (so the initiator's
        path to it comes back without a new NodeStage)."""
        old = self.servers[server_id]
        args = list(old.args)
        args[args.index("--api-listen") + 1] = old.fields["api"]
        args[args.index("--iscsi-listen") + 1] = old.fields["iscsi"].split(",")[0]
        args[args.index("--replication-listen") + 1] = replication
        proc = launch(args, old.log, wrapper=old.wrapper)
        self._procs.append(proc)
        self.servers[server_id] = proc


# ---- the workload --------------------------------------------------------------------------


@dataclass
class _BlockState:
    acked: int = 0  # highest sequence covered by a completed flush
    crossed: int = 0  # highest sequence completed before a kill and flushed after it
    issued: int = 0  # highest sequence submitted


@dataclass
class Workload:
    """``threads`` threads doing I/O on one device, each on its own blocks (block % threads),
    so the order of writes to a block is the order one thread issued them. Every
    ``flush_every`` writes a thread flushes; ``read_percent`` of operations are reads that
    check what they get."""

    device: IscsiBlockDevice
    block_count: int
    seed: int
    threads: int = 8
    flush_every: int = 4
    read_percent: int = 30
    errors: list[str] = field(default_factory=list)
    ops_done: int = 0
    #: Writes completed before a kill whose covering flush completed after it.
    crossed: int = 0
    #: Blocks whose newest such write was found lost by :meth:`verify_all` (counted once per
    #: check).
    crossed_lost: int = 0
    _blocks: dict[int, _BlockState] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)
    _seq: int = 0
    _mark_s: float | None = None
    _first_after_mark_s: float | None = None
    _marked: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        self._blocks = {b: _BlockState() for b in range(self.block_count)}
        for i in range(self.threads):
            t = threading.Thread(target=self._run, args=(i,), name=f"io-{i}", daemon=True)
            self._workers.append(t)
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._workers:
            t.join(timeout=WAIT_S)
            if t.is_alive():
                raise FailoverBenchError(f"{t.name} did not stop within {WAIT_S} s")

    def mark(self, at_s: float) -> None:
        """Start timing: :meth:`gap_s` waits for the first I/O submitted at or after ``at_s``
        to complete (an upper bound on when I/O resumed, by at most one I/O's latency)."""
        with self._lock:
            self._mark_s = at_s
            self._first_after_mark_s = None
            self._marked.clear()

    def gap_s(self, timeout_s: float = WAIT_S) -> float:
        if not self._marked.wait(timeout_s):
            raise FailoverBenchError(f"no I/O completed within {timeout_s} s of the kill")
        with self._lock:
            assert self._first_after_mark_s is not None and self._mark_s is not None
            return self._first_after_mark_s - self._mark_s

    def _done(self, submitted_s: float) -> None:
        now = time.monotonic()
        with self._lock:
            self.ops_done += 1
            mark = self._mark_s
            if mark is not None and submitted_s >= mark and self._first_after_mark_s is None:
                self._first_after_mark_s = now
                self._marked.set()

    def _acknowledge(self, covered: list[tuple[int, int, float]]) -> None:
        """A flush returned: the writes it covers are acknowledged. Those the old primary may
        have completed (before the first I/O completed after the kill) while the flush
        completed after the kill (on the new primary) are counted in ``crossed`` as well: the
        case a write acknowledged before its replicas received it would lose (see
        docs/benchmarks.md "Failover")."""
        flushed_s = time.monotonic()
        with self._lock:
            mark, resumed = self._mark_s, self._first_after_mark_s
            for b, s, done_s in covered:
                if mark is not None and flushed_s > mark and (resumed is None or done_s < resumed):
                    self.crossed += 1
                    self._blocks[b].crossed = max(self._blocks[b].crossed, s)
                state = self._blocks[b]
                state.acked = max(state.acked, s)

    def _next_seq(self) -> int:
        with self._lock:
            self._seq += 1
            return self._seq

    def _run(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        mine = list(range(index, self.block_count, self.threads))
        # Completed writes not yet covered by a flush: (block, sequence, completion time).
        written: list[tuple[int, int, float]] = []
        while not self._stop.is_set():
            block = rng.choice(mine)
            submitted = time.monotonic()
            try:
                if rng.randrange(100) < self.read_percent:
                    self.check_block(block)
                else:
                    seq = self._next_seq()
                    with self._lock:
                        self._blocks[block].issued = seq
                    self.device.write(block * SECTORS_PER_BLOCK, make_block(block, seq))
                    written.append((block, seq, time.monotonic()))
                    if len(written) >= self.flush_every:
                        covered, written = written, []
                        self._done(submitted)
                        submitted = time.monotonic()
                        self.device.flush()
                        self._acknowledge(covered)
            except BlockyardError as exc:
                with self._lock:
                    self.errors.append(f"{time.monotonic():.3f} {type(exc).__name__}: {exc}")
                self._stop.wait(0.1)
                continue
            self._done(submitted)

    def check_block(self, block: int) -> None:
        """Read one block and check it holds a write to it no older than the newest
        acknowledged one (and no newer than the newest issued)."""
        with self._lock:
            acked = self._blocks[block].acked
        data = self.device.read(block * SECTORS_PER_BLOCK, SECTORS_PER_BLOCK)
        with self._lock:
            issued = self._blocks[block].issued
        self._check(block, data, acked, issued)

    def verify_all(self) -> int:
        """Read every block back in large reads; the number of blocks checked."""
        with self._lock:
            acked = {b: s.acked for b, s in self._blocks.items()}
            crossed = {b: s.crossed for b, s in self._blocks.items()}
        step = 256
        datas: dict[int, bytes] = {}
        for first in range(0, self.block_count, step):
            n = min(step, self.block_count - first)
            raw = self.device.read(first * SECTORS_PER_BLOCK, n * SECTORS_PER_BLOCK)
            for i in range(n):
                datas[first + i] = raw[i * BLOCK_BYTES : (i + 1) * BLOCK_BYTES]
        with self._lock:
            issued = {b: s.issued for b, s in self._blocks.items()}
        for b, data in datas.items():
            self._check(b, data, acked[b], issued[b])
            found = parse_block(data)
            if crossed[b] > max(acked[b], 0 if found is None else found[1]):
                self.crossed_lost += 1
        return len(datas)

    @staticmethod
    def _check(block: int, data: bytes, acked: int, issued: int) -> None:
        found = parse_block(data)
        seq = 0 if found is None else found[1]
        if found is not None and found[0] != block:
            raise FailoverBenchError(f"block {block} holds block {found[0]}'s data (seq {seq})")
        if not acked <= seq <= issued:
            raise FailoverBenchError(
                f"block {block} reads sequence {seq}; acknowledged {acked}, newest issued {issued}"
                " (an acknowledged write was lost)"
            )


# ---- rounds --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Round:
    killed: str
    promoted: str
    epoch_before: int
    epoch_after: int
    gap_s: float
    resync_s: float


@dataclass
class Observer:
    """Polls the master and every server in the background: the (epoch, primary) sequence the
    master reported and, per epoch, every server that reported itself primary in it."""

    cluster: Cluster
    name: str
    interval_s: float = 0.2
    master_history: list[tuple[int, str]] = field(default_factory=list)
    primaries_by_epoch: dict[int, set[str]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="observer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=WAIT_S)

    def sample(self) -> None:
        try:
            info = self.cluster.get_volume(self.name)
        except BlockyardError:
            info = None
        if info is not None and (
            not self.master_history
            or self.master_history[-1] != (info.epoch, info.primary_server_id)
        ):
            self.master_history.append((info.epoch, info.primary_server_id))
        for sid in list(self.cluster.servers):
            got = self.cluster.server_role(sid, self.name)
            if got is not None and got[0] == Role.PRIMARY:
                self.primaries_by_epoch.setdefault(got[1], set()).add(sid)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()


def not_in_sync(cluster: Cluster, name: str, device: IscsiBlockDevice) -> str:
    """Why the volume is not ready for the next kill ("" when it is): every copy in sync at
    the volume's epoch, the roles applied on every server, and the initiator connected to
    every copy."""
    info = cluster.get_volume(name)
    states = [(c.server_id[:8], c.state) for c in info.copies]
    in_sync = [c.state for c in info.copies] == ["in_sync"] * info.replica_count
    if info.status != "active" or not in_sync:
        return f"master: {info.status} epoch {info.epoch} copies {states}"
    roles = {c.server_id: cluster.server_role(c.server_id, name) for c in info.copies}
    want = {
        c.server_id: (Role.PRIMARY if c.role == vpb.ROLE_PRIMARY else Role.REPLICA, info.epoch)
        for c in info.copies
    }
    if roles != want:
        return f"servers report {roles}, the master wants {want}"
    paths = device.paths()
    if not all(p.connected for p in paths):
        return f"initiator paths {paths}"
    return ""


def wait_in_sync(
    cluster: Cluster, name: str, device: IscsiBlockDevice, timeout_s: float = WAIT_S
) -> None:
    last = ["not checked"]

    def check() -> bool:
        last[0] = not_in_sync(cluster, name, device)
        return not last[0]

    try:
        wait_for("every copy in sync", check, timeout_s)
    except FailoverBenchError as exc:
        raise FailoverBenchError(f"{exc}; last: {last[0]}") from exc


def fail_over_once(
    cluster: Cluster,
    workload: Workload,
    name: str,
    rng: random.Random,
    *,
    restart: bool = True,
    resync_timeout_s: float = WAIT_S,
) -> Round:
    """One round: let I/O run, kill -9 the primary, time the gap; with ``restart``, start the
    killed server again and wait until it is back in sync (and the initiator has its path)."""
    before = cluster.get_volume(name)
    ops = workload.ops_done
    wait_for("I/O before the kill", lambda: workload.ops_done > ops + 16)
    time.sleep(rng.uniform(0.1, 0.8))
    primary = before.primary_server_id
    replication = next(
        s.addresses.replication for s in cluster.list_servers() if s.server_id == primary
    )
    cluster.kill(primary, then=workload.mark)
    gap_s = workload.gap_s()
    wait_for("a new epoch on the master", lambda: cluster.get_volume(name).epoch > before.epoch)
    after = cluster.get_volume(name)
    resync_s = 0.0
    if restart:
        cluster.restart(primary, replication)
        started = time.monotonic()
        wait_in_sync(cluster, name, workload.device, resync_timeout_s)
        resync_s = time.monotonic() - started
    return Round(
        killed=primary,
        promoted=after.primary_server_id,
        epoch_before=before.epoch,
        epoch_after=after.epoch,
        gap_s=gap_s,
        resync_s=resync_s,
    )


@contextmanager
def failover_setup(
    root: Path,
    *,
    seed: int,
    threads: int,
    lease_ttl_s: float = 2.0,
    replicas: int = 2,
    mode: int = vpb.DURABILITY_MODE_SYNC_ALL,
) -> Iterator[tuple[Cluster, Workload]]:
    """A cluster, the volume (``replicas`` copies in ``mode``) in sync, an attached device and
    a running workload."""
    cluster = Cluster(root, lease_ttl_s=lease_ttl_s)
    device: IscsiBlockDevice | None = None
    workload: Workload | None = None
    try:
        cluster.create_volume(VOLUME_NAME, VOLUME_SIZE_BYTES, replicas=replicas, mode=mode)
        wait_for(
            "the volume active with its target name reported",
            lambda: (v := cluster.get_volume(VOLUME_NAME)).status == "active" and bool(v.iqn),
        )
        info = cluster.get_volume(VOLUME_NAME)
        # Every copy's portal, the primary first: what NodeStage hands the initiator.
        portals = tuple(parse_portal(p) for c in info.copies for p in c.addresses.iscsi_portals)
        device = IscsiBlockDevice(
            IscsiVolumeSpec(portals=portals, target_name=info.iqn, initiator_name=INITIATOR_NAME)
        )
        wait_in_sync(cluster, VOLUME_NAME, device)
        workload = Workload(device, block_count=1024, seed=seed, threads=threads)
        workload.start()
        yield cluster, workload
    finally:
        if workload is not None:
            workload.stop()
        if device is not None:
            device.close()
        cluster.close()


def summary(gaps_s: list[float]) -> str:
    return (
        f"min {min(gaps_s):.2f} s, median {statistics.median(gaps_s):.2f} s, "
        f"max {max(gaps_s):.2f} s over {len(gaps_s)} kills"
    )


def run_failover_bench(directory: str | None, *, kills: int, seed: int, threads: int = 8) -> int:
    """Print one line per kill and the verdict against the goal; 0 when every check passed.

    Each kill runs on a fresh cluster and volume: a killed primary restarted on its data
    directory does not come back in sync today (its catch-up stalls; see docs/benchmarks.md),
    so a second kill on the same volume would find no in-sync copy to promote."""
    rng = random.Random(seed)
    print(f"seed {seed}; QD{threads}; lease 2 s; 2-replica sync_all; {kills} kills", flush=True)
    gaps: list[float] = []
    errors: list[str] = []
    checked = crossed = crossed_lost = 0
    for i in range(kills):
        with (
            tempfile.TemporaryDirectory(prefix="bench-failover-", dir=directory or "/var/tmp") as d,
            failover_setup(Path(d), seed=seed + i, threads=threads) as (cluster, workload),
        ):
            r = fail_over_once(cluster, workload, VOLUME_NAME, rng, restart=False)
            checked += workload.verify_all()
            errors += workload.errors
            crossed += workload.crossed
            crossed_lost += workload.crossed_lost
        gaps.append(r.gap_s)
        print(
            f"kill {i + 1:2d}: epoch {r.epoch_before}->{r.epoch_after}, "
            f"first I/O {r.gap_s:.2f} s after kill -9",
            flush=True,
        )
    median, worst = statistics.median(gaps), max(gaps)
    met = median <= GOAL_MEDIAN_S and worst <= GOAL_MAX_S
    print(f"kill -9 to first completed I/O: {summary(gaps)}")
    print(
        f"goal median <= {GOAL_MEDIAN_S:.0f} s, max <= {GOAL_MAX_S:.0f} s: "
        f"{'met' if met else 'not met'}"
    )
    print(f"I/O errors: {len(errors)}; {checked} blocks read back after failover, all held")
    print(
        f"writes completed before a kill whose flush completed after it (acknowledged, "
        f"counted apart): {crossed}; blocks where such a write was lost: {crossed_lost}"
    )
    for e in errors[:10]:
        print(f"  {e}")
    return 0 if not errors else 1
