"""Stopping a primary volume's replication marks its in-sync replicas out of sync, as if their
connections had dropped: deleting a replicated primary volume leaves a task behind that keeps
writing its replication state, into the deleted volume's directory — and into a new volume of
the same name; and a graceful stop (SIGTERM) of the primary's server durably marks every
in-sync replica out of sync.

What broke: DeleteVolume stops the volume's replication (``VolumeReplication.stop``), which
stops each link; a stopping link reports itself down (``ReplicaLink._run``'s ``finally`` calls
``link_down``), the commit tracker answers with "mark the replica out of sync", and
``VolumeReplication._mark_out_of_sync`` starts ``_persist_mark`` as a free task that ``stop``
neither waits for nor cancels. It saves ``replication.json`` into ``volume.directory``, which
the delete has just removed: StorageIOError, a traceback in the log, a retry every second,
forever. Once a volume of the same name is created again, the retry succeeds and writes the
deleted volume's replica set into the new volume's directory.

The same path runs when the server stops gracefully: ``ReplicationController.close`` stops
every volume's replication, each link reports itself down, and ``replication.json`` says
``in_sync: false`` for replicas that were in sync (a kill -9 leaves them in sync). After the
restart sync_all flushes are acknowledged by the primary alone until the replica caught up
again, GetReplication reports a fault that never happened, and a master reading that state
would refuse to promote a replica that holds everything (a planned restart, e.g. an upgrade,
must not make the replica unpromotable).

Expected: once DeleteVolume returns, nothing of the old volume writes anywhere; a new volume of
the same name has no replication state until it is given one. A graceful stop leaves the
in-sync flags as they were.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest

from blockyard.replication.primary import MARK_RETRY_S
from blockyard.replication.state import PRIMARY_STATE_FILE
from blockyard.testing.cluster import LocalCluster

pytestmark = pytest.mark.slow

VOLUME_BYTES = 8 << 20
#: Long enough for several retries of the stray task.
WATCH_S = 4 * MARK_RETRY_S


def test_delete_then_recreate_leaves_no_replication_state(
    make_cluster: Callable[[int], LocalCluster],
) -> None:
    cluster = make_cluster(2)
    primary, replica = cluster.servers
    cluster.replicate("ghost", VOLUME_BYTES)
    cluster.wait_in_sync("ghost")
    log_before = primary.log_path.read_text()
    primary.call(lambda c: c.delete_volume("ghost"))
    replica.call(lambda c: c.delete_volume("ghost"))
    primary.call(lambda c: c.create_volume("ghost", VOLUME_BYTES))
    time.sleep(WATCH_S)
    state = primary.data_dir / "ghost" / PRIMARY_STATE_FILE
    after = primary.log_path.read_text()[len(log_before) :]
    assert not state.exists(), (
        f"the new volume got the deleted one's replication state: {state.read_text()}"
    )
    assert "cannot persist" not in after, f"a stray task of the deleted volume:\n{after}"
    info = primary.call(lambda c: c.get_replication("ghost"))
    assert info.replicas == (), info


def test_graceful_stop_keeps_in_sync_replicas_in_sync(
    make_cluster: Callable[[int], LocalCluster],
) -> None:
    cluster = make_cluster(2)
    primary = cluster.servers[0]
    cluster.replicate("calm", VOLUME_BYTES)
    cluster.wait_in_sync("calm")
    state = primary.data_dir / "calm" / PRIMARY_STATE_FILE
    assert json.loads(state.read_text())["replicas"][0]["in_sync"] is True
    assert primary.stop() == 0
    doc = json.loads(state.read_text())
    assert doc["replicas"][0]["in_sync"] is True, (
        f"a graceful stop marked the replica out of sync: {doc}"
    )
