"""A rate-limited resync holds back the live records of the same connection, so moderate writes
during a rebuild make the primary drop the replica's feed and restart the session.

What broke: the link's pump (replication/link.py, ``ReplicaLink._pump``) sleeps in
``_Pacer.sent`` after every resync chunk to keep resync traffic under ``resync_limit_bps``, and
sends nothing meanwhile — neither live records nor barriers; new records only wake it after the
sleep. At 1 MiB/s a 1 MiB chunk is followed by a one-second pause. Live writes of a couple of
MiB/s during that pause pile up in the WAL past the retention bound (half the WAL), the flusher
marks them in the replica's bitmap and releases them, the feed is lost ("the records replica ...
needs were released from the WAL") and the connection ends; the replica reconnects after the
link's backoff and resumes with a delta. Data stays correct, but the bandwidth limit meant for
backfill throttles the live stream, and a rebuild under steady writes is cut into sessions.

Expected: live records flow while the backfill is paced — the rebuild runs in one session and
the replica's acknowledged LSN keeps up with the primary's writes.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from repl_helpers import (
    BLOCK_BYTES,
    VolumeModel,
    Workload,
    fill,
    open_device,
    replica_report,
    settle,
    show,
    wait_report,
)

from blockyard.testing.cluster import LocalCluster

pytestmark = pytest.mark.slow

VOLUME_BYTES = 32 << 20  # WAL 2 MiB, so the retention bound is 1 MiB
DATA_BLOCKS = 2048  # 8 MiB: at 1 MiB/s the rebuild lasts about 8 s
LIMIT_BPS = 1 << 20
#: Live writes: 64 KiB every 32 ms (2 MiB/s) for 2 s, well within what the replica applies.
LIVE_WRITE_BLOCKS = 16
LIVE_INTERVAL_S = 0.032
LIVE_DURATION_S = 2.0
#: After the writes stop, the replica acknowledges them within this (it fsyncs each second).
CATCH_UP_MAX_S = 3.0


def test_live_records_flow_during_a_rate_limited_rebuild(
    make_cluster: Callable[[int], LocalCluster],
) -> None:
    cluster = make_cluster(2)
    name = "paced"
    cluster.servers[0].call(lambda c: c.create_volume(name, VOLUME_BYTES))
    model = VolumeModel(VOLUME_BYTES // BLOCK_BYTES)
    with open_device(cluster.servers[0], name) as device:
        fill(device, model, [(0, DATA_BLOCKS)])
        cluster.replicate(name, VOLUME_BYTES, resync_limit_bps=LIMIT_BPS)
        wait_report(cluster, name, lambda r: r.connected and r.plan == "full", "rebuild started")
        writer = Workload(device, model, "paced", threads=1)
        block = DATA_BLOCKS + 256
        ends = time.monotonic() + LIVE_DURATION_S
        while time.monotonic() < ends:
            writer.write(block, LIVE_WRITE_BLOCKS, fua=False)
            block += LIVE_WRITE_BLOCKS
            time.sleep(LIVE_INTERVAL_S)
        last_lsn = cluster.servers[0].call(lambda c: c.get_replication(name)).last_lsn
        caught_up = time.monotonic() + CATCH_UP_MAX_S
        report = replica_report(cluster, name, 0, 1)
        while report.acked_lsn < last_lsn and time.monotonic() < caught_up:
            time.sleep(0.05)
            report = replica_report(cluster, name, 0, 1)
        # One session from start to end: never lost its feed, never reconnected.
        assert report.plan == "full" and report.connected and not report.last_error, show(report)
        assert report.phase == "resyncing", f"the rebuild ended too early: {show(report)}"
        assert report.acked_lsn >= last_lsn, (
            f"the replica acknowledged LSN {report.acked_lsn} of {last_lsn} "
            f"{CATCH_UP_MAX_S} s after the writes: {show(report)}"
        )
        settle(cluster, device, model, name)
