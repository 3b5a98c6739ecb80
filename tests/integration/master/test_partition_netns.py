"""A partitioned primary fences itself (issue 13 §4), with real processes and a real network
partition: the primary's volume server runs in its own network namespace, joined to the rest
of the cluster (the master, the replica's server, this test) by one veth pair, and a writer
inside that namespace keeps writing to it through blockyard's userspace initiator. Taking the
link down leaves the primary and its writer on their own: no heartbeat reaches the master,
no record reaches the replica, and no packet comes back (the kernel drops them; nobody sees a
RST or a FIN).

What must hold: the isolated primary stops acknowledging writes on its own before the master
promotes the replica — in best_effort because its lease lapses; in sync_all at once, because a
plain write is acknowledged only when the replica received it (or was marked out of sync by
the master, which the isolated primary cannot reach) — so that no moment has two copies
acknowledging writes: the isolated writer's last acknowledged command completes before the
first write this test sends to the promoted copy completes, and within about a lease TTL of
the partition. When the
link comes back, the old primary is fenced by the new epoch, becomes a replica and catches up.

Needs root (network namespaces); skipped where namespaces cannot be made."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from blockyard import tls
from blockyard.attach.initiator import IscsiBlockDevice, IscsiVolumeSpec, parse_portal
from blockyard.bench.failover import Cluster, Proc, launch, wait_for
from blockyard.engine.epoch import Role
from blockyard.errors import BlockyardError
from blockyard.server.backend import VolumeDescription
from blockyard.server.client import VolumeServerClient
from blockyard.server.proto import volume_server_pb2 as vpb
from blockyard.testing import netns as netns_tools

LEASE_TTL_S = 2.0
#: The isolated primary's lease counts from the last heartbeat answer it got, up to one
#: heartbeat interval (0.5 s) before the partition; its clock check runs per command.
FENCE_BOUND_S = LEASE_TTL_S + 1.0
VOLUME = "part"
VOLUME_BYTES = 64 << 20
WRITER = Path(__file__).with_name("partition_writer.py")


@dataclass(frozen=True)
class Netns:
    name: str
    host_if: str
    inner_if: str
    host_addr: str
    inner_addr: str

    def partition(self) -> None:
        netns_tools.set_link(self.name, self.inner_if, up=False)

    def heal(self) -> None:
        netns_tools.set_link(self.name, self.inner_if, up=True)


@pytest.fixture
def netns() -> Iterator[Netns]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    tag = os.getpid() % 10000
    subnet = f"10.{150 + tag % 50}.{tag % 250}"
    ns = Netns(f"bypart{tag}", f"byp{tag}h", f"byp{tag}n", f"{subnet}.1", f"{subnet}.2")
    try:
        with netns_tools.namespace(ns.name, [ns.host_if]):
            netns_tools.add_veth(ns.name, ns.host_if, ns.inner_if, ns.host_addr, ns.inner_addr)
            yield ns
    except netns_tools.NetnsUnavailableError as exc:
        pytest.skip(str(exc))


class PartitionCluster(Cluster):
    """A master and the replica's server on the host side of the veth pair, the primary's
    server inside the namespace. The master places a volume's primary on the server with the
    fewest bytes allocated, so a one-copy filler volume on the host-side server first makes the
    namespace server the primary of the volume under test."""

    security = tls.TransportSecurity(insecure=True)

    def __init__(self, root: Path, ns: Netns) -> None:
        self._prepare(root)
        interval = "500ms"
        try:
            self.master = self._add(
                launch(
                    ["master", "--listen", f"{ns.host_addr}:0", "--insecure", "--store",
                     f"sqlite:///{root}/master.db", "--lease-ttl", f"{LEASE_TTL_S}s",
                     "--heartbeat-interval", interval],
                    self.logs / "master.log",
                )
            )  # fmt: skip
            self.address = self.master.fields["master"]

            def serve(i: int, host: str, wrapper: tuple[str, ...] = ()) -> Proc:
                args = ["serve", "--data-dir", str(root / f"s{i}")]
                for flag in ("--api-listen", "--iscsi-listen", "--replication-listen"):
                    args += [flag, f"{host}:0"]
                # A private test link: plaintext management API.
                args += ["--insecure", "--master", self.address, "--heartbeat-interval", interval]
                return self._add(launch(args, self.logs / f"serve-{i}.log", wrapper=wrapper))

            self.host_server = serve(1, ns.host_addr)
            wait_for("the host-side server alive", lambda: len(self.alive()) == 1)
            self._master(
                lambda c: c.create_volume(
                    "filler", VOLUME_BYTES, replica_count=1, mode=vpb.DURABILITY_MODE_BEST_EFFORT
                )
            )
            self.isolated = serve(0, ns.inner_addr, ("ip", "netns", "exec", ns.name))
            wait_for("both servers alive", lambda: len(self.alive()) == 2)
            for server in self.list_servers():
                proc = next(p for p in (self.isolated, self.host_server)
                            if p.fields["api"] == server.addresses.api)  # fmt: skip
                self.servers[server.server_id] = proc
        except BaseException:
            self.close()
            raise

    def _add(self, proc: Proc) -> Proc:
        self._procs.append(proc)
        return proc

    def server_id(self, proc: Proc) -> str:
        return next(sid for sid, p in self.servers.items() if p is proc)


def _read_log(path: Path) -> tuple[list[float], list[str]]:
    acks: list[float] = []
    errors: list[str] = []
    if not path.exists():
        return acks, errors
    for line in path.read_text().splitlines():
        kind, _, rest = line.partition(" ")
        if kind in ("w", "f") and rest:
            acks.append(float(rest))
        elif kind == "e":
            errors.append(rest)
    return acks, errors


async def _describe(api: str) -> VolumeDescription:
    async with VolumeServerClient(
        api, timeout_s=5.0, security=tls.TransportSecurity(insecure=True)
    ) as client:
        return await client.get_volume(VOLUME)


class FirstWrite:
    """Writes to one portal from this process until a write completes; records when."""

    def __init__(self, portal: str, iqn: str) -> None:
        self.completed_s: float | None = None
        self.errors: list[str] = []
        self._device = IscsiBlockDevice(
            IscsiVolumeSpec(
                portals=(parse_portal(portal),),
                target_name=iqn,
                initiator_name="iqn.2026-11.io.blockyard.test:partition-promoted",
                replacement_timeout_s=3.0,
            )
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="first-write", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._device.write(0, b"\xab" * 4096)
            except BlockyardError as exc:
                self.errors.append(f"{time.monotonic():.3f} {exc}")
                self._stop.wait(0.05)
                continue
            self.completed_s = time.monotonic()
            return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._device.close()


#: In sync_all the isolated primary acknowledges, after the cut, only writes whose receipt
#: was already on its way back: a round trip on loopback, with room for a loaded machine.
RECEIPT_CUT_S = 1.0


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "mode",
    [vpb.DURABILITY_MODE_SYNC_ALL, vpb.DURABILITY_MODE_BEST_EFFORT],
    ids=["sync_all", "best_effort"],
)
def test_an_isolated_primary_stops_acknowledging_before_the_replica_is_promoted(
    tmp_path: Path, netns: Netns, mode: int
) -> None:
    cluster = PartitionCluster(tmp_path, netns)
    writer: subprocess.Popen[bytes] | None = None
    first: FirstWrite | None = None
    try:
        info = cluster._master(
            lambda c: c.create_volume(VOLUME, VOLUME_BYTES, replica_count=2, mode=mode)
        )
        isolated_id = cluster.server_id(cluster.isolated)
        host_id = cluster.server_id(cluster.host_server)
        wait_for(
            "the volume active and in sync",
            lambda: (
                (v := cluster.get_volume(VOLUME)).status == "active"
                and bool(v.iqn)
                and all(c.state == "in_sync" for c in v.copies)
            ),
        )
        info = cluster.get_volume(VOLUME)
        assert info.primary_server_id == isolated_id, "the filler volume steers the primary"
        before_epoch = info.epoch
        iqn = info.iqn
        out = tmp_path / "isolated-writer.log"
        with (tmp_path / "logs" / "writer.log").open("w") as writer_log:
            writer = subprocess.Popen(
                ["ip", "netns", "exec", netns.name, sys.executable, str(WRITER),
                 cluster.isolated.fields["iscsi"].split(",")[0], iqn, str(out), "120"],
                stderr=writer_log,
            )  # fmt: skip
        wait_for(
            "the isolated writer's first acknowledgements", lambda: len(_read_log(out)[0]) > 50
        )

        netns.partition()
        partitioned_s = time.monotonic()
        first = FirstWrite(cluster.host_server.fields["iscsi"].split(",")[0], iqn)
        wait_for(
            "the master to promote the host-side copy",
            lambda: (
                (v := cluster.get_volume(VOLUME)).epoch > before_epoch
                and v.primary_server_id == host_id
            ),
        )
        promoted_seen_s = time.monotonic()
        wait_for("a write acknowledged by the promoted copy", lambda: first.completed_s is not None)
        assert first.completed_s is not None
        time.sleep(1.0)  # anything the isolated primary still acknowledged would show by now
        acks, errors = _read_log(out)
        before = [t for t in acks if t < partitioned_s]
        after = [t for t in acks if t >= partitioned_s]
        last_s = max(acks)
        print(
            "partition at 0: isolated primary's last acknowledgement "
            f"{last_s - partitioned_s:+.3f} s ({len(after)} after the partition, "
            f"{len(errors)} refused); promotion seen "
            f"{promoted_seen_s - partitioned_s:+.3f} s; promoted copy's first write "
            f"{first.completed_s - partitioned_s:+.3f} s"
        )
        assert before and partitioned_s - before[-1] < 1.0, "the writer was busy at the cut"
        assert last_s < first.completed_s, (
            "two copies acknowledged writes at once: the isolated primary acknowledged at "
            f"{last_s - partitioned_s:+.3f} s, the promoted one at "
            f"{first.completed_s - partitioned_s:+.3f} s"
        )
        assert last_s - partitioned_s < FENCE_BOUND_S, "the isolated primary did not fence"
        if mode == vpb.DURABILITY_MODE_BEST_EFFORT:
            assert after, "plain writes go on after the cut until the lease lapses"
        else:
            assert last_s - partitioned_s < RECEIPT_CUT_S, (
                "sync_all acknowledged a write the replica could not have received"
            )
        wait_for("the fenced primary's refusals", lambda: bool(_read_log(out)[1]), 15.0)

        netns.heal()
        healed = wait_for(
            "the old primary back as an in-sync replica",
            lambda: all(c.state == "in_sync" for c in cluster.get_volume(VOLUME).copies),
            timeout_s=90.0,
        )
        print(f"after the heal: both copies in sync within {healed:.1f} s")
        desc = cluster._run(_describe(cluster.isolated.fields["api"]))
        assert desc.role is Role.REPLICA and desc.epoch > before_epoch, desc
    finally:
        if first is not None:
            first.close()
        if writer is not None:
            writer.send_signal(signal.SIGKILL)
            writer.wait(timeout=30)
        cluster.close()
