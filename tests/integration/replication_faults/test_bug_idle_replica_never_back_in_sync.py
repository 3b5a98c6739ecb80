"""A replica that already holds every record durably never came back in sync on an idle volume.

After the replication link drops (here the fault proxy resets it; a partition or a replica
restart does the same), the primary marks the replica out of sync and reconnects with a WAL
catch-up plan that starts after its own last LSN: there is nothing to send. The primary's
session counts the replica in sync only on an ``Ack`` covering that LSN
(primary_session.PrimarySession._check_in_sync), but the replica acknowledges only a barrier
(sent only to in-sync replicas), resync progress, or records applied and not yet durable
(receiver._Receiver._keepalive); otherwise it sends keepalives, whose durable LSN the primary's
link ignores (link.ReplicaLink._read handles only Ack and Progress). So on an idle volume the
replica stayed ``out_of_sync``/``catching_up`` until the next write, holding every byte but not
counting for durability (and, once a master exists, not promotable)."""

from __future__ import annotations

import time

from fault_helpers import Model, Rig

#: Keepalives flow every second; far more than enough for an acknowledgement to come back.
BACK_IN_SYNC_S = 30.0


def test_replica_holding_everything_comes_back_in_sync_without_new_writes(rig: Rig) -> None:
    model = Model(rig.attach())
    model.write_range(range(0, 16))
    assert model.flush().error is None
    last_lsn = rig.info().last_lsn
    assert rig.replica_info().durable_lsn == last_lsn
    assert rig.proxy.cut() == 1
    rig.wait_report(lambda r: r.state == "out_of_sync", "marked out of sync", 30.0)
    started = time.monotonic()
    rep = rig.wait_report(
        lambda r: r.state == "in_sync" and r.in_sync, "back in sync", BACK_IN_SYNC_S
    )
    print(f"back in sync {time.monotonic() - started:.2f} s after the mark: {rep}")
    assert rep.plan == "catch_up", rep
    assert rig.file_in_sync()
    assert rig.info().last_lsn == last_lsn, "nothing was written meanwhile"
    rig.assert_same_bytes()
