"""One chaos run: start a cluster, create and attach the volumes, run the workload, inject the
seeded faults one at a time — each followed by a wait for the cluster to heal, a read-back of
every block by its writer, and a quiet period — then stop, read every block of every volume
through the current primary and compare every replica's copy with the primary's."""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Final, TextIO

from blockyard import sabotage
from blockyard.attach.initiator import IscsiBlockDevice, IscsiVolumeSpec, parse_portal
from blockyard.bench.failover import Observer, not_in_sync, wait_for
from blockyard.chaos.cluster import ChaosCluster
from blockyard.chaos.faults import make_fault
from blockyard.chaos.model import VolumeModel
from blockyard.chaos.netlab import NetLab
from blockyard.chaos.payload import SECTOR_BYTES
from blockyard.chaos.report import ChaosReport, FaultResult
from blockyard.chaos.schedule import KINDS, FaultSpec, schedule
from blockyard.chaos.workload import VolumeWorkload, read_all
from blockyard.errors import BlockyardError
from blockyard.server.client import VolumeServerClient
from blockyard.server.proto import volume_server_pb2 as vpb
from blockyard.testing.netns import NetnsUnavailableError

#: Volume i gets LAYOUTS[i % len]: (copies, durability mode, label).
LAYOUTS: Final = {
    "mixed": ((2, vpb.DURABILITY_MODE_SYNC_ALL, "RF2 sync_all"),
              (3, vpb.DURABILITY_MODE_SYNC_QUORUM, "RF3 sync_quorum")),
    "sync_all": ((2, vpb.DURABILITY_MODE_SYNC_ALL, "RF2 sync_all"),),
    "sync_quorum": ((3, vpb.DURABILITY_MODE_SYNC_QUORUM, "RF3 sync_quorum"),),
}  # fmt: skip
INITIATOR_NAME: Final = "iqn.2026-12.io.blockyard.chaos:initiator"
#: The workload runs alone this long before the first fault.
WARMUP_S: Final = 3.0
#: Bound of check 5: after a fault ends, every volume active, every copy in sync, every role
#: applied and the initiator connected to every copy within this (a restart on a loaded
#: 2-core machine takes seconds; a resync of a few MiB, well under one).
HEAL_BOUND_S: Final = 60.0
#: The writers' read-back of their blocks after each fault (64 MiB per volume).
SWEEP_TIMEOUT_S: Final = 120.0
#: I/O waits this long for a usable path before failing (then the writer retries).
REPLACEMENT_TIMEOUT_S: Final = 30.0
#: Replicas still applying the last records may differ for a moment after the final flush.
CHECKSUM_ATTEMPTS: Final = 10


@dataclass
class ChaosOptions:
    seed: int
    duration_s: float
    directory: Path
    volumes: int = 2
    faults: tuple[str, ...] = KINDS
    writers: int = 3
    volume_bytes: int = 64 << 20
    servers: int = 3
    #: 1: a master on SQLite; more: a master group on etcd (master faults kill the leader).
    masters: int = 1
    layout: str = "mixed"
    netns: bool | None = None  # None: use namespaces when they can be made
    heal_bound_s: float = HEAL_BOUND_S
    lease_ttl_s: float = 2.0
    #: Deliberate defects for the self-test (:mod:`blockyard.sabotage`).
    sabotage: tuple[str, ...] = ()
    out: TextIO | None = None


@dataclass
class _Volume:
    name: str
    model: VolumeModel
    device: IscsiBlockDevice
    workload: VolumeWorkload
    observer: Observer


@dataclass
class _Run:
    options: ChaosOptions
    cluster: ChaosCluster
    report: ChaosReport
    volumes: list[_Volume] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def say(self, text: str) -> None:
        if self.options.out is not None:
            print(f"[{time.monotonic() - self.started:7.1f}s] {text}", file=self.options.out,
                  flush=True)  # fmt: skip

    def ops(self) -> int:
        return sum(v.workload.tally.ops for v in self.volumes)

    def violations(self) -> int:
        return sum(v.model.violation_count() for v in self.volumes)


