"""What ``blockyard bench replication`` measures and how it is reported: the setups, the
results of each phase, the goals from the replication issue, and the report.

The report labels what each figure measures; every goal is printed beside its figure with the
exact value its verdict was taken on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from blockyard.bench.replication_load import Qd1Result, Spread
from blockyard.replication.commit import DurabilityMode
from blockyard.replication.report import ReplicaReport

if TYPE_CHECKING:
    from blockyard.bench.replication import ReplicationBench

MIB: Final = 1 << 20
PRIMARY: Final = 0

# Goals, from the replication issue.
SYNC_ALL_GOAL_RATIO: Final = 0.7
REBUILD_GOAL_MBPS: Final = 500.0
DELTA_GOAL_S: Final = 2.0
DEGRADED_GOAL_RATIO: Final = 0.9
#: "Sparse rebuild time ∝ allocated data" counts as met when sparse/dense time is within this
#: factor of sparse/dense data (fixed costs — handshake, walking the whole volume's bitmap and
#: its holes — make it somewhat more than the data ratio; Longhorn's sparse rebuilds are 20x
#: slower than dense ones per byte).
PROPORTIONAL_SLACK: Final = 1.5


@dataclass(frozen=True, slots=True)
class Setup:
    volume: str
    label: str
    replicas: tuple[int, ...]
    #: None: no replication at all (RF1).
    mode: DurabilityMode | None


RF1 = Setup("rf1", "RF1 (no replica)", (), None)
RF2_BEST_EFFORT = Setup("rf2-best-effort", "RF2 best_effort", (1,), DurabilityMode.BEST_EFFORT)
RF2_SYNC_ALL = Setup("rf2-sync-all", "RF2 sync_all", (1,), DurabilityMode.SYNC_ALL)
RF3_QUORUM = Setup("rf3-sync-quorum", "RF3 sync_quorum", (1, 2), DurabilityMode.SYNC_QUORUM)
#: The healthy peer of the degraded measurement (its replica is on a server that stays up).
RF2_HEALTHY_PEER = Setup("rf2-peer", "RF2 sync_all, healthy", (2,), DurabilityMode.SYNC_ALL)
DELTA_VOLUME = Setup("delta", "RF2 sync_all", (1,), DurabilityMode.SYNC_ALL)

QD32 = "4 KiB writes QD32, flush every 32"
QD1 = "4 KiB FUA writes QD1"


@dataclass(frozen=True, slots=True)
class Options:
    size_bytes: int = 1 << 30
    rebuild_size_bytes: int = 1 << 30
    seconds: float = 2.0
    rounds: int = 3
    missed_writes: int = 10_000
    sparse_percent: int = 10
    rf3: bool = True
    delta: bool = True
    rebuild: bool = True
    degraded: bool = True
    sync_timeout_s: float = 300.0
    #: Where the replica servers (1 and 2) keep their data, if not beside the primary's (a
    #: tmpfs here takes the shared disk out of the replicas' costs, for diagnosis).
    replica_dir: str | None = None


@dataclass(frozen=True, slots=True)
class CatchUp:
    """One timed catch-up of one replica."""

    #: Seconds from the start of the trigger (SetReplication, a restart) to in_sync.
    total_s: float
    #: Seconds from the end of the trigger (the SetReplication answer, READY) to in_sync.
    after_trigger_s: float
    #: Seconds from the link's reconnection to in_sync (None: connected before the first poll).
    resync_s: float | None
    #: The replica's last report before in_sync (plan, resync blocks and bytes).
    report: ReplicaReport
    #: CPU seconds of the primary's and the replica's server processes after the trigger.
    primary_cpu_s: float
    replica_cpu_s: float

    @property
    def cpus_busy(self) -> float:
        return (self.primary_cpu_s + self.replica_cpu_s) / self.after_trigger_s


@dataclass(frozen=True, slots=True)
class DeltaResult:
    writes: int
    lag_lsns: int
    ready_s: float
    catch_up: CatchUp


@dataclass(frozen=True, slots=True)
class RebuildResult:
    kind: str
    size_bytes: int
    written_bytes: int
    allocated_bytes: int
    catch_up: CatchUp

    @property
    def sent_bytes(self) -> int:
        return self.catch_up.report.resync_bytes

    @property
    def data_mbps(self) -> float:
        return self.sent_bytes / self.catch_up.total_s / 1e6


@dataclass(frozen=True, slots=True)
class CpuUse:
    """CPU time spent during one measurement, per write, and how busy the machine was."""

    primary_us: float
    #: Every other server (replica holders, and idle servers).
    replicas_us: float
    #: The load generator (qemu-img or qemu-io, start-up and login included).
    initiator_us: float
    #: CPU seconds of all of them over the measurement's wall time (2.0 = both cores of a
    #: 2-CPU machine).
    cpus_busy: float


@dataclass
class Samples:
    """Per-round results of one setup."""

    qd32_iops: list[float] = field(default_factory=list)
    qd32_cpu: list[CpuUse] = field(default_factory=list)
    qd1: list[Qd1Result] = field(default_factory=list)
    qd1_cpu: list[CpuUse] = field(default_factory=list)
    #: QD1 plain writes (no FUA): what sync_all's wait for the replicas' receipt costs.
    qd1_plain: list[Qd1Result] = field(default_factory=list)


# ---- the report ---------------------------------------------------------------------------


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT MET"


def _range(s: Spread, fmt: str) -> str:
    return f"{s.median:{fmt}} [{s.low:{fmt}}-{s.high:{fmt}}]"


def _ratio_cell(values: list[float], base: list[float]) -> tuple[str, Spread]:
    spread = Spread.of([v / b for v, b in zip(values, base, strict=True)])
    return f"{spread.median:.2f}x [{spread.low:.2f}-{spread.high:.2f}]", spread


def _goal_cell(setup: Setup, ratio: Spread) -> str:
    if setup is RF2_SYNC_ALL:
        ok = ratio.median >= SYNC_ALL_GOAL_RATIO
        return f">= {SYNC_ALL_GOAL_RATIO:.2f}x RF1 ({ratio.median:.3f}x): {_verdict(ok)}"
    return ""


def _write_cost_lines(bench: ReplicationBench) -> list[str]:
    base = bench.samples[RF1.volume]
    out = [
        f"{'Write cost (all on the primary, server 0)':<36} {'IOPS median [min-max]':>26} "
        f"{'p50 µs':>7} {'p99 µs':>7}  {'vs RF1 (per round)':<22} goal",
        f"{QD32} — qemu-img bench -w -t none -d 32 -s 4096 --flush-interval=32 -S 1052672",
    ]
    for s in bench.setups:
        smp = bench.samples[s.volume]
        cell, ratio = _ratio_cell(smp.qd32_iops, base.qd32_iops)
        iops = _range(Spread.of(smp.qd32_iops), ",.0f")
        out.append(f"  {s.label:<34} {iops:>26} {'':>7} {'':>7}  {cell:<22} {_goal_cell(s, ratio)}")
    out.append(
        f"{QD1} — qemu-io -t none, write -f (FUA), one at a time; IOPS = 1 / mean latency; "
        "p50 ratio = RF1's p50 / this p50 (the goal is judged on it: the mean is dominated by "
        "rare slow fdatasyncs, most of all when other work shares the disk)"
    )
    base_qd1 = [q.iops for q in base.qd1]
    base_p50 = [q.percentile_us(50) for q in base.qd1]
    for s in bench.setups:
        smp = bench.samples[s.volume]
        rates = [q.iops for q in smp.qd1]
        p50s = [q.percentile_us(50) for q in smp.qd1]
        cell, _ = _ratio_cell(rates, base_qd1)
        p50_cell, p50_ratio = _ratio_cell(base_p50, p50s)
        p50 = Spread.of(p50s).median
        p99 = Spread.of([q.percentile_us(99) for q in smp.qd1]).median
        out.append(
            f"  {s.label:<34} {_range(Spread.of(rates), ',.0f'):>26} {p50:>7,.0f} {p99:>7,.0f}"
            f"  {cell:<22} p50 {p50_cell:<22} {_goal_cell(s, p50_ratio)}"
        )
    out.append(
        "4 KiB writes QD1, no FUA — qemu-io -t none, write, one at a time (sync_all and "
        "sync_quorum acknowledge a write once the replicas received it); p50 ratio as above"
    )
    base_plain = [q.percentile_us(50) for q in base.qd1_plain]
    for s in bench.setups:
        smp = bench.samples[s.volume]
        rates = [q.iops for q in smp.qd1_plain]
        p50s = [q.percentile_us(50) for q in smp.qd1_plain]
        cell, _ = _ratio_cell(rates, [q.iops for q in base.qd1_plain])
        p50_cell, _ = _ratio_cell(base_plain, p50s)
        p99 = Spread.of([q.percentile_us(99) for q in smp.qd1_plain]).median
        out.append(
            f"  {s.label:<34} {_range(Spread.of(rates), ',.0f'):>26} "
            f"{Spread.of(p50s).median:>7,.0f} {p99:>7,.0f}  {cell:<22} p50 {p50_cell}"
        )
    out.append(
        "CPU per write, µs (median over rounds): primary server / other servers / load "
        "generator; CPUs busy = their CPU time over wall time"
    )
    for s in bench.setups:
        smp = bench.samples[s.volume]
        out.append(f"  {s.label:<34} QD32 {_cpu_cell(smp.qd32_cpu)}   QD1 {_cpu_cell(smp.qd1_cpu)}")
    return out


def _cpu_cell(cpu: list[CpuUse]) -> str:
    def med(values: list[float]) -> float:
        return Spread.of(values).median

    return (
        f"{med([c.primary_us for c in cpu]):>5,.0f} / {med([c.replicas_us for c in cpu]):>5,.0f}"
        f" / {med([c.initiator_us for c in cpu]):>5,.0f}, "
        f"{med([c.cpus_busy for c in cpu]):.2f} CPUs busy"
    )


def _delta_lines(d: DeltaResult) -> list[str]:
    r = d.catch_up.report
    c = d.catch_up
    resync_s = c.resync_s if c.resync_s is not None else c.after_trigger_s
    return [
        f"Delta resync — {d.writes:,} 4 KiB writes missed: replica server SIGKILLed, the primary "
        "wrote them (QD32, flush every 32), the server restarted",
        f"  replica {d.lag_lsns:,} LSNs behind; plan {r.plan or '?'} ({r.plan_reason}); "
        f"{r.resync_total_blocks:,} blocks to resync, {r.resync_bytes / MIB:,.1f} MiB of data sent",
        f"  link reconnected -> in_sync {resync_s:.2f} s   goal < {DELTA_GOAL_S:g} s: "
        f"{_verdict(resync_s < DELTA_GOAL_S)}",
        f"  READY -> in_sync {c.after_trigger_s:.2f} s (includes the link's reconnect backoff; "
        f"the restart itself, {d.ready_s:.2f} s to READY, is not counted); CPU from READY: "
        f"primary {c.primary_cpu_s:.2f} s, replica {c.replica_cpu_s:.2f} s "
        f"({c.cpus_busy:.2f} CPUs busy)",
    ]


def _rebuild_lines(bench: ReplicationBench) -> list[str]:
    out = [
        "Full rebuild — a new empty replica on server 2; SetReplication -> in_sync; "
        "filled with 1 MiB writes (pattern 0xa5)",
    ]
    for rb in bench.rebuilds:
        t = rb.catch_up.total_s
        goal = ""
        if rb.kind == "dense":
            goal = (
                f"goal >= {REBUILD_GOAL_MBPS:g} MB/s: {_verdict(rb.data_mbps >= REBUILD_GOAL_MBPS)}"
            )
        out.extend(
            (
                f"  {rb.kind:<7} {rb.size_bytes / MIB:,.0f} MiB volume, "
                f"{rb.written_bytes / MIB:,.0f} MiB written ({rb.allocated_bytes / MIB:,.0f} MiB "
                f"allocated, WAL included), {rb.sent_bytes / MIB:,.0f} MiB sent in {t:.2f} s = "
                f"{rb.data_mbps:,.0f} MB/s of data, {rb.size_bytes / t / 1e6:,.0f} MB/s of volume  "
                f"{goal}",
                f"          CPU: primary {rb.catch_up.primary_cpu_s:.2f} s, replica "
                f"{rb.catch_up.replica_cpu_s:.2f} s ({rb.catch_up.cpus_busy:.2f} CPUs busy)",
            )
        )
    by_kind = {rb.kind: rb for rb in bench.rebuilds}
    dense, sparse = by_kind.get("dense"), by_kind.get("sparse")
    if dense is not None and sparse is not None and dense.sent_bytes:
        time_ratio = sparse.catch_up.total_s / dense.catch_up.total_s
        data_ratio = sparse.sent_bytes / dense.sent_bytes
        ok = time_ratio <= PROPORTIONAL_SLACK * data_ratio
        out.append(
            f"  sparse/dense: time {time_ratio:.3f}x, data sent {data_ratio:.3f}x   goal time "
            f"∝ data (time ratio <= {PROPORTIONAL_SLACK:g} x data ratio): {_verdict(ok)}"
        )
    return out


def _degraded_lines(bench: ReplicationBench) -> list[str]:
    healthy = bench.degraded[RF2_HEALTHY_PEER.volume]
    down = bench.degraded[RF2_SYNC_ALL.volume]
    cell, ratio = _ratio_cell(down, healthy)
    return [
        f"Degraded — {QD32}; RF2 sync_all whose replica server was SIGKILLed and marked out of "
        "sync, against an RF2 sync_all volume with a healthy replica (server 2), interleaved",
        f"  {'healthy':<34} {_range(Spread.of(healthy), ',.0f'):>26} IOPS",
        f"  {'one replica down':<34} {_range(Spread.of(down), ',.0f'):>26} IOPS  {cell}  goal >= "
        f"{DEGRADED_GOAL_RATIO:.2f}x healthy ({ratio.median:.3f}x): "
        f"{_verdict(ratio.median >= DEGRADED_GOAL_RATIO)}",
    ]


def render(bench: ReplicationBench) -> str:
    o = bench.opt
    lines = [
        f"blockyard bench replication — 3 blockyard serve processes on loopback, server 0 primary "
        f"of every volume; {o.size_bytes / MIB:,.0f} MiB volumes; {os.cpu_count()} CPUs shared "
        "by servers and load generators",
        f"{o.rounds} rounds of ~{o.seconds:g} s per figure, setups interleaved (order rotated "
        "each round); median [min-max] over rounds; ratios taken within each round",
        "writes are strided 257 blocks apart (qemu-img bench has no random mode): never "
        "adjacent, so never merged",
        "data: primary in "
        f"{bench.cluster.servers[PRIMARY].data_dir.parent.parent}, replicas in "
        f"{bench.cluster.servers[1].data_dir.parent.parent}",
        f"load average (1 min) {bench.load_start[0]:.2f} at start, {bench.load_end[0]:.2f} at "
        f"end; the run took {bench.elapsed_s:.0f} s; during the write-cost rounds this bench "
        f"kept {bench.write_cost_cpus[0]:.2f} CPUs busy and other work "
        f"{max(0.0, bench.write_cost_cpus[1]):.2f}",
        "",
        *_write_cost_lines(bench),
    ]
    if bench.delta is not None:
        lines += ["", *_delta_lines(bench.delta)]
    if bench.rebuilds:
        lines += ["", *_rebuild_lines(bench)]
    if bench.degraded:
        lines += ["", *_degraded_lines(bench)]
    lines += ["", *(f"note: {n}" for n in bench.notes), bench.log_excerpt()]
    return "\n".join(lines)
