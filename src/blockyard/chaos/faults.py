"""The fault drivers: what each kind of fault does to the cluster and what undoes it. Each is
bounded: :meth:`Fault.inject` and :meth:`Fault.end` return once the change is made (a restart
once the process printed READY); the runner holds the fault in between."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
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
    """A fault on one server: what starts it and what ends it."""

    server: str
    target: str
    on: Callable[[], None]
    off: Callable[[], None]

    def inject(self) -> None:
        self.on()

    def end(self) -> None:
        self.off()


@dataclass
class _Master:
    """kill -9 the master (the leader of a master group); at the end, restart it."""

    cluster: ChaosCluster
    index: int

    @property
    def target(self) -> str:
        return "the master leader" if self.cluster.group else "the master"

    @property
    def server(self) -> str:
        return f"m{self.index}" if self.cluster.group else "master"

    def inject(self) -> None:
        self.cluster.kill_master(self.index)

    def end(self) -> None:
        self.cluster.restart_master(self.index)


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


def _on_off(
    cluster: ChaosCluster, spec: FaultSpec, server: str, clock_offset_s: int
) -> tuple[Callable[[], None], Callable[[], None]]:
    """What starts and what ends a fault of ``spec.kind`` on ``server``."""
    c, delay_s = cluster, spec.delay_s
    table: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {
        "kill": (partial(c.kill_server, server), partial(c.restart_server, server)),
        "pause": (partial(c.pause, server), partial(c.resume, server)),
        "partition": (partial(c.partition, server), partial(c.heal, server)),
        "delay": (partial(c.delay, server, delay_s), partial(c.undelay, server)),
        "master-partition": (
            partial(c.cut_from_master, server),
            partial(c.reconnect_to_master, server),
        ),
        "disk-full": (partial(c.fill_disk, server), partial(c.free_disk, server)),
        "clock": (
            partial(c.kill_server, server),
            partial(c.restart_skewed, server, clock_offset_s),
        ),
    }
    return table[spec.kind]


def make_fault(cluster: ChaosCluster, spec: FaultSpec, name: str) -> Fault:
    """The fault ``spec`` asks for on volume ``name``, aimed as the master sees it now."""
    if spec.kind == "master":
        return _Master(cluster, cluster.leader())
    info: mpb.VolumeInfo = cluster.get_volume(name)
    primary = info.primary_server_id
    replicas = sorted(c.server_id for c in info.copies if c.server_id != primary)
    replica = replicas[spec.pick % len(replicas)] if replicas else None
    if spec.kind == "kill-lagging":
        if replica is None:
            raise ValueError(f"{name} has no replica to lag")
        target = f"primary of {name} (replica {replica[:8]} lagging {spec.delay_s * 1000:.0f} ms)"
        return _KillLagging(cluster, primary, replica, spec.delay_s, target)
    if spec.role == "replica" and replica is not None:
        server, target = replica, f"replica of {name}"
    else:
        server, target = primary, f"primary of {name}"
    offset_s = spec.clock_offset_s(time.monotonic())
    if spec.kind == "clock":
        target += f" (clock {offset_s / 3600:+.0f} h)"
    return _OnServer(server, target, *_on_off(cluster, spec, server, offset_s))
