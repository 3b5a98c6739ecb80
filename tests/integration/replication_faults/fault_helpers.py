"""Helpers of the replication network-fault tests: two real `blockyard serve` processes with a
fault proxy (blockyard.testing.faultproxy) on the replication link, a userspace iSCSI client on
the primary, and the checks every test shares.

The primary is told the proxy's address as its replica's address; the proxy dials the replica
server's ``--replication-listen``. Both keep their ports across restarts, so the replica keeps
its name."""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from blockyard.attach.initiator import IscsiBlockDevice
from blockyard.engine.epoch import Role
from blockyard.replication.channel import DEAD_PEER_TIMEOUT_S
from blockyard.replication.commit import BARRIER_TIMEOUT_S, DurabilityMode
from blockyard.replication.report import ReplicaReport, ReplicationInfo
from blockyard.server.backend import VolumeDescription
from blockyard.server.client import VolumeServerClient
from blockyard.testing.cluster import LocalCluster, ServerProc
from blockyard.testing.faultproxy import Direction, FaultProxy

INITIATOR = "iqn.2026-12.io.blockyard.test:replication-faults"
VOLUME = "vol"
VOLUME_BYTES = 64 << 20
#: One 4 KiB block in 512-byte LBAs.
LBAS_PER_BLOCK = 8
BLOCK_BYTES = 4096
#: Bound on waits for replication to converge (reconnect backoff reaches 5 s; shared cores).
CONVERGE_TIMEOUT_S = 90.0
#: What a flush during a partition may take beyond the barrier timeout: the 0.25 s tick, an
#: fsync of the out-of-sync mark and the iSCSI round trip, on a loaded machine.
DEGRADE_SLACK_S = 5.0
FLUSH_BOUND_S = BARRIER_TIMEOUT_S + DEGRADE_SLACK_S
#: A link this slow each way makes a barrier's round trip outlast BARRIER_TIMEOUT_S while
#: neither side is ever silent for DEAD_PEER_TIMEOUT_S.
SLOW_ONE_WAY_S = 3.0


@dataclass
class Rig:
    """A primary (server 0) replicating ``VOLUME`` to a replica (server 1) it knows as
    ``replica_address`` — the fault proxy's address when there is one."""

    cluster: LocalCluster
    desc: VolumeDescription
    replica_address: str
    fault_proxy: FaultProxy | None = None
    devices: list[IscsiBlockDevice] = field(default_factory=list)

    @property
    def proxy(self) -> FaultProxy:
        assert self.fault_proxy is not None, "this rig has no fault proxy"
        return self.fault_proxy

    @property
    def primary(self) -> ServerProc:
        return self.cluster.servers[0]

    @property
    def replica(self) -> ServerProc:
        return self.cluster.servers[1]

    @property
    def state_path(self) -> Path:
        """The primary's durable replication state of the volume."""
        return self.primary.data_dir / VOLUME / "replication.json"

    def attach(self) -> IscsiBlockDevice:
        dev = IscsiBlockDevice.connect(
            [self.primary.portal], self.desc.export.iqn, INITIATOR, replacement_timeout_s=30.0
        )
        self.devices.append(dev)
        return dev

    def info(self) -> ReplicationInfo:
        return self.primary.call(lambda c: c.get_replication(VOLUME))

    def report(self) -> ReplicaReport:
        rep = self.info().replica(self.replica_address)
        assert rep is not None, f"the primary does not list {self.replica_address}"
        return rep

    def replica_info(self) -> ReplicationInfo:
        return self.replica.call(lambda c: c.get_replication(VOLUME))

    def file_in_sync(self) -> bool:
        doc = json.loads(self.state_path.read_text())
        (entry,) = doc["replicas"]
        assert entry["address"] == self.replica_address, doc
        return bool(entry["in_sync"])

    def wait_report(
        self, predicate: Callable[[ReplicaReport], bool], what: str, timeout_s: float
    ) -> ReplicaReport:
        deadline = time.monotonic() + timeout_s
        rep = self.report()
        while not predicate(rep):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"replica not {what} within {timeout_s} s: {rep}\n{self.log_tails()}"
                )
            time.sleep(0.05)
            rep = self.report()
        return rep

    def wait_in_sync(self, timeout_s: float = CONVERGE_TIMEOUT_S) -> ReplicaReport:
        return self.wait_report(lambda r: r.state == "in_sync" and r.in_sync, "in sync", timeout_s)

    def wait_in_sync_while_writing(
        self, model: Model, *, block: int = 1000, timeout_s: float = CONVERGE_TIMEOUT_S
    ) -> ReplicaReport:
        """Until the replica is in sync, writing ``block`` every half second: a live volume,
        as in production (an idle one is test_bug_idle_replica_never_back_in_sync.py)."""
        deadline = time.monotonic() + timeout_s
        while True:
            rep = self.report()
            if rep.state == "in_sync" and rep.in_sync:
                return rep
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"replica not in sync within {timeout_s} s: {rep}\n{self.log_tails()}"
                )
            model.write(block)
            time.sleep(0.5)

    def wait_out_of_sync(self, timeout_s: float = CONVERGE_TIMEOUT_S) -> ReplicaReport:
        return self.wait_report(
            lambda r: r.state == "out_of_sync" and not r.in_sync, "out of sync", timeout_s
        )

    def assert_same_bytes(self) -> str:
        """The replica holds exactly the primary's bytes (whole-volume checksums) and LSNs."""
        primary = self.cluster.checksum(VOLUME, 0)
        replica = self.cluster.checksum(VOLUME, 1)
        assert primary == replica, f"primary {primary} != replica {replica}\n{self.log_tails()}"
        return primary[0]

    def log(self, server: ServerProc) -> str:
        return "".join(
            p.read_text(errors="replace") for p in sorted(server.log_dir.glob(f"{server.name}-*"))
        )

    def log_tails(self, lines: int = 40) -> str:
        out = []
        for s in self.cluster.servers:
            tail = self.log(s).splitlines()[-lines:]
            out.append(f"--- {s.name} log tail ---\n" + "\n".join(tail))
        return "\n".join(out)

    def close(self) -> None:
        for dev in self.devices:
            dev.close()
        self.devices.clear()


