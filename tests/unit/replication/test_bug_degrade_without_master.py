"""A primary run by a master (it has a lease) marked a replica out of sync only in its own
replication.json and then acknowledged flushes without it. Had it died before its next
heartbeat, the master, which still held the replica in sync, could promote that replica and
lose the acknowledged write. Now the master must record the mark first (MarkOutOfSync); while
it cannot, a sync_all flush fails, best_effort keeps acknowledging on its WAL but the replica
keeps counting for the replica lease. Replicas the master confirmed stop counting for it. A
primary starting with a replica out of sync in its own file (a promoted copy) also waits for
the master before acknowledging without it.

Real engine volumes and a real replication link (dialing a closed port: the replica is gone);
the master is an in-process double."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from blockyard.engine.epoch import Role
from blockyard.engine.store import VolumeStore
from blockyard.engine.volume import Volume
from blockyard.errors import ReplicationUnavailableError, ServerUnavailableError
from blockyard.replication.commit import DurabilityMode
from blockyard.replication.lease import NO_DEADLINE_NS, PrimaryLease
from blockyard.replication.primary import VolumeReplication
from blockyard.replication.state import (
    PrimaryState,
    ReplicaEntry,
    load_primary_state,
    save_primary_state,
)

MIB = 1 << 20
EPOCH = 3
#: Bound on every wait of these tests (the tracker decides in well under a second here).
WAIT_S = 20.0


def closed_address() -> str:
    """A local address nothing listens on (the replica's server is gone)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


class FakeMaster:
    """The master's MarkOutOfSync: records each call; ``gate`` holds the answer back,
    ``fail`` makes it unreachable."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, str, int]] = []
        self.called_ns: list[int] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail = False
        self.recorded: set[str] = set()

    async def mark_out_of_sync(
        self, volume: str, epoch: int, replica: str, decided_ns: int
    ) -> None:
        self.calls.append((volume, epoch, replica, decided_ns))
        self.called_ns.append(time.monotonic_ns())
        if self.fail:
            raise ServerUnavailableError("no master answered (test double)")
        async with asyncio.timeout(WAIT_S):
            await self.gate.wait()
        self.recorded.add(replica)


async def wait_until(what: str, check: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT_S):
        while not check():
            await asyncio.sleep(0.01)


def run(
    tmp_path: Path,
    mode: DurabilityMode,
    body: Callable[[Volume, VolumeReplication, str], Awaitable[None]],
    *,
    marker: FakeMaster | None,
    with_lease: bool = True,
    replica_in_sync: bool = True,
) -> None:
    vol = VolumeStore(str(tmp_path)).create("v", 4 * MIB)
    vol.set_role(Role.PRIMARY, EPOCH)
    replica = closed_address()
    executor = ThreadPoolExecutor(4)

    async def main() -> None:
        lease = PrimaryLease("v", epoch=EPOCH) if with_lease else None
        state = PrimaryState(mode, (ReplicaEntry(replica, replica_in_sync),))
        save_primary_state(vol.directory, state)
        vr = VolumeReplication(vol, state, executor=executor, primary_id="p", lease=lease)
        vr.marker = marker  # as ReplicationController.set_marker does once a master is known
        await vr.start()
        try:
            await body(vol, vr, replica)
        finally:
            await vr.stop()

    try:
        asyncio.run(main())
    finally:
        executor.shutdown(wait=True)
        vol.close()


async def flush(vol: Volume, vr: VolumeReplication) -> None:
    """A write and a flush as the SCSI executor does them (off the loop)."""
    loop = asyncio.get_running_loop()
    lsn = await loop.run_in_executor(None, vol.write, 0, b"\xab" * 4096)
    await loop.run_in_executor(None, vol.flush)
    await loop.run_in_executor(None, vr.commit_blocking, lsn)


def persisted_in_sync(vol: Volume, replica: str) -> bool:
    state = load_primary_state(vol.directory)
    assert state is not None
    entry = state.replica(replica)
    assert entry is not None
    return entry.in_sync


def test_sync_all_flush_fails_while_no_master_was_reached(tmp_path: Path) -> None:
    async def body(vol: Volume, vr: VolumeReplication, replica: str) -> None:
        with pytest.raises(ReplicationUnavailableError, match="could not be marked"):
            await flush(vol, vr)
        # Not dropped anywhere: the local file still holds it in sync, the report does not
        # claim it in sync, and it still counts for the lease.
        assert persisted_in_sync(vol, replica)
        assert [r.in_sync for r in vr.report()] == [False]
        assert vr.lease is not None and vr.lease.counted == {replica}

    run(tmp_path, DurabilityMode.SYNC_ALL, body, marker=None)


def test_the_master_records_the_mark_before_the_flush_is_acknowledged(tmp_path: Path) -> None:
    master = FakeMaster()
    master.gate.clear()

    async def body(vol: Volume, vr: VolumeReplication, replica: str) -> None:
        task = asyncio.create_task(flush(vol, vr))
        await wait_until("the primary asks the master", lambda: bool(master.calls))
        await asyncio.sleep(0.5)  # two tracker ticks: nothing may move without the answer
        assert not task.done()
        assert persisted_in_sync(vol, replica)
        assert vr.lease is not None and vr.lease.counted == {replica}
        assert [r.in_sync for r in vr.report()] == [False]
        master.gate.set()
        async with asyncio.timeout(WAIT_S):
            await task
        assert master.recorded == {replica}
        [(volume, epoch, address, decided_ns)] = master.calls
        assert (volume, epoch, address) == ("v", EPOCH, replica)
        # The decision time is this server's CLOCK_MONOTONIC (the heartbeats' clock), taken
        # before the call.
        assert 0 < decided_ns <= master.called_ns[0]
        assert not persisted_in_sync(vol, replica)
        # The master will not promote it: the replica lease no longer needs its answers, and
        # with no other replica this primary needs no lease at all (a master outage no
        # longer fences a degraded volume).
        assert vr.lease.counted == frozenset()
        assert vr.lease.deadline_ns == NO_DEADLINE_NS
        await flush(vol, vr)  # later flushes do not wait for it
        assert len(master.calls) == 1

    run(tmp_path, DurabilityMode.SYNC_ALL, body, marker=master)


def test_sync_all_flush_fails_while_the_master_is_unreachable(tmp_path: Path) -> None:
    master = FakeMaster()
    master.fail = True

    async def body(vol: Volume, vr: VolumeReplication, replica: str) -> None:
        with pytest.raises(ReplicationUnavailableError):
            await flush(vol, vr)
        assert master.calls and not master.recorded
        assert persisted_in_sync(vol, replica)
        assert vr.lease is not None and vr.lease.counted == {replica}
        # The master comes back: the retry records the mark, and flushes go on without the
        # replica.
        master.fail = False
        await wait_until("the mark retried", lambda: master.recorded == {replica})
        await wait_until("the local mark", lambda: not persisted_in_sync(vol, replica))
        await flush(vol, vr)
        assert vr.lease.counted == frozenset()

    run(tmp_path, DurabilityMode.SYNC_ALL, body, marker=master)


def test_best_effort_acknowledges_but_keeps_counting_the_replica_for_the_lease(
    tmp_path: Path,
) -> None:
    master = FakeMaster()
    master.fail = True

    async def body(vol: Volume, vr: VolumeReplication, replica: str) -> None:
        await wait_until("the primary asks the master", lambda: bool(master.calls))
        await flush(vol, vr)  # best_effort: the local WAL is the promise
        assert persisted_in_sync(vol, replica)
        assert vr.lease is not None and vr.lease.counted == {replica}
        # No grant, no answer from the replica: this primary is fenced (it may be failed
        # over to the replica the master still holds in sync).
        assert not vr.lease.allows()

    run(tmp_path, DurabilityMode.BEST_EFFORT, body, marker=master)


def test_without_a_master_the_local_mark_is_enough(tmp_path: Path) -> None:
    """Standalone servers (no lease) keep the replication issue's rule."""

    async def body(vol: Volume, vr: VolumeReplication, replica: str) -> None:
        await flush(vol, vr)
        assert not persisted_in_sync(vol, replica)

    run(tmp_path, DurabilityMode.SYNC_ALL, body, marker=None, with_lease=False)


def test_a_replica_out_of_sync_before_the_primary_started_counts_until_the_master_confirms(
    tmp_path: Path,
) -> None:
    """A copy just promoted (or restarted) holds a replica out of sync in its own file that
    the master's store may still hold in sync (RF 3: the third copy). Acknowledging without
    it before the master knows would leave the write off a copy the master may promote."""
    master = FakeMaster()
    master.gate.clear()

    async def body(vol: Volume, vr: VolumeReplication, replica: str) -> None:
        task = asyncio.create_task(flush(vol, vr))
        await wait_until("the primary asks the master", lambda: bool(master.calls))
        await asyncio.sleep(0.5)  # two tracker ticks
        assert not task.done()
        assert vr.lease is not None and vr.lease.counted == {replica}
        master.gate.set()
        async with asyncio.timeout(WAIT_S):
            await task
        assert master.recorded == {replica}
        assert vr.lease.counted == frozenset()

    run(tmp_path, DurabilityMode.SYNC_ALL, body, marker=master, replica_in_sync=False)
