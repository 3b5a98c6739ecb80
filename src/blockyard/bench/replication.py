"""``blockyard bench replication``: what replication costs the writer and how fast a copy
catches up, with three real ``blockyard serve`` processes on loopback, in one run.

Server 0 is the primary of every volume; servers 1 and 2 hold replicas. Four phases:

1. **Write cost.** One volume per setup — RF1 (no replica), RF2 best_effort, RF2 sync_all,
   RF3 sync_quorum — driven by the same external initiators (:mod:`.replication_load`): 4 KiB
   writes at QD32 with a flush every 32, 4 KiB FUA writes at QD1 and 4 KiB plain writes at QD1
   (sync_all and sync_quorum acknowledge those once the replicas received them). Setups are
   interleaved over several rounds (their order rotated each round) and each ratio to RF1 is
   taken within a round, so drifting load from other work on the machine hits numerator and
   denominator alike.
2. **Delta resync.** The replica server of an in-sync sync_all volume is killed with SIGKILL,
   the primary takes N 4 KiB writes (with a flush every 32, so each flush proves the replica
   was marked out of sync first), the server is restarted, and the time until GetReplication
   says ``in_sync`` is measured — from READY, and from the moment the link reconnected.
3. **Full rebuild.** A volume filled densely and one with 10 % allocated (1 MiB every 10 MiB)
   get a new, empty replica; time from SetReplication until ``in_sync``, and the data bytes the
   primary sent.
4. **Degraded.** The replica server of the RF2 sync_all volume is killed; once that replica is
   marked out of sync, the volume's QD32 rate is measured against another RF2 sync_all volume
   whose replica (on server 2) is healthy, interleaved.

Every wait is bounded; a replica that never gets in sync raises :class:`BenchError` with the
servers' log lines. The report labels what each figure measures.
"""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from blockyard.bench.iscsi import BenchError, _need
from blockyard.bench.replication_load import (
    FLUSH_EVERY,
    QD1_MAX_WRITES,
    Qd1Result,
    fill,
    poke,
    qd1_fua,
    qd32_flush_iops,
)
from blockyard.bench.replication_report import (
    DELTA_VOLUME,
    MIB,
    PRIMARY,
    QD1,
    QD32,
    RF1,
    RF2_BEST_EFFORT,
    RF2_HEALTHY_PEER,
    RF2_SYNC_ALL,
    RF3_QUORUM,
    CatchUp,
    CpuUse,
    DeltaResult,
    Options,
    RebuildResult,
    Samples,
    Setup,
    render,
)
from blockyard.engine.epoch import Role
from blockyard.replication.commit import DurabilityMode
from blockyard.replication.report import ReplicaReport, ReplicationInfo
from blockyard.server.client import VolumeServerClient
from blockyard.testing.cluster import API_SLOW_TIMEOUT_S, API_TIMEOUT_S, LocalCluster

EPOCH: Final = 1
#: GetReplication polling while timing a catch-up (the figures' resolution).
POLL_INTERVAL_S: Final = 0.02
#: Longest wait for a replica to be marked out of sync after its server was killed (the
#: dropped connection marks it at once; the barrier timeout is 5 s).
MARK_TIMEOUT_S: Final = 30.0
#: Rates assumed before a setup's first measurement (they only size the first round's runs).
QD32_GUESS_IOPS: Final = 4000.0
QD1_GUESS_IOPS: Final = 500.0
MIN_QD32_WRITES: Final = 4 * FLUSH_EVERY
MIN_QD1_WRITES: Final = 50
#: How long an idle volume gets to return in sync after its replica's server restarted.
IDLE_REJOIN_TIMEOUT_S: Final = 10.0
#: Rebuild fills are written in 1 MiB requests.
FILL_CHUNK_BYTES: Final = MIB