def make_rig(
    root: Path, mode: DurabilityMode = DurabilityMode.SYNC_ALL, *, epoch: int = 1
) -> Iterator[Rig]:
    """Start the two servers and the proxy, replicate ``VOLUME`` and wait until it is in
    sync; stop everything afterwards (servers by SIGTERM, SIGKILL past the bound)."""
    cluster = LocalCluster.create(root, 2)
    proxy: FaultProxy | None = None
    rig: Rig | None = None
    try:
        cluster.start()
        primary, replica = cluster.servers
        proxy = FaultProxy(replica.replication_address).start()
        desc = primary.call(lambda c: c.create_volume(VOLUME, VOLUME_BYTES))

        async def as_replica(c: VolumeServerClient) -> None:
            await c.create_volume(VOLUME, VOLUME_BYTES, volume_uuid=desc.uuid)
            await c.set_replication(VOLUME, role=Role.REPLICA, epoch=epoch)

        replica.call(as_replica)
        address = proxy.address
        primary.call(
            lambda c: c.set_replication(
                VOLUME, role=Role.PRIMARY, epoch=epoch, mode=mode, replicas=[address]
            )
        )
        rig = Rig(cluster, desc, address, proxy)
        rig.wait_in_sync()
        yield rig
    finally:
        if rig is not None:
            rig.close()
        if proxy is not None:
            proxy.close()
        cluster.stop()


def block(lba_block: int, seq: int) -> bytes:
    """A 4 KiB block that names its block number and write sequence (and is otherwise
    random), so a misplaced or stale block is recognised."""
    head = f"block {lba_block} write {seq} ".encode()
    return head + os.urandom(BLOCK_BYTES - len(head))


@dataclass
class FlushResult:
    started_s: float
    ended_s: float
    error: BaseException | None
    lsn: int = 0

    @property
    def latency_s(self) -> float:
        return self.ended_s - self.started_s


