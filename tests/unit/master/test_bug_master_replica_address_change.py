"""A replica's server restarted on another replication port (``--replication-listen HOST:0``):
the master recorded the new address but never told the primary, which kept dialling the old
one, so the returned copy never caught up (found by the real-process failover test). A
changed replication address must re-send the primary its replica set."""

from __future__ import annotations

from dataclasses import replace

from master_harness import Harness, addresses, primary_report, volume_record

from blockyard.engine.epoch import Role
from blockyard.master.model import Heartbeat


def test_primary_is_told_the_new_replica_address() -> None:
    h = Harness.make(("s1", "s2"), (volume_record(),))
    h.heartbeat("s1", (primary_report(h.volume()),))
    h.heartbeat("s2")
    moved = replace(addresses("s2"), replication="10.0.0.2:7777")
    stream = h.core.open_stream()
    _, intents = h.core.on_heartbeat(stream, Heartbeat("s2", True, moved), h.now)
    for i in intents:
        h.finish(i)
    assert h.core.registry.servers["s2"].addresses.replication == "10.0.0.2:7777"
    reply, _ = h.heartbeat("s1", (primary_report(h.volume()),))
    assert [(a.role, a.replicas) for a in reply.assignments] == [(Role.PRIMARY, ("10.0.0.2:7777",))]
