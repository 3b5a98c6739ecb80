"""A primary volume's replication: its replica set, the links that feed it, the commit tracker
that decides when a flush may be acknowledged, and the device the SCSI layer writes through.

**The degrade decision** (a server run by a master, i.e. with a lease): a replica that must
stop counting is first marked out of sync *by the master* (:class:`OutOfSyncMarker`, which
returns once the mark is in the master's store), then in ``replication.json``, and only then
does the commit tracker stop waiting for it. While the master cannot be reached (or refuses:
this copy is no longer its primary) the mark is *not* made: the replica stays "unmarkable" and
the mode's rule in :func:`~blockyard.replication.commit.degrade_or_fail` applies — ``sync_all``
and ``sync_quorum`` fail the flush (a copy the master may promote lacks it), ``best_effort``
acknowledges on the local WAL as always (it never promised the replicas anything) and, like
every primary, only while it holds a lease: the replica it could not drop at the master still
counts for the replica lease, so without the master it fences itself once that replica stops
answering. Replicas the master confirmed out of sync stop counting for the lease
(:meth:`~blockyard.replication.lease.PrimaryLease.set_out_of_sync`).

Threads: everything here runs on the volume server's event loop except
:meth:`VolumeReplication.commit_blocking`, which the SCSI executor threads call for a flush or a
FUA write and which waits (bounded) for the loop's verdict. Storage work (bitmap and state
persistence, reading resync blocks) goes to the replication worker pool.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final, Protocol, TypeVar

from blockyard.blockdev import BytesLike, LbaStatus
from blockyard.engine.epoch import Role
from blockyard.engine.volume import Volume
from blockyard.errors import BlockyardError, NotPrimaryError, ReplicationUnavailableError
from blockyard.replication.commit import (
    Action,
    CommitTracker,
    Complete,
    DurabilityMode,
    Fail,
    MarkInSync,
    MarkOutOfSync,
    SendBarrier,
)
from blockyard.replication.lease import PrimaryLease
from blockyard.replication.link import LinkStatus, ReplicaLink
from blockyard.replication.report import ReplicaReport
from blockyard.replication.state import PrimaryState, ReplicaEntry, save_primary_state

log = logging.getLogger("blockyard.replication")

T = TypeVar("T")

#: How often the tracker looks for replicas that missed their barrier.
TICK_INTERVAL_S: Final = 0.25
#: Longest a flush waits for the replication verdict (the tracker itself decides within the
#: barrier timeout plus the time to persist an out-of-sync mark; this is the backstop).
COMMIT_WAIT_TIMEOUT_S: Final = 25.0
#: How often an out-of-sync mark that could not be persisted is retried.
MARK_RETRY_S: Final = 1.0


class OutOfSyncMarker(Protocol):
    """The master's side of the degrade decision (``server/degrade.py``)."""

    async def mark_out_of_sync(
        self, volume: str, epoch: int, replica: str, decided_ns: int
    ) -> None:
        """Return once the master has durably recorded ``replica`` of ``volume`` out of sync
        at ``epoch``; ``decided_ns`` is this server's CLOCK_MONOTONIC when the primary decided
        (a heartbeat sent before it cannot undo the mark). Bounded; raises
        :class:`~blockyard.errors.BlockyardError` when the master did not record it."""
        ...


class ReplicationObserver(Protocol):
    """Where a primary's replication reports what happens (the volume server's metrics). Every
    method has a no-op default, inherited by subclasses. Implementations are thread-safe, quick
    and never raise: :meth:`barrier_waited` is called from the SCSI worker threads, the others
    on the event loop."""

    def replica_degraded(self, volume: str, replica: str) -> None:
        """``replica`` is being marked out of sync (the degrade step), once per marking."""
        return None

    def replica_in_sync(self, volume: str, replica: str) -> None:
        """``replica`` caught up and was durably marked in sync again."""
        return None

    def barrier_waited(self, volume: str, latency_s: float) -> None:
        """A flush or FUA write waited ``latency_s`` after its local fdatasync for the
        durability mode to hold on the replicas (only when it had to wait for any)."""
        return None

    def resync_sent(self, volume: str, replica: str, data_bytes: int) -> None:
        """A delta resync or rebuild sent ``data_bytes`` more bytes of block data (holes sent
        as such count nothing)."""
        return None