def _proc_cpu_s(pid: int) -> float:
    """utime + stime of a live process (every thread), from /proc/PID/stat (proc(5))."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # Fields 14 and 15 of the line; the split starts at field 3.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_busy_s() -> float:
    """CPU seconds the whole machine spent not idle so far (/proc/stat, proc(5))."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...: idle and iowait are not busy.
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class ReplicationBench:
    def __init__(self, root: Path, options: Options, replica_root: Path | None = None) -> None:
        self.root = root
        self.opt = options
        self.cluster = LocalCluster.create(root, 3)
        if replica_root is not None:
            for i, server in enumerate(self.cluster.servers):
                if i != PRIMARY:
                    server.data_dir = replica_root / server.name / "data"
        self.setups = [RF1, RF2_BEST_EFFORT, RF2_SYNC_ALL] + ([RF3_QUORUM] if options.rf3 else [])
        self.urls: dict[str, str] = {}
        self.samples: dict[str, Samples] = {}
        self.degraded: dict[str, list[float]] = {}
        self.delta: DeltaResult | None = None
        self.rebuilds: list[RebuildResult] = []
        #: Things that went wrong but did not stop the run (printed with the report).
        self.notes: list[str] = []
        self._rates: dict[tuple[str, str], float] = {}
        self.load_start = os.getloadavg()
        self.load_end = self.load_start
        self.elapsed_s = 0.0
        self._t0 = time.monotonic()
        #: CPUs kept busy during the write-cost phase by this bench, and by other work.
        self.write_cost_cpus = (0.0, 0.0)

    # ---- cluster plumbing -----------------------------------------------------------------

    def _create(self, setup: Setup, size_bytes: int) -> None:
        """Create the volume (and its replicas, in sync) and remember its URL."""
        c = self.cluster
        if setup.mode is None:
            c.servers[PRIMARY].call(lambda cl: cl.create_volume(setup.volume, size_bytes))
        else:
            c.replicate(
                setup.volume, size_bytes, replicas=setup.replicas, mode=setup.mode, epoch=EPOCH
            )
            self._wait_in_sync(setup.volume)
        desc = c.servers[PRIMARY].call(lambda cl: cl.get_volume(setup.volume))
        self.urls[setup.volume] = f"iscsi://{c.servers[PRIMARY].portal}/{desc.export.iqn}/0"

    def _wait_in_sync(self, name: str, timeout_s: float | None = None) -> None:
        try:
            self.cluster.wait_in_sync(name, timeout_s=timeout_s or self.opt.sync_timeout_s)
        except AssertionError as exc:
            raise BenchError(f"{exc}\n{self.log_excerpt()}") from None

    def _back_in_sync(self, names: list[str]) -> None:
        """Idle volumes whose replica server restarted: wait for them in sync; those that are
        not within :data:`IDLE_REJOIN_TIMEOUT_S` are named in the report and get one write
        (the replica then acknowledges what it holds)."""
        deadline = time.monotonic() + IDLE_REJOIN_TIMEOUT_S
        waiting = list(names)
        while waiting and time.monotonic() < deadline:
            waiting = [n for n in waiting if not self._in_sync(n)]
            time.sleep(POLL_INTERVAL_S)
        for name in waiting:
            self.notes.append(
                f"{name}: idle, its replica's server restarted; not back in sync within "
                f"{IDLE_REJOIN_TIMEOUT_S:g} s (nothing to catch up, and nothing made the "
                "replica acknowledge); one 4 KiB write was made to bring it back"
            )
            poke(self.urls[name])
            self._wait_in_sync(name)

    def _in_sync(self, name: str) -> bool:
        info: ReplicationInfo = self.cluster.servers[PRIMARY].call(
            lambda c: c.get_replication(name)
        )
        return bool(info.replicas) and all(r.state == "in_sync" for r in info.replicas)

    def _replica_report(self, name: str, server: int) -> ReplicaReport:
        info: ReplicationInfo = self.cluster.servers[PRIMARY].call(
            lambda c: c.get_replication(name)
        )
        r = info.replica(self.cluster.servers[server].replication_address)
        if r is None:
            raise BenchError(f"{name}: no replica on server{server} in {info}")
        return r

    def _wait_marked_out_of_sync(self, name: str, server: int) -> None:
        deadline = time.monotonic() + MARK_TIMEOUT_S
        while time.monotonic() < deadline:
            r = self._replica_report(name, server)
            if r.state == "out_of_sync" and not r.in_sync:
                return
            time.sleep(POLL_INTERVAL_S)
        raise BenchError(
            f"{name}: the replica on server{server} was not marked out of sync within "
            f"{MARK_TIMEOUT_S} s of its server's death: {r}\n{self.log_excerpt()}"
        )

    def _time_catch_up(self, name: str, server: int, trigger: Callable[[], None]) -> CatchUp:
        """Run ``trigger`` and time until the replica on ``server`` is in sync."""
        address = self.cluster.servers[server].replication_address
        api = self.cluster.servers[PRIMARY].api

        async def watch() -> CatchUp:
            async with VolumeServerClient(
                api, timeout_s=API_TIMEOUT_S, slow_timeout_s=API_SLOW_TIMEOUT_S
            ) as c:
                t0 = time.monotonic()
                await asyncio.to_thread(trigger)
                t1 = time.monotonic()
                cpu0 = self._pair_cpu_s(server)
                deadline = t0 + self.opt.sync_timeout_s
                connected_at: float | None = None
                seen_down = False
                last: ReplicaReport | None = None
                while time.monotonic() < deadline:
                    r = (await c.get_replication(name)).replica(address)
                    now = time.monotonic()
                    if r is not None:
                        seen_down = seen_down or not r.connected
                        if r.connected and connected_at is None and seen_down:
                            connected_at = now
                        if r.state == "in_sync" and r.in_sync:
                            resync = None if connected_at is None else now - connected_at
                            cpu1 = self._pair_cpu_s(server)
                            return CatchUp(
                                now - t0,
                                now - t1,
                                resync,
                                r,
                                cpu1[0] - cpu0[0],
                                cpu1[1] - cpu0[1],
                            )
                        last = r
                    await asyncio.sleep(POLL_INTERVAL_S)
                raise BenchError(
                    f"{name}: the replica on server{server} was not in sync within "
                    f"{self.opt.sync_timeout_s:g} s: {last}\n{self.log_excerpt()}"
                )

        return asyncio.run(watch())

    def log_excerpt(self, limit: int = 12) -> str:
        """The servers' ERROR lines, each with the exception that ended its traceback (the
        last ``limit``)."""
        found: list[str] = []
        for path in sorted((self.root / "logs").glob("*.log")):
            in_traceback = False
            for line in path.read_text(errors="replace").splitlines():
                if " ERROR " in line or " CRITICAL " in line:
                    found.append(f"{path.name}: {line}")
                elif line.startswith("Traceback"):
                    in_traceback = True
                elif in_traceback and line and not line[0].isspace():
                    in_traceback = False
                    found.append(f"{path.name}:   -> {line}")
        if not found:
            return "server logs: no ERROR lines"
        errors = sum(1 for line in found if "   -> " not in line)
        return "\n".join([f"server logs: {errors} ERROR lines, the last:", *found[-limit:]])

    # ---- measurements ---------------------------------------------------------------------

    def _qd32_count(self, key: str) -> int:
        rate = self._rates.get((key, QD32), QD32_GUESS_IOPS)
        return max(MIN_QD32_WRITES, round(rate * self.opt.seconds / FLUSH_EVERY) * FLUSH_EVERY)

    def _qd1_count(self, key: str) -> int:
        rate = self._rates.get((key, QD1), QD1_GUESS_IOPS)
        return min(QD1_MAX_WRITES, max(MIN_QD1_WRITES, round(rate * self.opt.seconds)))

    def _cpu_now(self) -> tuple[float, float, float]:
        """CPU seconds so far: the primary, the other live servers, finished children."""
        servers = self.cluster.servers
        others = sum(
            _proc_cpu_s(s.process.pid)
            for i, s in enumerate(servers)
            if i != PRIMARY and s.running and s.process is not None
        )
        primary = servers[PRIMARY].process
        assert primary is not None
        return _proc_cpu_s(primary.pid), others, _children_cpu_s()

    def _own_cpu_s(self) -> float:
        """CPU seconds of this bench so far: its servers, its tools and itself."""
        own = resource.getrusage(resource.RUSAGE_SELF)
        return sum(self._cpu_now()) + own.ru_utime + own.ru_stime

    def _pair_cpu_s(self, replica: int) -> tuple[float, float]:
        """CPU seconds so far of the primary's and one replica's server process."""
        pids = []
        for i in (PRIMARY, replica):
            proc = self.cluster.servers[i].process
            assert proc is not None
            pids.append(proc.pid)
        return _proc_cpu_s(pids[0]), _proc_cpu_s(pids[1])

    def _cpu_since(self, before: tuple[float, float, float], t0: float, ops: int) -> CpuUse:
        after = self._cpu_now()
        d = [a - b for a, b in zip(after, before, strict=True)]
        per = 1e6 / ops
        return CpuUse(d[0] * per, d[1] * per, d[2] * per, sum(d) / (time.monotonic() - t0))

    def _qd32(self, setup: Setup, key: str, round_no: int) -> tuple[float, CpuUse]:
        count = self._qd32_count(key)
        before, t0 = self._cpu_now(), time.monotonic()
        iops = qd32_flush_iops(self.urls[setup.volume], count, offset_bytes=round_no * 4096)
        cpu = self._cpu_since(before, t0, count)
        self._rates[key, QD32] = iops
        return iops, cpu

    def _qd1(self, setup: Setup, round_no: int) -> tuple[Qd1Result, CpuUse]:
        count = self._qd1_count(setup.volume)
        before, t0 = self._cpu_now(), time.monotonic()
        result = qd1_fua(
            self.urls[setup.volume],
            count,
            self.opt.size_bytes,
            offset_bytes=(128 + round_no) * 4096,
        )
        cpu = self._cpu_since(before, t0, count)
        self._rates[setup.volume, QD1] = result.iops
        return result, cpu

    def progress(self, what: str) -> None:
        """One line on stderr per step: the run takes minutes."""
        elapsed = time.monotonic() - self._t0
        print(f"[{elapsed:6.1f} s] {what}", file=sys.stderr, flush=True)

    def write_cost(self) -> None:
        for s in self.setups:
            self.samples[s.volume] = Samples()
        n = len(self.setups)
        for r in range(self.opt.rounds):
            self.progress(f"write cost, round {r + 1} of {self.opt.rounds}")
            order = [self.setups[(r + i) % n] for i in range(n)]
            for s in order:
                iops, cpu = self._qd32(s, s.volume, r)
                self.samples[s.volume].qd32_iops.append(iops)
                self.samples[s.volume].qd32_cpu.append(cpu)
            for s in order:
                result, cpu = self._qd1(s, r)
                self.samples[s.volume].qd1.append(result)
                self.samples[s.volume].qd1_cpu.append(cpu)
            for s in order:
                self.samples[s.volume].qd1_plain.append(
                    qd1_fua(
                        self.urls[s.volume],
                        self._qd1_count(s.volume),
                        self.opt.size_bytes,
                        offset_bytes=(256 + r) * 4096,
                        fua=False,
                    )
                )

    def delta_resync(self) -> None:
        replica = DELTA_VOLUME.replicas[0]
        server = self.cluster.servers[replica]
        self.progress(f"delta resync of {self.opt.missed_writes:,} missed writes")
        # A replica that holds no record yet gets a full rebuild, not a delta: give it some.
        qd32_flush_iops(self.urls[DELTA_VOLUME.volume], 8 * MIN_QD32_WRITES)
        self._wait_in_sync(DELTA_VOLUME.volume)
        server.kill()
        self._wait_marked_out_of_sync(DELTA_VOLUME.volume, replica)
        qd32_flush_iops(self.urls[DELTA_VOLUME.volume], self.opt.missed_writes)
        lag = self._replica_report(DELTA_VOLUME.volume, replica).lag_lsns
        ready: list[float] = []

        def restart() -> None:
            t = time.monotonic()
            server.restart()
            ready.append(time.monotonic() - t)

        catch_up = self._time_catch_up(DELTA_VOLUME.volume, replica, restart)
        self.delta = DeltaResult(self.opt.missed_writes, lag, ready[0], catch_up)
        # The other volumes with a replica there catch up too before the next phase.
        self._back_in_sync(
            [s.volume for s in (*self.setups, RF2_HEALTHY_PEER) if replica in s.replicas]
        )

    def rebuild(self, kind: str, step_bytes: int) -> None:
        name = f"rebuild-{kind}"
        size = self.opt.rebuild_size_bytes
        self.progress(f"full rebuild, {kind}")
        target = 2
        self._create(Setup(name, kind, (), None), size)
        count = size // step_bytes
        fill(self.urls[name], chunk_bytes=FILL_CHUNK_BYTES, step_bytes=step_bytes, count=count)
        # The fill's dirty pages would otherwise be written back during the rebuild.
        os.sync()
        desc = self.cluster.servers[PRIMARY].call(lambda c: c.get_volume(name))
        addr = self.cluster.servers[target].replication_address

        async def make_replica(c: VolumeServerClient) -> None:
            await c.create_volume(name, size, volume_uuid=desc.uuid)
            await c.set_replication(name, role=Role.REPLICA, epoch=EPOCH)

        self.cluster.servers[target].call(make_replica)

        def start() -> None:
            self.cluster.servers[PRIMARY].call(
                lambda c: c.set_replication(
                    name,
                    role=Role.PRIMARY,
                    epoch=EPOCH,
                    mode=DurabilityMode.SYNC_ALL,
                    replicas=[addr],
                )
            )

        catch_up = self._time_catch_up(name, target, start)
        self.rebuilds.append(
            RebuildResult(kind, size, count * FILL_CHUNK_BYTES, desc.allocated_bytes, catch_up)
        )

    def degrade(self) -> None:
        victim = RF2_SYNC_ALL.replicas[0]
        self.progress("degraded sync_all")
        self.cluster.servers[victim].kill()
        self._wait_marked_out_of_sync(RF2_SYNC_ALL.volume, victim)
        pair = (RF2_HEALTHY_PEER, RF2_SYNC_ALL)
        self.degraded = {s.volume: [] for s in pair}
        for s in pair:  # warm-up: first writes of the peer, first flush after the mark
            qd32_flush_iops(self.urls[s.volume], MIN_QD32_WRITES)
        for r in range(self.opt.rounds):
            for s in pair if r % 2 == 0 else reversed(pair):
                key = f"{s.volume}-degraded-phase"
                self.degraded[s.volume].append(self._qd32(s, key, r)[0])

    def run(self) -> None:
        t0 = self._t0 = time.monotonic()
        self.progress(f"starting 3 servers in {self.root}")
        self.cluster.start()
        try:
            extra = [RF2_HEALTHY_PEER] if self.opt.degraded else []
            extra += [DELTA_VOLUME] if self.opt.delta else []
            for s in (*self.setups, *extra):
                self._create(s, self.opt.size_bytes)
            own0, machine0, t1 = self._own_cpu_s(), _machine_busy_s(), time.monotonic()
            self.write_cost()
            wall = time.monotonic() - t1
            own = self._own_cpu_s() - own0
            self.write_cost_cpus = (own / wall, (_machine_busy_s() - machine0 - own) / wall)
            if self.opt.delta:
                self.delta_resync()
            if self.opt.rebuild:
                self.rebuild("dense", FILL_CHUNK_BYTES)
                self.rebuild("sparse", FILL_CHUNK_BYTES * 100 // self.opt.sparse_percent)
            if self.opt.degraded:
                self.degrade()
        finally:
            self.load_end = os.getloadavg()
            self.progress("stopping the servers")
            self.cluster.stop()
            self.elapsed_s = time.monotonic() - t0


def run_replication_bench(
    directory: str | None, options: Options, *, on_report: Callable[[str], None] | None = None
) -> str:
    """Run the benchmark and return its report. ``on_report`` gets the report before the data
    directory is removed (that can take minutes for fragmented volumes on a busy disk)."""
    _need("qemu-img", "qemu-io")
    if options.rounds < 1 or options.seconds <= 0:
        raise BenchError("--rounds must be at least 1 and --seconds positive")
    if not 0 < options.sparse_percent < 100:
        raise BenchError("--sparse-percent must be between 1 and 99")
    own = directory is None
    path = tempfile.mkdtemp(prefix="blockyard-bench-repl-", dir="/var/tmp") if own else directory
    assert path is not None
    os.makedirs(path, exist_ok=True)
    replica_root = None
    if options.replica_dir is not None:
        os.makedirs(options.replica_dir, exist_ok=True)
        replica_root = tempfile.mkdtemp(prefix="blockyard-bench-repl-", dir=options.replica_dir)
    bench = ReplicationBench(
        Path(path), options, None if replica_root is None else Path(replica_root)
    )
    try:
        bench.run()
        report = render(bench)
        if on_report is not None:
            on_report(report)
        return report
    finally:
        if own:
            bench.progress(f"removing {path}")
            shutil.rmtree(path, ignore_errors=True)
        if replica_root is not None:
            shutil.rmtree(replica_root, ignore_errors=True)
