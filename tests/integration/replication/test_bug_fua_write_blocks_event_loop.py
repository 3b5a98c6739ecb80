"""A FUA write on a sync_all volume stalls the whole volume server's event loop.

What broke: ``LogicalUnit._do_write`` (scsi/lu.py) holds the LU's ``_write_lock`` across
``ReplicatedDevice.write(fua=True)``, which waits in ``VolumeReplication.commit_blocking`` for
the event loop's replication verdict (a replica's barrier ack, or its out-of-sync mark). A plain
WRITE arriving meanwhile is executed inline on the event loop (iscsi_server._execute, the fast
path) and blocks on the same lock, so the loop can no longer deliver the verdict the FUA write
waits for: every session and the management API of the server hang until the commit wait's
backstop (COMMIT_WAIT_TIMEOUT_S, 25 s) fails the FUA write with a WRITE ERROR, and the replica
is marked out of sync although it was healthy (it heard no keepalive for 5 s). Two writer
threads, one of them using FUA now and then, hit it within a few operations.

The deterministic form here: the replica is frozen (SIGSTOP) so the FUA write's barrier takes
the barrier timeout to resolve; a plain write then arrives. Expected: the management API keeps
answering, the FUA write completes once the frozen replica is marked out of sync (within
BARRIER_TIMEOUT_S plus a margin), the plain write completes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
from repl_helpers import (
    BLOCK_BYTES,
    VolumeModel,
    Workload,
    freeze,
    open_device,
    replication,
    settle,
    thaw,
    timed,
)

from blockyard.replication.commit import BARRIER_TIMEOUT_S
from blockyard.testing.cluster import LocalCluster

pytestmark = pytest.mark.slow

VOLUME_BYTES = 32 << 20
#: A management call on an idle server answers in milliseconds; this is generous for a busy
#: two-core machine and far below the 25 s the stalled loop takes.
API_ANSWER_MAX_S = 3.0
#: The FUA write resolves once the frozen replica is marked out of sync.
FUA_DONE_MAX_S = BARRIER_TIMEOUT_S + 5.0


def test_plain_write_during_a_fua_commit_does_not_stall_the_server(
    make_cluster: Callable[[int], LocalCluster],
) -> None:
    cluster = make_cluster(2)
    cluster.replicate("fua", VOLUME_BYTES)
    cluster.wait_in_sync("fua")
    primary, replica = cluster.servers
    model = VolumeModel(VOLUME_BYTES // BLOCK_BYTES)
    with open_device(primary, "fua") as device:
        work = Workload(device, model, "fua", threads=1, fua_p=0.0)
        freeze(replica)
        try:
            outcome: dict[str, object] = {}

            def fua_write() -> None:
                started = time.monotonic()
                try:
                    work.write(0, 1, fua=True)
                    outcome["fua"] = time.monotonic() - started
                except Exception as exc:
                    outcome["fua"] = exc

            writer = threading.Thread(target=fua_write, daemon=True)
            writer.start()
            time.sleep(0.5)  # the FUA write now waits for the frozen replica's barrier
            plain = threading.Thread(target=lambda: work.write(8, 1, fua=False), daemon=True)
            plain.start()
            time.sleep(0.5)  # the plain write reached the server
            _info, api_s = timed(lambda: replication(primary, "fua"))
            writer.join(60)
            plain.join(60)
            assert not writer.is_alive() and not plain.is_alive()
        finally:
            thaw(replica)
        assert api_s < API_ANSWER_MAX_S, (
            f"GetReplication took {api_s:.1f} s while a FUA write waited for its replica: "
            "the event loop was blocked"
        )
        fua = outcome["fua"]
        assert isinstance(fua, float), f"the FUA write failed: {fua!r}"
        assert fua < FUA_DONE_MAX_S, f"the FUA write took {fua:.1f} s"
        # The replica comes back and catches up; then the same bytes on both.
        work.start()
        work.wait_ops(10)
        work.stop()
        settle(cluster, device, model, "fua")
