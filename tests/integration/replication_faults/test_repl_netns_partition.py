"""A real network partition: the replica server runs in its own network namespace, joined to
the primary's by a veth pair, and the partition takes that link down (no proxy in the path;
the kernel drops the packets, TCP retransmits, neither side gets a RST or FIN).

A sync_all flush during the partition returns only after the replica was durably marked out of
sync (within the barrier timeout plus a few seconds); when the link comes back up the replica
catches up and holds the primary's bytes. The management API of the replica server travels
over a second veth pair, so the test can watch the replica while its data link is down.

Needs root (network namespaces); skipped where namespaces cannot be made."""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
from fault_helpers import (
    VOLUME,
    VOLUME_BYTES,
    Model,
    Rig,
    assert_degraded_before_ack,
    describe,
    watch_state,
)

from blockyard import tls
from blockyard.engine.epoch import Role
from blockyard.replication.commit import DurabilityMode
from blockyard.server.client import VolumeServerClient
from blockyard.testing import netns as netns_tools
from blockyard.testing.cluster import (
    API_SLOW_TIMEOUT_S,
    API_TIMEOUT_S,
    START_TIMEOUT_S,
    LocalCluster,
    ServerProc,
)

T = TypeVar("T")


@dataclass(frozen=True)
class Netns:
    name: str
    #: (host side, namespace side) interface names and the namespace side's address.
    data: tuple[str, str]
    data_addr: str
    mgmt: tuple[str, str]
    mgmt_addr: str

    def partition(self) -> None:
        netns_tools.set_link(self.name, self.data[1], up=False)

    def heal(self) -> None:
        netns_tools.set_link(self.name, self.data[1], up=True)


@pytest.fixture
def netns() -> Iterator[Netns]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    tag = os.getpid() % 10000
    ns = Netns(
        f"byfault{tag}",
        (f"byd{tag}h", f"byd{tag}n"),
        f"10.{200 + tag % 50}.{tag % 250}.2",
        (f"bym{tag}h", f"bym{tag}n"),
        f"10.{200 + tag % 50}.{tag % 250}.6",
    )
    subnet = ns.data_addr.rsplit(".", 1)[0]
    try:
        with netns_tools.namespace(ns.name, [ns.data[0], ns.mgmt[0]]):
            netns_tools.add_veth(ns.name, *ns.data, f"{subnet}.1", ns.data_addr)
            netns_tools.add_veth(ns.name, *ns.mgmt, f"{subnet}.5", ns.mgmt_addr)
            yield ns
    except netns_tools.NetnsUnavailableError as exc:
        pytest.skip(str(exc))


@dataclass
class NetnsServer(ServerProc):
    """A volume server inside a network namespace: its API on the management veth (plaintext,
    --insecure: a private link in a test), its replication listener on the data veth."""

    netns: str = ""
    api_host: str = ""
    data_host: str = ""

    @property
    def api(self) -> str:
        return f"{self.api_host}:{self.api_port}"

    @property
    def replication_address(self) -> str:
        return f"{self.data_host}:{self.replication_port}"

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        argv = ["ip", "netns", "exec", self.netns, sys.executable, "-m", "blockyard.cli.main"]
        argv += ["--log-level", "INFO", "serve", "--data-dir", str(self.data_dir)]
        argv += ["--api-listen", self.api, "--insecure", "--iscsi-listen", self.portal]
        argv += ["--replication-listen", self.replication_address, "--shutdown-timeout", "10"]
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env=dict(os.environ, PYTHONUNBUFFERED="1"),
            )
        out = self.process.stdout
        assert out is not None
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: lines.put(out.readline()), daemon=True).start()
        try:
            line = lines.get(timeout=START_TIMEOUT_S)
        except queue.Empty:
            line = ""
        if not line.startswith("READY "):
            self._end(signal.SIGKILL)
            raise RuntimeError(f"{self.name} did not start: {self.log_path.read_text()}")

    def call(self, fn: Callable[[VolumeServerClient], Awaitable[T]]) -> T:
        async def main() -> T:
            async with VolumeServerClient(
                self.api,
                timeout_s=API_TIMEOUT_S,
                slow_timeout_s=API_SLOW_TIMEOUT_S,
                security=tls.TransportSecurity(insecure=True),
            ) as client:
                return await fn(client)

        return asyncio.run(main())


@pytest.fixture
def netns_rig(tmp_path: Path, netns: Netns) -> Iterator[Rig]:
    root = tmp_path / "cluster"
    cluster = LocalCluster.create(root, 1)
    replica = NetnsServer(
        "server1",
        root / "server1" / "data",
        root / "logs",
        netns=netns.name,
        api_host=netns.mgmt_addr,
        data_host=netns.data_addr,
    )
    cluster.servers.append(replica)
    rig: Rig | None = None
    try:
        cluster.start()
        primary = cluster.servers[0]
        desc = primary.call(lambda c: c.create_volume(VOLUME, VOLUME_BYTES))

        async def as_replica(c: VolumeServerClient) -> None:
            await c.create_volume(VOLUME, VOLUME_BYTES, volume_uuid=desc.uuid)
            await c.set_replication(VOLUME, role=Role.REPLICA, epoch=1)

        replica.call(as_replica)
        address = replica.replication_address
        primary.call(
            lambda c: c.set_replication(
                VOLUME, role=Role.PRIMARY, epoch=1, mode=DurabilityMode.SYNC_ALL, replicas=[address]
            )
        )
        rig = Rig(cluster, desc, address)
        rig.wait_in_sync()
        yield rig
    finally:
        if rig is not None:
            rig.close()
        cluster.stop()


def test_link_down_during_a_flush_degrades_after_the_mark(netns_rig: Rig, netns: Netns) -> None:
    rig = netns_rig
    model = Model(rig.attach())
    model.write_range(range(0, 64))
    assert model.flush().error is None
    assert rig.replica_info().durable_lsn >= rig.info().last_lsn
    model.write_range(range(64, 96))
    netns.partition()
    partitioned_s = time.monotonic()
    try:
        model.write(200)
        flushed_lsn = rig.info().last_lsn
        with watch_state(rig) as evidence:
            result = model.flush()
            returned_ns = time.time_ns()
            mark = evidence()
        print(f"veth down: {describe(result, mark)}")
        assert_degraded_before_ack(rig, result, flushed_lsn, returned_ns, mark)
        assert result.error is None, result.error
        # The replica server is alive and reachable on its management link meanwhile, and
        # holds nothing past what the partition let through.
        assert rig.replica_info().last_lsn < flushed_lsn
    finally:
        netns.heal()
    print(f"partition lasted {time.monotonic() - partitioned_s:.2f} s")
    rep = rig.wait_in_sync_while_writing(model)
    print(f"after the link came back: {rep.plan} ({rep.plan_reason})")
    assert model.flush().error is None
    model.verify()
    rig.assert_same_bytes()
