"""Which SCSI commands the iSCSI server runs on its event loop, and how the rest share the
thread pool fairly between volumes.

The event loop serves every session and the management API, so it must never wait on storage.
Plain READ/WRITE are tried on the loop (by the connection's fast path, or by the server with
``LogicalUnit.try_execute``), which never waits: whatever would goes to the pool. Of the other
commands only those that read or change the logical unit's state in memory run on the loop
(:func:`runs_inline`); anything that may touch the device or a file runs on the bounded pool.

A pool shared by all volumes could be taken whole by one volume whose commands all wait (its
WAL full on a stalled disk, its flushes stuck): :class:`VolumeLanes` lets at most
``per_volume_max`` commands of one volume run at once and queues the rest in arrival order, so
the other volumes always find free workers while fewer than ``workers / per_volume_max``
volumes are stuck.
"""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Final, Generic, Protocol, TypeVar

from blockyard.iscsi.target_session import ExecuteCommand
from blockyard.scsi.constants import SAI_READ_CAPACITY_16, Op
from blockyard.scsi.lu import LogicalUnit
from blockyard.scsi.sense import ScsiResult

#: Commands that touch no device data and no file: the logical unit answers them from memory
#: (identity, mode pages, unit attentions, reservations held in memory, capacity, ALUA state).
#: PERSISTENT RESERVE OUT is not here (it fsyncs the reservation file), nor GET LBA STATUS
#: (SEEK_DATA/SEEK_HOLE may read extent maps from the disk), nor any READ, WRITE, VERIFY,
#: WRITE SAME, UNMAP, COMPARE AND WRITE or SYNCHRONIZE CACHE; an opcode not listed (unknown or
#: new) runs on the pool, the safe default.
INLINE_OPS: Final = frozenset(
    {
        Op.TEST_UNIT_READY,
        Op.REQUEST_SENSE,
        Op.INQUIRY,
        Op.MODE_SELECT_6,
        Op.MODE_SELECT_10,
        Op.MODE_SENSE_6,
        Op.MODE_SENSE_10,
        Op.RESERVE_6,
        Op.RELEASE_6,
        Op.RESERVE_10,
        Op.RELEASE_10,
        Op.START_STOP_UNIT,
        Op.PREVENT_ALLOW_MEDIUM_REMOVAL,
        Op.READ_CAPACITY_10,
        Op.PRE_FETCH_10,  # only checks the range: the page cache is the engine's to fill
        Op.PRE_FETCH_16,
        Op.PERSISTENT_RESERVE_IN,
        Op.REPORT_LUNS,
        Op.MAINTENANCE_IN,  # REPORT TARGET PORT GROUPS, SUPPORTED OPCODES, SUPPORTED TMFS
    }
)
#: SBC-4 §5.16: the SERVICE ACTION field of SERVICE ACTION IN (16), CDB byte 1 bits 4-0.
_SERVICE_ACTION_MASK: Final = 0x1F


def runs_inline(cdb: bytes) -> bool:
    """Whether the server may run ``cdb`` on its event loop (it cannot wait on storage)."""
    if not cdb:
        return False
    opcode = cdb[0]
    if opcode in INLINE_OPS:
        return True
    # READ CAPACITY (16) yes; GET LBA STATUS, the other SERVICE ACTION IN (16), no.
    return (
        opcode == Op.SERVICE_ACTION_IN_16
        and len(cdb) > 1
        and cdb[1] & _SERVICE_ACTION_MASK == SAI_READ_CAPACITY_16
    )


K = TypeVar("K", bound=Hashable)
J = TypeVar("J")


@dataclass(slots=True)
class _Lane(Generic[J]):
    running: int = 0
    waiting: deque[J] = field(default_factory=deque)


class VolumeLanes(Generic[K, J]):
    """Admission of jobs to a shared pool, per key (a volume's logical unit). Not thread-safe:
    the event loop's.

    :meth:`submit` says whether a job may start now; if not it waits in its key's queue. When a
    started job ends, :meth:`finished` hands back the next job of that key to start (counted as
    running), in arrival order. The queues need no bound of their own: every job is a command
    a session took within its CmdSN window (64 by default) and its immediate-command cap, so a
    volume queues at most the windows of its sessions (16 per target by default).
    """

    def __init__(self, per_key_max: int) -> None:
        if per_key_max < 1:
            raise ValueError("per_key_max must be >= 1")
        self.per_key_max = per_key_max
        self._lanes: dict[K, _Lane[J]] = {}

    def submit(self, key: K, job: J) -> bool:
        """True: start ``job`` now (it is counted as running). False: it was queued."""
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane()
        if lane.running < self.per_key_max:
            lane.running += 1
            return True
        lane.waiting.append(job)
        return False

    def finished(self, key: K) -> J | None:
        """A running job of ``key`` ended: the next one to start (already counted as running),
        or None when none waits."""
        lane = self._lanes.get(key)
        if lane is None:
            return None
        lane.running -= 1
        if lane.waiting:
            lane.running += 1
            return lane.waiting.popleft()
        if not lane.running:
            del self._lanes[key]
        return None

    def running(self, key: K) -> int:
        lane = self._lanes.get(key)
        return 0 if lane is None else lane.running

    def waiting(self, key: K) -> int:
        lane = self._lanes.get(key)
        return 0 if lane is None else len(lane.waiting)

    def __len__(self) -> int:
        """Keys with running or waiting jobs."""
        return len(self._lanes)


class OffloadClient(Protocol):
    """A connection whose commands the :class:`Offloader` runs on the pool."""

    @property
    def closing(self) -> bool: ...

    def run_off_loop(self, lu: LogicalUnit, event: ExecuteCommand) -> asyncio.Future[ScsiResult]:
        """Submit ``event`` to the pool now (its answer comes to :meth:`done_off_loop`)."""
        ...

    def done_off_loop(self, task_id: int, fut: asyncio.Future[ScsiResult]) -> None: ...


C = TypeVar("C", bound=OffloadClient)


class Offloader(Generic[C]):
    """Runs commands on the server's pool through :class:`VolumeLanes`. On the event loop."""

    def __init__(self, per_volume_max: int, pool_open: Callable[[], bool]) -> None:
        self.lanes: VolumeLanes[LogicalUnit, tuple[C, ExecuteCommand]] = VolumeLanes(per_volume_max)
        self._pool_open = pool_open

    def offload(self, client: C, lu: LogicalUnit, event: ExecuteCommand) -> None:
        """Run ``event`` on the pool now, or once fewer of its volume's commands run there."""
        if self.lanes.submit(lu, (client, event)):
            self._start(client, lu, event)

    def _start(self, client: C, lu: LogicalUnit, event: ExecuteCommand) -> None:
        while True:
            if not client.closing and self._pool_open():
                fut = client.run_off_loop(lu, event)
                fut.add_done_callback(functools.partial(self._done, client, lu, event.task_id))
                return
            # Its connection is gone (its answer would be dropped) or the pool is shut down:
            # skip it, and give its place to the next one of the volume.
            nxt = self.lanes.finished(lu)
            if nxt is None:
                return
            client, event = nxt

    def _done(
        self, client: C, lu: LogicalUnit, task_id: int, fut: asyncio.Future[ScsiResult]
    ) -> None:
        try:
            client.done_off_loop(task_id, fut)
        finally:
            nxt = self.lanes.finished(lu)
            if nxt is not None:
                self._start(nxt[0], lu, nxt[1])
