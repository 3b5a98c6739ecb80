"""A deposed primary serves no stale read (found by ``blockyard chaos``: seeds 101 and 202 in CI).

Real processes: a ``blockyard master`` (SQLite, 2 s lease) and two ``blockyard serve
--master``; a 2-copy sync_all volume. The primary is stopped with SIGSTOP (a long GC pause, a
VM freeze), the master fails the volume over, and a new value is written and flushed through
the promoted copy. A READ is then sent to the old primary over the session it had before the
pause (it sits in the socket buffer) and the old primary is resumed: it still believes it is
primary at the old epoch until the master's next heartbeat reply says otherwise, and its copy
holds the old value. Before the fix it answered the READ with that old value — a read going
back before an acknowledged write. Now a primary serves reads only under the same lease as
writes (its lease ran out while it was stopped), so the READ fails over or fails; it never
returns the old value.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import pytest

from blockyard.attach.initiator import IscsiBlockDevice, IscsiVolumeSpec, parse_portal
from blockyard.bench.failover import INITIATOR_NAME, Cluster, wait_for
from blockyard.server.proto import volume_server_pb2 as vpb

VOLUME = "stale"
BLOCK = 4096
#: The old primary's path may wait this long for a usable path before the READ fails.
OLD_PATH_REPLACEMENT_S = 8.0


def _device(cluster: Cluster, server_ids: list[str], *, replacement_s: float) -> IscsiBlockDevice:
    info = cluster.get_volume(VOLUME)
    portals = tuple(
        parse_portal(p)
        for c in info.copies
        if c.server_id in server_ids
        for p in c.addresses.iscsi_portals
    )
    assert portals, f"no portal of {server_ids} in {info}"
    return IscsiBlockDevice(
        IscsiVolumeSpec(
            portals=portals,
            target_name=info.iqn,
            initiator_name=INITIATOR_NAME,
            replacement_timeout_s=replacement_s,
        )
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_resumed_old_primary_serves_no_stale_read(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, server_count=2)
    try:
        cluster.create_volume(VOLUME, 16 << 20, replicas=2, mode=vpb.DURABILITY_MODE_SYNC_ALL)
        wait_for(
            "the volume active, both copies in sync",
            lambda: (
                (v := cluster.get_volume(VOLUME)).status == "active"
                and bool(v.iqn)
                and all(c.state == "in_sync" for c in v.copies if c.role == vpb.ROLE_REPLICA)
            ),
        )
        info = cluster.get_volume(VOLUME)
        old = info.primary_server_id
        (new,) = [c.server_id for c in info.copies if c.server_id != old]
        old_value, new_value = b"\x11" * BLOCK, b"\x22" * BLOCK

        old_dev = _device(cluster, [old], replacement_s=OLD_PATH_REPLACEMENT_S)
        try:
            blocks = BLOCK // old_dev.logical_block_size
            old_dev.write(0, old_value)
            old_dev.flush()
            assert old_dev.read(0, blocks) == old_value

            proc = cluster.servers[old].process
            proc.send_signal(signal.SIGSTOP)
            try:
                wait_for(
                    "the master to promote the other copy",
                    lambda: cluster.get_volume(VOLUME).primary_server_id == new,
                    60.0,
                )
                new_dev = _device(cluster, [new], replacement_s=60.0)
                try:
                    new_dev.write(0, new_value)
                    new_dev.flush()
                    assert new_dev.read(0, blocks) == new_value
                finally:
                    new_dev.close()

                got: list[bytes | BaseException] = []

                def read_old() -> None:
                    try:
                        got.append(old_dev.read(0, blocks))
                    except BaseException as exc:  # the outcome under test
                        got.append(exc)

                reader = threading.Thread(target=read_old)
                reader.start()
            finally:
                proc.send_signal(signal.SIGCONT)
            reader.join(timeout=OLD_PATH_REPLACEMENT_S + 60.0)
            assert not reader.is_alive(), "the READ to the old primary did not end"
            (outcome,) = got
            assert outcome != old_value, (
                "the old primary answered a READ with the value overwritten (and flushed) "
                "through the new primary: a stale read"
            )
            if isinstance(outcome, bytes):
                assert outcome == new_value
        finally:
            old_dev.close()
    finally:
        cluster.close()
