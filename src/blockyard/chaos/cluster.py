"""The chaos harness's own cluster: a real ``blockyard master`` (SQLite store) and N real
``blockyard serve --master``, each server in its own network namespace when a
:class:`~blockyard.chaos.netlab.NetLab` is given (so it can be partitioned), else on loopback.
Every process keeps its data directory and ports across a kill -9 and restart, as a
Kubernetes pod on the same node and volume would. Each server's replication listener sits
behind a :class:`~blockyard.testing.faultproxy.FaultProxy` in this process (primaries dial the
proxy), so the links to a replica can be delayed.

With ``masters`` > 1 the cluster runs a **master group**: a one-member etcd (Debian's
etcd-server) as the store and that many ``blockyard master`` processes electing a leader
through it; the servers are given every master's address. A master fault then kills the
leader. In namespaces the masters are reached at the lab's master address (see
:class:`~blockyard.chaos.netlab.NetLab`), and a server is cut from them by a route; on loopback
a follower's redirect would bypass any proxy, so a server cannot be cut from the group there."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Final

from blockyard import tls
from blockyard.bench.failover import Cluster, Proc, launch, wait_for
from blockyard.chaos.disks import SmallDisk
from blockyard.chaos.netlab import NetLab
from blockyard.chaos.timens import TimeNamespace
from blockyard.master.proto import master_pb2 as mpb
from blockyard.netports import free_port
from blockyard.testing.etcd import EtcdServer, start_etcd
from blockyard.testing.faultproxy import FaultProxy

LOOPBACK: Final = "127.0.0.1"


class ChaosCluster(Cluster):
    """A master and ``server_count`` servers; kill, pause, partition and restart any of them."""

    #: A private test network: plaintext management API (``--insecure`` on every process).
    security = tls.TransportSecurity(insecure=True)

    def __init__(
        self,
        root: Path,
        *,
        server_count: int = 3,
        masters: int = 1,
        lab: NetLab | None = None,
        small_disks: bool = False,
        lease_ttl_s: float = 2.0,
        heartbeat_interval_s: float = 0.5,
    ) -> None:
        self._prepare(root)
        self.lab = lab
        self._slot: dict[str, int] = {}  # server id → its namespace in ``lab``
        self._replication: dict[str, str] = {}  # server id → its replication listen address
        self.proxies: list[FaultProxy] = []  # in front of each server's replication listener
        self.master_links: list[FaultProxy] = []  # each server's way to the master
        #: Server id → the time namespace it runs in (clock faults), and the wrapper without it.
        self.clocks: dict[str, TimeNamespace] = {}
        #: Slot → the small filesystem under the server's data directory (disk-full faults).
        self.disks: list[SmallDisk] = []
        self._base_wrapper: dict[str, tuple[str, ...]] = {}
        interval = f"{int(heartbeat_interval_s * 1000)}ms"
        self.etcd: EtcdServer | None = None
        self.masters: list[Proc] = []
        self.master_ports: list[int] = []
        try:
            self._start_masters(root, masters, lease_ttl_s, interval)
            started: list[Proc] = []
            replication: list[str] = []
            for i in range(server_count):
                net = lab.servers[i] if lab is not None else None
                addr = net.inner_addr if net is not None else LOOPBACK
                # Replication goes through a fault proxy (delay faults): the server listens on
                # an address of its own and advertises the proxy's host, on the same port.
                port = free_port()
                listen = f"{net.inner_addr if net is not None else f'127.0.1.{i + 1}'}:{port}"
                advertise = net.host_addr if net is not None else LOOPBACK
                self.proxies.append(
                    FaultProxy(listen, listen_host=advertise, listen_port=port).start()
                )
                replication.append(listen)
                data_dir = root / f"s{i}"
                if small_disks:
                    self.disks.append(SmallDisk(root / f"disk{i}.img", data_dir))
                    data_dir = self.disks[-1].data_dir
                args = ["serve", "--data-dir", str(data_dir)]
                for flag in ("--api-listen", "--iscsi-listen"):
                    args += [flag, f"{addr}:0"]
                args += ["--replication-listen", listen, "--replication-advertise", advertise]
                if self.group:
                    masters_arg = self.address  # cut by the lab's route (module docstring)
                else:
                    # Its way to the master through a proxy (master-partition faults): cut, the
                    # server still reaches its peers and the initiator.
                    link = FaultProxy(self.address, listen_host=advertise).start()
                    self.master_links.append(link)
                    masters_arg = link.address
                args += ["--insecure", "--master", masters_arg, "--heartbeat-interval", interval]
                wrapper = net.wrapper if net is not None else ()
                started.append(
                    self._add(launch(args, self.logs / f"serve-{i}.log", wrapper=wrapper))
                )
            wait_for(f"{server_count} alive servers", lambda: len(self.alive()) == server_count)
            for server in self.list_servers():
                i, proc = next(
                    (i, p) for i, p in enumerate(started) if p.fields["api"] == server.addresses.api
                )
                self.servers[server.server_id] = proc
                self._base_wrapper[server.server_id] = proc.wrapper
                self._slot[server.server_id] = i
                self._replication[server.server_id] = replication[i]
        except BaseException:
            self.close()
            raise

    def _start_masters(self, root: Path, count: int, lease_ttl_s: float, interval: str) -> None:
        """One master on a SQLite store, or ``count`` on a fresh etcd (a master group)."""
        lab = self.lab
        # With namespaces the masters listen on every address: each server dials the single
        # master at the host end of its own link, a group at the lab's master address.
        host = "0.0.0.0" if lab is not None else LOOPBACK
        common = ["--insecure", "--lease-ttl", f"{lease_ttl_s}s", "--heartbeat-interval", interval]
        if count == 1:
            self.master = self._add(
                launch(["master", "--listen", f"{host}:0", "--store", f"sqlite:///{root}/master.db",
                        *common], self.logs / "master.log")
            )  # fmt: skip
            self.master_ports = [int(self.master.fields["master"].rsplit(":", 1)[1])]
            self.masters = [self.master]
            self.address = f"{LOOPBACK}:{self.master_ports[0]}"
            return
        (root / "etcd").mkdir(exist_ok=True)
        self.etcd = start_etcd(root / "etcd", name="chaos")
        advertised = lab.master_addr if lab is not None else LOOPBACK
        addresses = []
        for j in range(count):
            port = free_port()
            proc = self._add(
                launch(["master", "--listen", f"{host}:{port}", "--advertise",
                        f"{advertised}:{port}", "--master-id", f"m{j}",
                        "--store", self.etcd.url("/chaos"), *common],
                       self.logs / f"master-{j}.log")
            )  # fmt: skip
            self.masters.append(proc)
            self.master_ports.append(port)
            addresses.append(f"{advertised}:{port}")
        self.master = self.masters[0]
        self.address = ",".join(addresses)

    @property
    def group(self) -> bool:
        """Several masters on etcd (a leader among them)."""
        return len(self.masters) > 1

    def close(self) -> None:
        super().close()
        for proxy in (*self.proxies, *self.master_links):
            proxy.close()
        if self.etcd is not None:
            self.etcd.stop()
        for clock in self.clocks.values():
            clock.close()
        for disk in self.disks:
            disk.close()

    def _add(self, proc: Proc) -> Proc:
        self._procs.append(proc)
        return proc

    def slot(self, server_id: str) -> int:
        """The server's index (its data directory ``s{i}`` and namespace)."""
        return self._slot[server_id]

    def kill_server(self, server_id: str) -> None:
        """SIGKILL, as in a crash (the page cache survives; the process does not)."""
        self.kill(server_id)

    def restart_server(self, server_id: str) -> None:
        """Start a killed server again on its data directory, ports and namespace."""
        self.restart(server_id, self._replication[server_id])

    def restart_skewed(self, server_id: str, offset_s: int) -> None:
        """Start a killed server again as :meth:`restart_server` does, in a new time namespace
        whose monotonic clock is ``offset_s`` from the host's (it stays there until its next
        clock fault)."""
        clock = TimeNamespace(offset_s)
        old = self.clocks.pop(server_id, None)
        self.clocks[server_id] = clock
        self.servers[server_id].wrapper = clock.wrapper + self._base_wrapper[server_id]
        if old is not None:
            old.close()
        self.restart_server(server_id)

    def fill_disk(self, server_id: str) -> None:
        """The filesystem under the server's data directory runs out of space."""
        self.disks[self._slot[server_id]].fill()

    def free_disk(self, server_id: str) -> None:
        self.disks[self._slot[server_id]].unfill()

    def pause(self, server_id: str) -> None:
        """SIGSTOP: the process keeps its sockets and memory but runs nothing."""
        os.kill(self.servers[server_id].process.pid, signal.SIGSTOP)

    def resume(self, server_id: str) -> None:
        os.kill(self.servers[server_id].process.pid, signal.SIGCONT)

    def partition(self, server_id: str) -> None:
        assert self.lab is not None, "partitions need the namespace network"
        self.lab.partition(self._slot[server_id])

    def heal(self, server_id: str) -> None:
        assert self.lab is not None, "partitions need the namespace network"
        self.lab.heal(self._slot[server_id])

    def delay(self, server_id: str, delay_s: float) -> None:
        """Every byte to and from the server's replication listener ``delay_s`` late: the
        links from primaries to the replica copies it holds."""
        self.proxies[self._slot[server_id]].set_delay(delay_s)

    def undelay(self, server_id: str) -> None:
        self.proxies[self._slot[server_id]].pass_through()

    def cut_from_master(self, server_id: str) -> None:
        """The server's link to the master (every master of a group) goes silent."""
        if self.group:
            assert self.lab is not None, "a server is cut from a master group by a route"
            self.lab.cut_from_master(self._slot[server_id])
        else:
            self.master_links[self._slot[server_id]].blackhole()

    def reconnect_to_master(self, server_id: str) -> None:
        if self.group:
            assert self.lab is not None
            self.lab.reconnect_to_master(self._slot[server_id])
        else:
            self.master_links[self._slot[server_id]].pass_through()

    def leader(self) -> int:
        """The index of the master leading now (0 for a single master)."""
        if not self.group:
            return 0
        info = self._master(lambda c: c.get_leader())
        assert isinstance(info, mpb.LeaderInfo)
        port = int(info.leader_address.rsplit(":", 1)[1]) if info.leader_address else -1
        if port not in self.master_ports:
            raise ValueError(f"no master leads now (GetLeader: {info.leader_address!r})")
        return self.master_ports.index(port)

    def kill_master(self, index: int) -> None:
        self.masters[index].stop(signal.SIGKILL)

    def restart_master(self, index: int) -> None:
        """Master ``index`` again on its store and its address (the servers dial it there)."""
        old = self.masters[index]
        args = list(old.args)
        listen = args.index("--listen") + 1
        args[listen] = f"{args[listen].rsplit(':', 1)[0]}:{self.master_ports[index]}"
        self.masters[index] = self._add(launch(args, old.log))
        if index == 0:
            self.master = self.masters[0]
