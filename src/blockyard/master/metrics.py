"""The master's Prometheus metrics (``blockyard master --metrics-listen``).

Gauges are set on the event loop by :meth:`MasterMetrics.sample` (once a second), never read
from the core on the scrape thread, so a scrape never walks dictionaries the loop is changing.
"""

from __future__ import annotations

from collections import Counter as Tally
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge

from blockyard.master.core import MasterCore
from blockyard.master.model import ServerState, VolumeStatus

#: How often the gauges are refreshed.
SAMPLE_INTERVAL_S: Final = 1.0


class MasterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.is_leader = Gauge(
            "blockyard_master_is_leader", "1 while this master leads", registry=self.registry
        )
        self.promotions_allowed = Gauge(
            "blockyard_master_promotions_allowed",
            "1 once this master has led for lease TTL + margin",
            registry=self.registry,
        )
        self.servers = Gauge(
            "blockyard_master_servers", "Volume servers by state", ["state"], registry=self.registry
        )
        self.volumes = Gauge(
            "blockyard_master_volumes", "Volumes by status", ["status"], registry=self.registry
        )
        self.pending_assignments = Gauge(
            "blockyard_master_pending_assignments",
            "Assignments sent and not yet confirmed by their server",
            registry=self.registry,
        )
        self.failovers = Counter(
            "blockyard_master_failovers",
            "Promotions written to the store (failover and drain hand-over)",
            registry=self.registry,
        )

    def sample(self, core: MasterCore, leading: bool, now_ns: int) -> None:
        self.is_leader.set(1 if leading else 0)
        self.promotions_allowed.set(1 if leading and core.promotions_allowed(now_ns) else 0)
        states = Tally(core.server_state(s, now_ns).value for s in core.registry.servers)
        for st in ServerState:
            self.servers.labels(st.value).set(states.get(st.value, 0))
        statuses = Tally(v.status.value for v in core.registry.volumes.values())
        for vs in VolumeStatus:
            self.volumes.labels(vs.value).set(statuses.get(vs.value, 0))
        self.pending_assignments.set(len(core.assignments))