class NoObserver(ReplicationObserver):
    """The default :class:`ReplicationObserver`: ignores everything."""


class VolumeReplication:
    """Replication of one primary volume (see the module docstring)."""

    def __init__(
        self,
        volume: Volume,
        state: PrimaryState,
        *,
        executor: ThreadPoolExecutor,
        primary_id: str,
        observer: ReplicationObserver | None = None,
        lease: PrimaryLease | None = None,
        marker: OutOfSyncMarker | None = None,
    ) -> None:
        self.volume = volume
        self.state = state
        self.primary_id = primary_id
        #: The volume's lease (a server run by a master): its replica set follows ours, and
        #: the links feed it their replicas' answers to lease probes.
        self.lease = lease
        #: How the master is told (with a lease only; None until the server reaches a master:
        #: marks fail meanwhile, as with the master unreachable).
        self.marker = marker
        #: Replicas the master confirmed out of sync since this primary started, and per
        #: replica how often it was marked in sync again (an answer that raced an in-sync mark
        #: must not exclude it from the lease).
        self._master_marked: set[str] = set()
        self._in_sync_marks: dict[str, int] = {}
        self._executor = executor
        self.observer: ReplicationObserver = observer or NoObserver()
        self.loop: asyncio.AbstractEventLoop | None = None
        # Run by a master, a replica out of sync here may still be in sync in the master's
        # store (this copy was just promoted, or the master never heard of the mark): it
        # counts until the master confirmed it, like any replica being dropped (start()).
        by_master = lease is not None
        self._unconfirmed = [r.address for r in state.replicas if not r.in_sync and by_master]
        self.tracker = CommitTracker(
            state.mode,
            in_sync=[r.address for r in state.replicas if r.in_sync or by_master],
            out_of_sync=[r.address for r in state.replicas if not (r.in_sync or by_master)],
        )
        self.links: dict[str, ReplicaLink] = {}
        self._waiters: dict[int, concurrent.futures.Future[None] | asyncio.Future[None]] = {}
        self._tick: asyncio.Task[None] | None = None
        self._marking: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        # Every write of replication.json goes through this lock and starts from the state
        # the last one left: an in-sync mark whose fdatasync is slow can never land after
        # the out-of-sync mark that followed it, nor a mark undo a new replica set.
        self._save_lock = asyncio.Lock()
        self._stopped = False
        self.commit_lsn = 0
        self.degrade_events = 0
        self.barrier_latencies_s: list[float] = []

    # ---- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        if self.lease is not None:
            self.lease.set_replicas(r.address for r in self.state.replicas)
        for address in self._unconfirmed:
            self._run(
                self.tracker.behind(
                    address,
                    "it was out of sync here before this primary started",
                    time.monotonic(),
                )
            )
        for r in self.state.replicas:
            await self.run_sync(self.volume.track_replica, r.address)
            self._start_link(r.address)
        self._tick = asyncio.create_task(self._ticker(), name=f"commit-{self.volume.name}")

    def _start_link(self, address: str) -> None:
        link = ReplicaLink(self, address)
        self.links[address] = link
        link.start()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """A persistence task of this volume's replication; :meth:`stop` cancels what is
        left, so nothing writes the state of a volume that is gone or closing."""
        if self._stopped:
            coro.close()
            return
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        self._stopped = True
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        for link in list(self.links.values()):
            await link.stop()
        self.links.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5.0)
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(
                    ReplicationUnavailableError(
                        f"volume {self.volume.name!r}: replication stopped before the flush was "
                        "confirmed; retry it"
                    )
                )
        self._waiters.clear()

    async def _save(self, change: Callable[[PrimaryState], PrimaryState]) -> PrimaryState:
        """Persist ``change(current state)`` and make it current (see ``_save_lock``).
        Raises :class:`BlockyardError` when it cannot be written (nothing changes)."""
        async with self._save_lock:
            state = change(self.state)
            await self.run_sync(save_primary_state, self.volume.directory, state)
            self.state = state
            return state

    async def reconfigure(
        self, mode: DurabilityMode, addresses: Sequence[str], resync_limit_bps: int
    ) -> PrimaryState:
        """Persist and apply a new mode or replica set. A replica that stays keeps its
        in-sync flag as this volume last persisted it; a new one starts out of sync."""
        before = self.state

        def change(current: PrimaryState) -> PrimaryState:
            entries = []
            for a in addresses:
                kept = current.replica(a)
                entries.append(ReplicaEntry(a, kept is not None and kept.in_sync))
            return PrimaryState(mode, tuple(entries), resync_limit_bps)

        state = await self._save(change)
        now = time.monotonic()
        old = {r.address for r in before.replicas}
        new = {r.address for r in state.replicas}
        if self.lease is not None:
            self.lease.set_replicas(new)
            self._master_marked &= new
        for address in old - new:
            link = self.links.pop(address, None)
            if link is not None:
                await link.stop()
            self._run(self.tracker.remove_replica(address, now))
            await self.run_sync(self.volume.untrack_replica, address)
        for address in sorted(new - old):
            await self.run_sync(self.volume.track_replica, address)
            self.tracker.add_replica(address)
            self._start_link(address)
            self._spawn(self._confirm_out_of_sync(address))
        self._run(self.tracker.set_mode(state.mode, now))
        return state

    async def run_sync(self, fn: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    @property
    def resync_limit_bps(self) -> int:
        return self.state.resync_limit_bps

    # ---- the commit point -----------------------------------------------------------------

    @property
    def needs_commit(self) -> bool:
        """Whether a durability point must wait for replicas at all."""
        return self.state.mode is not DurabilityMode.BEST_EFFORT and bool(self.state.replicas)

    def commit_start(self, lsn: int) -> concurrent.futures.Future[None] | None:
        """From a SCSI worker thread: ask the replicas for durability up to ``lsn`` now (the
        barrier goes out while the caller runs its local fdatasync). None when nothing needs
        waiting for. Pass the result to :meth:`commit_wait` after the local sync."""
        loop = self.loop
        if loop is None or not self.needs_commit:
            return None
        fut: concurrent.futures.Future[None] = concurrent.futures.Future()
        loop.call_soon_threadsafe(self._request, lsn, fut)
        return fut

    def commit_blocking(self, lsn: int) -> None:
        """From a SCSI worker thread, after the local fdatasync covered ``lsn``: wait until the
        durability mode holds for it. Raises :class:`ReplicationUnavailableError` when it
        cannot (the flush must fail)."""
        self.commit_wait(lsn, self.commit_start(lsn))

    def commit_wait(self, lsn: int, fut: concurrent.futures.Future[None] | None) -> None:
        """Wait (bounded) for the verdict asked for by :meth:`commit_start`."""
        if fut is None:
            return
        started = time.monotonic()
        try:
            fut.result(COMMIT_WAIT_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            raise ReplicationUnavailableError(
                f"volume {self.volume.name!r}: replicas did not confirm LSN {lsn} within "
                f"{COMMIT_WAIT_TIMEOUT_S:g} s and could not be marked out of sync; the flush "
                "is not durable on the copies the durability mode requires"
            ) from None
        latency_s = time.monotonic() - started
        self.barrier_latencies_s.append(latency_s)
        self.observer.barrier_waited(self.volume.name, latency_s)
        del self.barrier_latencies_s[:-1024]

    def receipt_blocking(self, lsn: int) -> None:
        """From a SCSI worker thread, after a plain write got ``lsn``: wait until the replicas
        the durability mode counts received it (see :mod:`.commit`), so that no copy which may
        be promoted lacks a write the initiator was told is done. Raises
        :class:`ReplicationUnavailableError` when that cannot be had (the write must fail)."""
        loop = self.loop
        if loop is None or not self.needs_commit:
            return
        fut: concurrent.futures.Future[None] = concurrent.futures.Future()
        loop.call_soon_threadsafe(self._request, lsn, fut, False)
        try:
            fut.result(COMMIT_WAIT_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            raise ReplicationUnavailableError(
                f"volume {self.volume.name!r}: replicas did not confirm receipt of LSN {lsn} "
                f"within {COMMIT_WAIT_TIMEOUT_S:g} s and could not be marked out of sync; the "
                "write is here but not on the copies the durability mode requires"
            ) from None

    def on_loop(self) -> bool:
        """Whether the caller runs on this volume's event loop (where the tracker lives)."""
        try:
            return asyncio.get_running_loop() is self.loop
        except RuntimeError:
            return False

    def receipt_future(self, lsn: int) -> asyncio.Future[None] | None:
        """On the loop: :meth:`receipt_blocking` as a future (None: nothing to wait for). Its
        exception is a :class:`ReplicationUnavailableError`; the tracker's timeout bounds it."""
        loop = self.loop
        if loop is None or not self.needs_commit:
            return None
        fut: asyncio.Future[None] = loop.create_future()
        self._request(lsn, fut, False)
        return None if fut.done() and fut.exception() is None else fut

    def _request(
        self,
        lsn: int,
        fut: concurrent.futures.Future[None] | asyncio.Future[None],
        durable: bool = True,
    ) -> None:
        token, actions = self.tracker.request(lsn, time.monotonic(), durable=durable)
        self._waiters[token] = fut
        self._run(actions)

    def _run(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, SendBarrier):
                link = self.links.get(action.replica)
                if link is not None:
                    link.send_barrier(action.barrier_id, action.lsn)
            elif isinstance(action, MarkOutOfSync):
                self._mark_out_of_sync(action.replica, action.reason)
            elif isinstance(action, MarkInSync):
                self._spawn(self._persist_in_sync(action.replica))
            elif isinstance(action, Complete):
                fut = self._waiters.pop(action.token, None)
                if fut is not None and not fut.done():
                    fut.set_result(None)
            elif isinstance(action, Fail):
                fut = self._waiters.pop(action.token, None)
                log.error("volume %s: a flush or write fails: %s", self.volume.name, action.reason)
                if fut is not None and not fut.done():
                    fut.set_exception(
                        ReplicationUnavailableError(
                            f"volume {self.volume.name!r}: {action.reason}; the write is "
                            "here but not on enough copies — bring replicas back or change the "
                            "durability mode"
                        )
                    )

    def _mark_out_of_sync(self, address: str, reason: str) -> None:
        """The degrade step: the master's mark (with a lease), then the local one, then the
        tracker drops the replica (or fails its waiters while a mark cannot be made)."""
        if address in self._marking:
            return
        self._marking.add(address)
        log.warning(
            "volume %s: marking replica %s out of sync: %s", self.volume.name, address, reason
        )
        self.degrade_events += 1
        self.observer.replica_degraded(self.volume.name, address)
        self._spawn(self._persist_mark(address, time.monotonic_ns()))

    async def _persist_mark(self, address: str, decided_ns: int) -> None:
        try:
            while True:
                if self.state.replica(address) is None:
                    return  # left the replica set meanwhile: nothing to mark
                if self.lease is not None:
                    try:
                        await self._tell_master(address, decided_ns)
                    except BlockyardError as exc:
                        log.warning(
                            "volume %s: the master did not record that replica %s is out of "
                            "sync (%s); %s until it does",
                            self.volume.name,
                            address,
                            exc,
                            "flushes are acknowledged on this copy alone"
                            if self.tracker.mode is DurabilityMode.BEST_EFFORT
                            else "flushes fail",
                        )
                        self._run(self.tracker.marked(address, False, time.monotonic()))
                        await asyncio.sleep(MARK_RETRY_S)
                        continue
                try:
                    await self._save(lambda st: st.with_in_sync(address, False))
                except BlockyardError:
                    log.exception(
                        "volume %s: cannot persist that replica %s is out of sync; flushes "
                        "fail until it can",
                        self.volume.name,
                        address,
                    )
                    self._run(self.tracker.marked(address, False, time.monotonic()))
                    await asyncio.sleep(MARK_RETRY_S)
                    continue
                self._run(self.tracker.marked(address, True, time.monotonic()))
                link = self.links.get(address)
                if link is not None:
                    link.marked_out_of_sync()
                return
        finally:
            self._marking.discard(address)

    async def _tell_master(self, address: str, decided_ns: int) -> None:
        """Have the master record ``address`` out of sync; once it answered, the replica no
        longer counts for the lease. Raises :class:`BlockyardError` when it did not."""
        marker = self.marker
        if marker is None:
            raise ReplicationUnavailableError(
                f"volume {self.volume.name!r}: this server has not reached its master yet, so "
                f"replica {address} cannot be marked out of sync there; check --master"
            )
        generation = self._in_sync_marks.get(address, 0)
        await marker.mark_out_of_sync(self.volume.name, self.volume.epoch, address, decided_ns)
        if self._in_sync_marks.get(address, 0) != generation:
            return  # marked in sync meanwhile: the master's mark is undone by our report
        if self.state.replica(address) is not None:
            self._master_marked.add(address)
            self._update_lease_marks()

    async def _confirm_out_of_sync(self, address: str) -> None:
        """A new member of the replica set (the master holds it pending, never promoted):
        have the master confirm it out of sync too, so that it stops counting for the lease.
        Until then it counts. Retried while it stays out of sync."""
        if self.lease is None:
            return
        decided_ns = time.monotonic_ns()
        while self.state.replica(address) is not None and address not in self._master_marked:
            if self.tracker.state_of(address) != "out_of_sync" or address in self._marking:
                return  # joining, in sync, or a degrade step of its own is telling the master
            try:
                await self._tell_master(address, decided_ns)
            except BlockyardError as exc:
                log.info(
                    "volume %s: replica %s (out of sync) not yet confirmed by the master: %s",
                    self.volume.name,
                    address,
                    exc,
                )
                await asyncio.sleep(MARK_RETRY_S)

    def _update_lease_marks(self) -> None:
        if self.lease is not None:
            self.lease.set_out_of_sync(self._master_marked)

    def link_caught_up(self, link: ReplicaLink) -> None:
        """The replica holds a consistent copy and the live stream: it joins (see
        :mod:`.commit`); the tracker asks for the durable in-sync mark when it may."""
        log.info("volume %s: replica %s caught up, joining", self.volume.name, link.address)
        self._run(self.tracker.caught_up(link.address, time.monotonic()))

    async def _persist_in_sync(self, address: str) -> None:
        ok = False
        # From the moment the mark may reach a heartbeat the master may promote the replica
        # again: it counts for the lease first.
        self._in_sync_marks[address] = self._in_sync_marks.get(address, 0) + 1
        self._master_marked.discard(address)
        self._update_lease_marks()
        if self.state.replica(address) is not None:
            try:
                await self._save(
                    lambda st: st.with_in_sync(address, True) if st.replica(address) else st
                )
            except BlockyardError:
                log.exception("volume %s: cannot persist that replica %s is in sync",
                              self.volume.name, address)  # fmt: skip
            else:
                ok = True
                log.info("volume %s: replica %s is in sync", self.volume.name, address)
                self.observer.replica_in_sync(self.volume.name, address)
        self._run(self.tracker.marked_in_sync(address, ok, time.monotonic()))

    # ---- link events (on the loop) --------------------------------------------------------

    def link_up(self, link: ReplicaLink) -> None:
        self._run(self.tracker.connected(link.address, time.monotonic()))

    def link_behind(self, link: ReplicaLink, reason: str) -> None:
        """The replica needs a resync: it stops counting (marked out of sync) first."""
        self._run(self.tracker.behind(link.address, reason, time.monotonic()))

    def link_down(self, link: ReplicaLink) -> None:
        self._run(self.tracker.disconnected(link.address, time.monotonic()))

    def replica_acked(
        self, link: ReplicaLink, durable_lsn: int, barrier_id: int, applied_lsn: int = 0
    ) -> None:
        self._run(
            self.tracker.acked(link.address, durable_lsn, barrier_id, time.monotonic(), applied_lsn)
        )
        in_sync = self.tracker.in_sync()
        if in_sync:
            self.commit_lsn = min(self.tracker.durable_lsn(r) for r in in_sync)

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK_INTERVAL_S)
            self._run(self.tracker.tick(time.monotonic()))

    # ---- reporting ------------------------------------------------------------------------

    def report(self) -> list[ReplicaReport]:
        out = []
        last = self.volume.last_lsn
        for r in self.state.replicas:
            link = self.links.get(r.address)
            st = link.status if link is not None else LinkStatus(r.address)
            eta = 0.0
            if st.phase == "resyncing" and st.resync_done_blocks:
                elapsed = time.monotonic() - st.resync_started_s
                left = max(0, st.resync_total_blocks - st.resync_done_blocks)
                eta = elapsed * left / st.resync_done_blocks
            out.append(
                ReplicaReport(
                    address=r.address,
                    state=self.tracker.state_of(r.address),
                    # Not while it is being marked out of sync: a heartbeat sent after the
                    # decision must not tell the master it is in sync (and undo its mark).
                    in_sync=r.in_sync and self.tracker.state_of(r.address) == "in_sync",
                    connected=st.connected,
                    phase=st.phase,
                    plan=st.plan,
                    plan_reason=st.plan_reason,
                    acked_lsn=st.acked_lsn,
                    lag_lsns=max(0, last - st.acked_lsn),
                    resync_total_blocks=st.resync_total_blocks,
                    resync_done_blocks=st.resync_done_blocks,
                    resync_bytes=st.resync_bytes,
                    resync_eta_s=eta,
                    last_error=st.last_error,
                )
            )
        return out


class ReplicatedDevice:
    """The :class:`~blockyard.blockdev.BlockDevice` the SCSI layer writes through: the engine
    volume, plus the replication commit point at flushes and FUA writes. With no replication
    configured it adds one call per I/O and nothing else.

    With a ``lease`` (a server run by a master) every write, unmap and flush is refused with
    :class:`~blockyard.errors.LeaseExpiredError` while the lease does not allow it — checked
    before it starts and again before it is acknowledged (a flush may wait seconds for its
    replicas). Reads too, checked *after* the data was read: a primary paused or cut off past
    its lease may have been deposed, and the promoted copy may have acknowledged writes this
    copy never saw; its data is then stale, and a read served from it would go back in time.
    Checking after the read (not before) covers a pause between the check and the read: data
    read while the lease still held at the check that followed is data no other primary had
    yet overwritten (a promoted copy acknowledges nothing until this lease has run out).
    The check is a clock read and two compares, no lock."""

    def __init__(self, volume: Volume, lease: PrimaryLease | None = None) -> None:
        self.volume = volume
        self.lease = lease
        self.replication: VolumeReplication | None = None

    @property
    def logical_block_size(self) -> int:
        return self.volume.logical_block_size

    @property
    def physical_block_size(self) -> int:
        return self.volume.physical_block_size

    @property
    def block_count(self) -> int:
        return self.volume.block_count

    @property
    def max_transfer_blocks(self) -> int:
        return self.volume.max_transfer_blocks

    def read(self, lba: int, block_count: int) -> bytes:
        data = self.volume.read(lba, block_count)
        self._check_lease()
        return data

    def readinto(self, lba: int, buf: memoryview) -> None:
        self.volume.readinto(lba, buf)
        self._check_lease()

    def try_read(self, lba: int, block_count: int) -> BytesLike | None:
        """:meth:`read` if it needs no wait, else None (see ``Volume.try_read``)."""
        data = self.volume.try_read(lba, block_count)
        if data is not None:
            self._check_lease()
        return data

    def _check_lease(self) -> None:
        lease = self.lease
        if lease is not None:
            lease.check()

    def write(self, lba: int, data: BytesLike, *, fua: bool = False) -> int:
        self._check_lease()
        lsn = self.volume.write(lba, data, fua=fua)
        if fua:
            self._commit(lsn)
        else:
            self._receipt(lsn)
        self._check_lease()
        return lsn

    def try_write(self, lba: int, data: BytesLike) -> int | None:
        """A plain (non-FUA) :meth:`write` if it needs no wait, else None (see
        ``Volume.try_write``). It declines while replicas must confirm receipt of every write
        (``sync_all``, ``sync_quorum``): :meth:`write` waits for that. Without a lease it
        declines too, so that :meth:`write` raises the error."""
        lease = self.lease
        if lease is not None and not lease.allows():
            return None
        replication = self.replication
        if replication is not None and replication.needs_commit:
            return None
        return self.volume.try_write(lba, data)

    def try_write_pending(self, lba: int, data: BytesLike) -> int | asyncio.Future[None] | None:
        """On the event loop: :meth:`try_write`, except that where replicas must confirm
        receipt it still writes at once and returns a future for the acknowledgement instead
        of declining (None: declined, nothing written; an LSN: done). Pass the future, once
        done, to :meth:`finish_pending_write`."""
        lease = self.lease
        if lease is not None and not lease.allows():
            return None
        replication = self.replication
        if replication is not None and replication.needs_commit and not replication.on_loop():
            return None  # the future would belong to another loop: the general path waits
        lsn = self.volume.try_write(lba, data)
        if lsn is not None and replication is None:
            self._unreplicated()
        if lsn is None or replication is None or not lsn:
            return lsn
        fut = replication.receipt_future(lsn)
        return lsn if fut is None else fut

    def finish_pending_write(self, fut: asyncio.Future[None]) -> None:
        """Raise what keeps a write of :meth:`try_write_pending` from being acknowledged: the
        replicas' verdict, then the lease (the wait may have outlived it)."""
        if fut.cancelled():
            raise ReplicationUnavailableError(
                f"volume {self.volume.name!r}: the wait for the replicas' receipt was "
                "cancelled (replication stopping); retry the write"
            )
        fut.result()
        self._check_lease()

    def unmap(self, lba: int, block_count: int) -> int:
        self._check_lease()
        lsn = self.volume.unmap(lba, block_count)
        self._receipt(lsn)
        self._check_lease()
        return lsn

    def write_zeroes(self, lba: int, block_count: int) -> int:
        self._check_lease()
        lsn = self.volume.write_zeroes(lba, block_count)
        self._receipt(lsn)
        self._check_lease()
        return lsn

    def write_same(self, lba: int, block_count: int, pattern: BytesLike) -> int:
        self._check_lease()
        lsn = self.volume.write_same(lba, block_count, pattern)
        self._receipt(lsn)
        self._check_lease()
        return lsn

    def _unreplicated(self) -> None:
        """No replication runs: fine for a volume without replicas, but a copy that stopped
        being primary meanwhile (replication is torn down after the role changes) must not
        acknowledge what it took before the change."""
        if self.volume.role in (Role.REPLICA, Role.REBUILDING):
            raise NotPrimaryError(
                f"volume {self.volume.name!r} stopped being primary while the command ran; "
                "it is not acknowledged: write through the new primary"
            )

    def _receipt(self, lsn: int) -> None:
        replication = self.replication
        if replication is None:
            self._unreplicated()
        elif lsn:
            replication.receipt_blocking(lsn)

    def flush(self) -> None:
        """Durable here and on the copies the durability mode requires. The barrier to the
        replicas goes out before the local fdatasync, so the two overlap."""
        self._check_lease()
        lsn = self.volume.last_lsn
        replication = self.replication
        pending = replication.commit_start(lsn) if replication is not None and lsn else None
        try:
            self.volume.flush()
        finally:
            if replication is not None and pending is not None:
                # Wait even if the local sync failed: the waiter must not be left behind.
                replication.commit_wait(lsn, pending)
        if replication is None:
            self._unreplicated()
        # The wait may have outlived the lease: a flush is acknowledged only under one.
        self._check_lease()

    def lba_status(self, lba: int) -> LbaStatus:
        return self.volume.lba_status(lba)

    def _commit(self, lsn: int) -> None:
        replication = self.replication
        if replication is None:
            self._unreplicated()
        elif lsn:
            replication.commit_blocking(lsn)
