"""The replica's promise, with two real in-process volume servers run "by a master" (one that
cannot be reached: no grant ever comes, so the primary lives on its replica lease alone).

A primary and its replica exchange lease probes; the replica is then promoted (new epoch, as
a master would after a failover). On one monotonic clock:

- the replica answers nothing at the old epoch once promoted, so the old primary's lease
  lapses within a TTL;
- the promoted copy acknowledges nothing before TTL + margin after its last answer, which is
  after the old primary's lease has certainly ended — never both at once.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from blockyard.engine.epoch import Role
from blockyard.errors import LeaseExpiredError, ReplicationUnavailableError
from blockyard.replication.lease import LEASE_MARGIN_NS, PrimaryLease
from blockyard.server.daemon import VolumeServerDaemon
from blockyard.testing.inproc import UNREACHABLE_MASTER, device_of, start_volume_server

MIB = 1 << 20
WAIT_S = 20.0


async def start(data_dir: Path) -> VolumeServerDaemon:
    return await start_volume_server(data_dir, masters=(UNREACHABLE_MASTER,))


device = device_of


def lease_of(d: VolumeServerDaemon, name: str) -> PrimaryLease:
    lease = device(d, name).lease
    assert lease is not None
    return lease


async def until(predicate: object, what: str) -> None:
    assert callable(predicate)
    async with asyncio.timeout(WAIT_S):
        while not predicate():
            await asyncio.sleep(0.01)


def test_promoted_replica_waits_out_the_old_primarys_lease(tmp_path: Path) -> None:
    async def main() -> None:
        p = await start(tmp_path / "p")
        r = await start(tmp_path / "r")
        try:
            assert p.manager is not None and r.manager is not None
            created = await p.manager.create_volume("v", 4 * MIB)
            await r.manager.create_volume("v", 4 * MIB, volume_uuid=created.uuid)
            await r.manager.set_replication("v", role=Role.REPLICA, epoch=3)
            replica_address = r.manager.replication.address
            await p.manager.set_replication(
                "v", role=Role.PRIMARY, epoch=3, replicas=[replica_address]
            )
            old = lease_of(p, "v")
            assert old.required
            # No grant can come: only the replica's answers to probes give the lease.
            await until(old.allows, "the replica lease")
            dev = device(p, "v")
            # The replica is empty (it needs a rebuild) and no master takes the mark that it
            # is out of sync: it may still be promoted, so a write it did not receive is
            # refused rather than acknowledged (sync_all) — and it is promoted below.
            with pytest.raises(ReplicationUnavailableError, match="not received by enough"):
                await asyncio.to_thread(dev.write, 0, b"\x01" * 4096)

            listener = r.manager.replication.listener
            assert listener is not None
            await r.manager.set_replication("v", role=Role.PRIMARY, epoch=4)
            promoted_at = time.monotonic_ns()
            new = lease_of(r, "v")
            last_answer_ns = listener.answers.hold_until("v") - new.ttl_ns - LEASE_MARGIN_NS
            assert new.not_before_ns == last_answer_ns + new.ttl_ns + LEASE_MARGIN_NS
            # The old primary's lease can run at most to the send time of a probe answered
            # before the promotion, plus TTL: the promoted copy starts after that, with margin.
            assert old.deadline_ns <= last_answer_ns + old.ttl_ns
            assert new.not_before_ns - old.deadline_ns >= LEASE_MARGIN_NS
            new_dev = device(r, "v")
            assert not new.allows()
            try:
                await asyncio.to_thread(new_dev.write, 0, b"\x02" * 4096)
            except LeaseExpiredError:
                pass
            else:
                raise AssertionError("the promoted copy acknowledged inside the old lease")
            # The replica answers nothing more at epoch 3: the old primary's lease lapses.
            await until(lambda: not old.allows(), "the old primary's lease to lapse")
            lapsed_at = time.monotonic_ns()
            assert lapsed_at - promoted_at <= old.ttl_ns + LEASE_MARGIN_NS
            assert lapsed_at < new.not_before_ns
            # And then the promoted copy (no replicas: no lease needed) takes writes.
            await until(new.allows, "the hold to end")
            await asyncio.to_thread(new_dev.write, 0, b"\x03" * 4096)
        finally:
            await p.close()
            await r.close()

    asyncio.run(main())
