"""The fault drivers: what each kind of fault does to the cluster and what undoes it. Each is
bounded: :meth:`Fault.inject` and :meth:`Fault.end` return once the change is made (a restart
once the process printed READY); the runner holds the fault in between."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Final, Protocol

from blockyard.chaos.cluster import ChaosCluster
from blockyard.chaos.schedule import FaultSpec
from blockyard.master.proto import master_pb2 as mpb

#: kill-lagging: how long the replica's link is delayed before the primary is killed, so
#: that writes acknowledged meanwhile are still on their way to it.
LAG_BEFORE_KILL_S: Final = 1.0


class Fault(Protocol):
    @property
    def target(self) -> str:
        """What was hit, e.g. "primary of chaos0"."""

    @property
    def server(self) -> str:
        """The server id hit ("master" for the master)."""

    def inject(self) -> None: ...
    def end(self) -> None: ...


@dataclass
class _OnServer:
    """A fault on one server: ``inject`` and ``end`` name :class:`ChaosCluster` methods."""

    cluster: ChaosCluster
    server: str
    target: str
    on: str
    off: str
    delay_s: float = 0.0

    def inject(self) -> None:
        if self.on == "delay":
            self.cluster.delay(self.server, self.delay_s)
        else:
            getattr(self.cluster, self.on)(self.server)

    def end(self) -> None:
        getattr(self.cluster, self.off)(self.server)


@dataclass
class _Master:
    cluster: ChaosCluster
    target: str = "the master"
    server: str = "master"

    def inject(self) -> None:
        self.cluster.kill_master()

    def end(self) -> None:
        self.cluster.restart_master()


@dataclass
class _KillLagging:
    """Delay the links to ``replica``, let writes go on, kill -9 ``primary``; at the end
    restart it and lift the delay."""

    cluster: ChaosCluster
    primary: str
    replica: str
    delay_s: float
    target: str

    @property
    def server(self) -> str:
        return self.primary

    def inject(self) -> None:
        self.cluster.delay(self.replica, self.delay_s)
        time.sleep(LAG_BEFORE_KILL_S)
        self.cluster.kill_server(self.primary)

    def end(self) -> None:
        self.cluster.restart_server(self.primary)
        self.cluster.undelay(self.replica)


_ON_OFF: Final = {
    "kill": ("kill_server", "restart_server"),
    "pause": ("pause", "resume"),
    "partition": ("partition", "heal"),
    "delay": ("delay", "undelay"),
    "master-partition": ("cut_from_master", "reconnect_to_master"),
}


def make_fault(cluster: ChaosCluster, spec: FaultSpec, name: str) -> Fault:
    """The fault ``spec`` asks for on volume ``name``, aimed as the master sees it now."""
    if spec.kind == "master":
        return _Master(cluster)
    info: mpb.VolumeInfo = cluster.get_volume(name)
    primary = info.primary_server_id
    replicas = sorted(c.server_id for c in info.copies if c.server_id != primary)
    replica = replicas[spec.pick % len(replicas)] if replicas else None
    if spec.kind == "kill-lagging":
        if replica is None:
            raise ValueError(f"{name} has no replica to lag")
        target = f"primary of {name} (replica {replica[:8]} lagging {spec.delay_s * 1000:.0f} ms)"
        return _KillLagging(cluster, primary, replica, spec.delay_s, target)
    on, off = _ON_OFF[spec.kind]
    if spec.role == "replica" and replica is not None:
        return _OnServer(cluster, replica, f"replica of {name}", on, off, spec.delay_s)
    return _OnServer(cluster, primary, f"primary of {name}", on, off, spec.delay_s)