class Model:
    """What the client wrote and had acknowledged, block by block (one writer thread)."""

    def __init__(self, dev: IscsiBlockDevice) -> None:
        self.dev = dev
        self.blocks: dict[int, bytes] = {}
        #: Blocks whose last write failed: it may or may not have landed (SBC-4 says nothing
        #: of the medium after a failed WRITE), so either value may be read.
        self.uncertain: dict[int, set[bytes]] = {}
        self.seq = 0

    def write(self, b: int, *, fua: bool = False) -> None:
        self.seq += 1
        data = block(b, self.seq)
        self.dev.write(b * LBAS_PER_BLOCK, data, fua=fua)
        self.blocks[b] = data
        self.uncertain.pop(b, None)

    def write_timed(self, b: int) -> FlushResult:
        """One plain write, timed and caught like :meth:`flush`: in sync_all it too is
        acknowledged only once the replica received it, or was durably marked out of sync
        (or it fails)."""
        self.seq += 1
        data = block(b, self.seq)
        started = time.monotonic()
        try:
            self.dev.write(b * LBAS_PER_BLOCK, data)
        except Exception as exc:
            before = self.blocks.pop(b, bytes(BLOCK_BYTES))
            self.uncertain[b] = {*self.uncertain.get(b, {before}), data}
            return FlushResult(started, time.monotonic(), exc)
        self.blocks[b] = data
        self.uncertain.pop(b, None)
        return FlushResult(started, time.monotonic(), None)

    def write_range(self, blocks: range) -> None:
        for b in blocks:
            self.write(b)

    def flush(self) -> FlushResult:
        started = time.monotonic()
        try:
            self.dev.flush()
        except Exception as exc:
            return FlushResult(started, time.monotonic(), exc)
        return FlushResult(started, time.monotonic(), None)

    def verify(self) -> None:
        """Every block reads back as last written (through the primary)."""
        for b, data in sorted(self.blocks.items()):
            got = self.dev.read(b * LBAS_PER_BLOCK, LBAS_PER_BLOCK)
            assert got == data, f"block {b}: read {got[:40]!r}, last wrote {data[:40]!r}"
        for b, values in sorted(self.uncertain.items()):
            got = self.dev.read(b * LBAS_PER_BLOCK, LBAS_PER_BLOCK)
            assert got in values, f"block {b}: read {got[:40]!r}, never written there"


class Writer(threading.Thread):
    """Writes blocks of a region in a seeded order with a flush every ``flush_every`` writes,
    until stopped; records every flush. Any error other than a flush's is fatal (a write waits
    for the replica's receipt, but where the out-of-sync mark can be persisted it degrades)."""

    def __init__(
        self, model: Model, *, blocks: int, flush_every: int, seed: int, burst: int = 1
    ) -> None:
        super().__init__(daemon=True, name="writer")
        self.model = model
        self.region_blocks = blocks
        self.flush_every = flush_every
        self.burst = burst
        self.seed = seed
        self.stop_flag = threading.Event()
        #: Held by the writer for each write (and flush); :meth:`pause` takes it.
        self._gate = threading.Lock()
        self._paused = False
        self.flushes: list[FlushResult] = []
        self.errors: list[BaseException] = []
        self.writes = 0

    def run(self) -> None:
        rng = random.Random(self.seed)
        try:
            while not self.stop_flag.is_set():
                if not self._gate.acquire(timeout=0.1):
                    continue
                try:
                    first = rng.randrange(self.region_blocks - self.burst + 1)
                    for b in range(first, first + self.burst):
                        self.model.write(b)
                    self.writes += 1
                    if self.writes % self.flush_every == 0:
                        self.flushes.append(self.model.flush())
                finally:
                    self._gate.release()
        except BaseException as exc:  # the test asserts there were none
            self.errors.append(exc)

    def pause(self, timeout_s: float = 60.0) -> None:
        """Stop writing (returns once the writer is between writes) until :meth:`resume`."""
        assert not self._paused
        assert self._gate.acquire(timeout=timeout_s), "the writer did not pause"
        self._paused = True

    def resume(self) -> None:
        if self._paused:
            self._paused = False
            self._gate.release()

    def wait_writes(self, more: int, timeout_s: float = 60.0) -> None:
        target = self.writes + more
        deadline = time.monotonic() + timeout_s
        while self.writes < target:
            assert not self.errors, self.errors
            assert self.is_alive(), "the writer stopped"
            assert time.monotonic() < deadline, f"the writer made no progress ({self.writes})"
            time.sleep(0.01)

    def finish(self, timeout_s: float = 120.0) -> None:
        self.stop_flag.set()
        self.resume()
        self.join(timeout_s)
        assert not self.is_alive(), "the writer did not stop"
        assert not self.errors, self.errors


@dataclass
class MarkEvidence:
    """When the primary's replication.json said the replica is out of sync, seen from here."""

    #: monotonic time a polling thread first read ``in_sync: false`` (None: never).
    seen_s: float | None
    #: The file's ctime (its last rename into place) in wall-clock ns, read after the flush.
    ctime_ns: int
    in_sync: bool