def run_chaos(options: ChaosOptions) -> ChaosReport:
    """Run the whole thing; the report says what passed."""
    if options.layout not in LAYOUTS:
        raise ValueError(f"unknown layout {options.layout!r}; known: {', '.join(LAYOUTS)}")
    layouts = [LAYOUTS[options.layout][i % len(LAYOUTS[options.layout])]
               for i in range(options.volumes)]  # fmt: skip
    if max(n for n, _, _ in layouts) > options.servers:
        raise ValueError(f"a layout needs more than {options.servers} servers")
    report = ChaosReport(
        seed=options.seed,
        duration_s=options.duration_s,
        network="loopback",
        volumes=[f"chaos{i} ({label})" for i, (_, _, label) in enumerate(layouts)],
        faults_requested=list(options.faults),
        masters="1 on SQLite" if options.masters == 1 else f"{options.masters} on etcd",
    )
    report.sabotage = list(options.sabotage)
    if options.sabotage:
        # Inherited by every process the run starts; read by none of this one's code.
        os.environ[sabotage.ENV] = ",".join(options.sabotage)
    options.directory.mkdir(parents=True, exist_ok=True)
    with _network(options, report) as lab:
        if options.masters > 1 and lab is None and "master-partition" in options.faults:
            report.faults_not_run["master-partition"] = (
                "a master group on loopback (a follower's redirect names the leader's own "
                "address, past any cut): it needs network namespaces"
            )
        small_disks = "disk-full" in options.faults and _can_mount(report)
        cluster = ChaosCluster(
            options.directory, server_count=options.servers, masters=options.masters, lab=lab,
            small_disks=small_disks, lease_ttl_s=options.lease_ttl_s,
        )  # fmt: skip
        run = _Run(options, cluster, report)
        try:
            run.say(f"cluster up: master {cluster.address} ({report.masters}), "
                    f"{options.servers} servers ({report.network}); "
                    f"logs in {cluster.logs}")  # fmt: skip
            _create_volumes(run, layouts)
            _fault_loop(run)
            _final_checks(run)
        finally:
            _teardown(run)
    report.elapsed_s = round(time.monotonic() - run.started, 1)
    return report


def _can_mount(report: ChaosReport) -> bool:
    """Whether the servers' data directories can be put on small filesystems (disk-full)."""
    why = ""
    if os.geteuid() != 0:
        why = "loop-mounting a small filesystem needs root"
    elif shutil.which("mkfs.ext4") is None:
        why = "mkfs.ext4 is not installed"
    if why:
        report.faults_not_run["disk-full"] = why
    return not why


@contextlib.contextmanager
def _network(options: ChaosOptions, report: ChaosReport) -> Iterator[NetLab | None]:
    """Namespaces when asked for (or when partitions are and they can be made)."""
    needs = "partition" in options.faults or (
        options.masters > 1 and "master-partition" in options.faults
    )
    want = options.netns if options.netns is not None else needs
    if not want:
        if "partition" in options.faults:
            report.faults_not_run["partition"] = "network namespaces off (--no-netns)"
        yield None
        return
    why = ""
    if os.geteuid() != 0:
        why = "network namespaces need root"
    else:
        try:
            lab = NetLab(options.servers).__enter__()
        except (NetnsUnavailableError, OSError, subprocess.SubprocessError) as exc:
            why = f"network namespaces unavailable: {exc}"
    if why:
        if options.netns:
            raise BlockyardError(why)
        report.faults_not_run["partition"] = why
        yield None
        return
    report.network = "namespaces + veth (partitions are links taken down)"
    try:
        yield lab
    finally:
        lab.close()


def _create_volumes(run: _Run, layouts: Sequence[tuple[int, int, str]]) -> None:
    o, cluster = run.options, run.cluster
    for i, (copies, mode, _) in enumerate(layouts):
        cluster.create_volume(f"chaos{i}", o.volume_bytes, replicas=copies, mode=mode)
    for i in range(len(layouts)):
        name = f"chaos{i}"
        wait_for(f"{name} active", partial(_active, cluster, name))
        info = cluster.get_volume(name)
        portals = tuple(parse_portal(p) for c in info.copies for p in c.addresses.iscsi_portals)
        device = IscsiBlockDevice(
            IscsiVolumeSpec(portals=portals, target_name=info.iqn, initiator_name=INITIATOR_NAME,
                            replacement_timeout_s=REPLACEMENT_TIMEOUT_S)
        )  # fmt: skip
        model = VolumeModel(i, o.volume_bytes // SECTOR_BYTES)
        workload = VolumeWorkload(model, device, seed=o.seed, writers=o.writers)
        run.volumes.append(_Volume(name, model, device, workload, Observer(cluster, name)))
    _wait_healed(run, o.heal_bound_s)
    run.started = time.monotonic()
    for v in run.volumes:
        v.model.origin_s = run.started
        v.workload.start()
        v.observer.start()
    wall = datetime.datetime.now().strftime("%H:%M:%S.%f")[:-3]
    run.say(f"{len(run.volumes)} volumes attached, {o.writers} writers each; warming up "
            f"(time 0 is {wall} in the servers' logs)")  # fmt: skip
    time.sleep(WARMUP_S)


def _active(cluster: ChaosCluster, name: str) -> bool:
    info = cluster.get_volume(name)
    return info.status == "active" and bool(info.iqn)


def _not_healed(run: _Run) -> str:
    """Why the cluster is not healed ("" when it is)."""
    for v in run.volumes:
        try:
            why = not_in_sync(run.cluster, v.name, v.device)
        except BlockyardError as exc:
            why = f"{type(exc).__name__}: {exc}"
        if why:
            return f"{v.name}: {why}"
    return ""


def _wait_healed(run: _Run, bound_s: float) -> float | None:
    """Seconds until healed, or None after ``bound_s`` (the reason is in the report)."""
    start = time.monotonic()
    why = "not checked"
    while time.monotonic() - start < bound_s:
        why = _not_healed(run)
        if not why:
            return time.monotonic() - start
        time.sleep(0.1)
    run.report.add_violation(5, "all", f"not healed within {bound_s:.0f} s: {why}",
                             time.monotonic() - run.started)  # fmt: skip
    return None


def _fault_loop(run: _Run) -> None:
    o = run.options
    kinds = [k for k in o.faults if k not in run.report.faults_not_run]
    if not kinds:
        run.say("no fault can run here: the workload runs alone")
        time.sleep(max(0.0, o.duration_s - (time.monotonic() - run.started)))
        return
    for spec in schedule(o.seed, kinds, len(run.volumes)):
        if time.monotonic() - run.started >= o.duration_s:
            return
        if not _one_fault(run, spec):
            run.say("the cluster did not heal: no further faults")
            return


def _one_fault(run: _Run, spec: FaultSpec) -> bool:
    fault = make_fault(run.cluster, spec, run.volumes[spec.volume].name)
    for v in run.volumes:
        v.model.fault_begin()
    began = time.monotonic()
    fault.inject()
    time.sleep(spec.hold_s)
    fault.end()
    heal_s = _wait_healed(run, run.options.heal_bound_s)
    healed = time.monotonic()
    unavailable = max(v.workload.gaps.longest_in(began, healed) for v in run.volumes)
    for v in run.volumes:
        v.model.fault_end()
    swept = all(v.workload.sweep(SWEEP_TIMEOUT_S) for v in run.volumes)
    result = FaultResult(
        number=spec.number, kind=spec.kind, target=fault.target, server=fault.server[:8],
        at_s=round(began - run.started, 2), hold_s=spec.hold_s,
        heal_s=None if heal_s is None else round(heal_s, 2),
        unavailable_s=round(unavailable, 2),
    )  # fmt: skip
    run.report.results.append(result)
    healed_text = "NOT healed" if heal_s is None else f"healed {heal_s:.1f} s after"
    run.say(
        f"{spec.describe()}: {fault.target} ({result.server}) held {spec.hold_s:.1f} s, "
        f"{healed_text}; longest I/O gap {unavailable:.1f} s; {run.ops()} I/Os, "
        f"{run.violations() + sum(run.report.checks.values())} violations"
    )
    if not swept:
        run.report.harness_errors.append(f"read-back after {spec.describe()} did not finish")
        return False
    time.sleep(spec.settle_s)
    return heal_s is not None


def _final_checks(run: _Run) -> None:
    run.say("stopping the workload; final read-back through the primary")
    for v in run.volumes:
        v.workload.stop()
    for v in run.volumes:
        try:
            flush = v.model.flush_begin()
            v.device.flush()
            v.model.flush_end(flush, ok=True, at_s=time.monotonic())
            read_all(v.model, v.device)
        except BlockyardError as exc:
            run.report.harness_errors.append(f"{v.name}: final read-back failed: {exc}")
    if _wait_healed(run, run.options.heal_bound_s) is not None:
        for v in run.volumes:
            _compare_copies(run, v)


def _compare_copies(run: _Run, v: _Volume) -> None:
    """Check 7: every copy's content hashes the same as the primary's."""
    cluster = run.cluster
    sums: dict[str, str] = {}
    for _ in range(CHECKSUM_ATTEMPTS):
        info = cluster.get_volume(v.name)
        sums = {}
        for c in info.copies:
            api = cluster.servers[c.server_id].fields["api"]

            async def checksum(api: str = api) -> str:
                async with VolumeServerClient(api, security=cluster.security) as client:
                    return (await client.checksum_volume(v.name)).sha256

            sums[c.server_id[:8] + ("*" if c.server_id == info.primary_server_id else "")] = (
                cluster._run(checksum())
            )
        if len(set(sums.values())) == 1:
            return
        time.sleep(1.0)
    run.report.add_violation(7, v.name, f"copies differ (* = primary): {sums}",
                             time.monotonic() - run.started)  # fmt: skip


def _teardown(run: _Run) -> None:
    report = run.report
    for v in run.volumes:
        v.workload.stop()
        v.observer.stop()
        report.harness_errors += v.workload.crashed
        _epoch_checks(run, v)
        c = v.model.counters
        for n, count in c.by_check.items():
            report.checks[n] = report.checks.get(n, 0) + count
        report.violations += [
            {
                "check": x.check,
                "volume": v.name,
                "message": x.message,
                "at_s": round(x.at_s - run.started, 3),
            }
            for x in v.model.violations
        ]
        report.ops += v.workload.tally.ops
        report.io_errors += v.workload.tally.errors
        for k, n in v.workload.tally.by_kind.items():
            report.ops_by_kind[k] = report.ops_by_kind.get(k, 0) + n
        report.durable_writes += c.durable
        report.sectors_checked += c.sectors_checked
        v.device.close()
    run.cluster.close()


def _epoch_checks(run: _Run, v: _Volume) -> None:
    """Check 4 from what the observer saw: the master's epochs never went down, and no epoch
    had two servers reporting themselves primary."""
    now = time.monotonic() - run.started
    epochs = [e for e, _ in v.observer.master_history]
    if epochs != sorted(epochs):
        run.report.add_violation(4, v.name, f"the master's epoch went down: {epochs}", now)
    for epoch, servers in v.observer.primaries_by_epoch.items():
        if len(servers) > 1:
            run.report.add_violation(
                4, v.name, f"epoch {epoch} had primaries {sorted(s[:8] for s in servers)}", now
            )