@contextmanager
def watch_state(rig: Rig) -> Iterator[Callable[[], MarkEvidence]]:
    """Poll the primary's replication.json every millisecond while the block runs; the
    yielded function returns the evidence so far."""
    seen: list[float] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set() and not seen:
            try:
                in_sync = rig.file_in_sync()
            except (OSError, ValueError):  # replaced under us: read again
                continue
            if not in_sync:
                seen.append(time.monotonic())
            time.sleep(0.001)

    thread = threading.Thread(target=poll, daemon=True, name="watch-state")
    thread.start()

    def evidence() -> MarkEvidence:
        st = os.stat(rig.state_path)
        return MarkEvidence(seen[0] if seen else None, st.st_ctime_ns, rig.file_in_sync())

    try:
        yield evidence
    finally:
        stop.set()
        thread.join(10.0)


def assert_degraded_before_ack(
    rig: Rig, result: FlushResult, flushed_lsn: int, returned_wall_ns: int, mark: MarkEvidence
) -> None:
    """A flush that returned during a partition returned only after the replica was durably
    marked out of sync — or it failed. Either way within the bound."""
    assert result.latency_s <= FLUSH_BOUND_S, (
        f"the flush took {result.latency_s:.2f} s (bound {FLUSH_BOUND_S} s)\n{rig.log_tails()}"
    )
    rep = rig.report()
    if result.error is not None:
        # Failing is allowed; acknowledging is what must not happen without the mark.
        return
    assert rep.acked_lsn < flushed_lsn, (
        f"the replica cannot have acknowledged LSN {flushed_lsn} through the partition: {rep}"
    )
    assert rep.state == "out_of_sync" and not rep.in_sync, (
        f"the flush of LSN {flushed_lsn} was acknowledged while the replica still counted: "
        f"{rep}\n{rig.log_tails()}"
    )
    assert not mark.in_sync, "replication.json still says in sync after a degraded flush"
    # The mark's rename happened before the flush returned: the inode's ctime is set from the
    # coarse clock, which never runs ahead of time.time_ns() read after the return.
    assert mark.ctime_ns <= returned_wall_ns, (
        f"replication.json was replaced {(mark.ctime_ns - returned_wall_ns) / 1e6:.1f} ms "
        "after the flush returned"
    )


def describe(result: FlushResult, mark: MarkEvidence, what: str = "flush") -> str:
    """One line for the test's output: the flush's latency and outcome, and how long before
    its return a polling thread saw the out-of-sync mark (polling lags by up to ~1 ms, so a
    mark made just before the return may be seen only after it)."""
    outcome = "ok" if result.error is None else f"failed: {result.error}"
    if mark.seen_s is None:
        seen = "not yet seen by the poller"
    else:
        seen = f"seen {1000 * (result.ended_s - mark.seen_s):+.1f} ms before the return"
    return f"{what} returned after {result.latency_s:.3f} s ({outcome}); out-of-sync mark {seen}"


def degrade_by_round_trip_timeout(rig: Rig, model: Model) -> None:
    """Over the slow link (a round trip past the timeout, never silent for the dead-peer
    timeout) the first write waits for the replica's receipt, which cannot come in time: the
    replica is durably marked out of sync by the timeout, with the connection up, and only
    then is the write acknowledged. The writes and the flush after it wait for nothing. The
    link stays slow."""
    assert SLOW_ONE_WAY_S < DEAD_PEER_TIMEOUT_S < 2 * SLOW_ONE_WAY_S
    assert 2 * SLOW_ONE_WAY_S > BARRIER_TIMEOUT_S
    model.write_range(range(0, 16))
    assert model.flush().error is None
    rig.proxy.set_delay(SLOW_ONE_WAY_S, Direction.BOTH)
    with watch_state(rig) as evidence:
        result = model.write_timed(16)
        returned_ns = time.time_ns()
        mark = evidence()
    written_lsn = rig.info().last_lsn
    print(f"{SLOW_ONE_WAY_S:g} s each way: {describe(result, mark, 'write')}")
    assert_degraded_before_ack(rig, result, written_lsn, returned_ns, mark)
    assert result.error is None, result.error
    # Degraded by the timeout, not by a dead connection.
    assert result.latency_s >= BARRIER_TIMEOUT_S, result
    assert result.latency_s <= FLUSH_BOUND_S, result
    log = rig.log(rig.primary)
    assert f"did not confirm receipt of LSN {written_lsn}" in log, rig.log_tails()
    assert "its connection dropped" not in log, rig.log_tails()
    assert rig.report().connected, rig.report()
    model.write_range(range(17, 32))
    after = model.flush()
    assert after.error is None, after.error
    assert after.latency_s < BARRIER_TIMEOUT_S, after
